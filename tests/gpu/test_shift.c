/* Context shift on the device (engine_seq_shift, kv_shift.comp) against the CPU reference doing
 * the same (model_ref_shift): tokens are dropped from the middle of a sequence, the moved keys
 * are rotated back to their new positions, and the logits of every token run after it match the
 * reference's, in every KV type, block-aligned or not, with a fork sharing the moved blocks
 * (which must not see the change), on normal and neox RoPE. */
#include "engine.h"
#include "gpu_fixture.h"
#include "kvd_error.h"
#include "ref.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static struct gguf_file *open_model(const char *rel) {
  const char *path = kt_shared_path(rel);
  struct gguf_file *f = NULL;
  struct gguf_error err;
  if (path && gguf_open(path, &f, &err) < 0) kt_log("%s: %s", rel, err.msg);
  return f;
}

static double logits_err(const float *got, const float *want, uint32_t n) {
  double mx = 0, worst = 0;
  for (uint32_t i = 0; i < n; i++)
    mx = fmax(mx, fabs(want[i]));
  for (uint32_t i = 0; i < n; i++)
    worst = fmax(worst, fabs(got[i] - want[i]) / fmax(mx, 1e-6));
  return worst;
}

/* One token through the engine sequence and the reference; the logits error. */
static double step_both(struct engine *e, struct engine_seq *s, struct model_ref *ref, int32_t tok,
                        float *got, float *want) {
  struct engine_item it = {.seq = s, .tokens = &tok, .n_tokens = 1, .logits = got};
  if (engine_forward(e, &it, 1) < 0) return INFINITY;
  if (model_ref_forward(ref, (uint32_t)tok, model_ref_n_past(ref), want) < 0) return INFINITY;
  return logits_err(got, want, model_ref_hparams(ref)->n_vocab);
}

struct shift_case {
  const char *model;
  enum kv_type kt;
  uint32_t block_size, n_before, keep, n_drop, n_after;
  bool fork; /* a fork shares every block before the shift and must not see it */
};

/* The worst logits error after the shift (and of the fork, if any) against the reference. */
static double run_case(const struct shift_case *c, double *ret_fork_err) {
  struct gguf_file *f = open_model(c->model);
  if (!f) return NAN;
  struct model_ref *ref = NULL, *ref2 = NULL;
  struct model_error err = {{0}};
  double worst = INFINITY;
  *ret_fork_err = 0;
  struct model_ref_opts ro = {.kv_type = c->kt};
  if (model_ref_new(f, &ro, &ref, &err) < 0 || (c->fork && model_ref_new(f, &ro, &ref2, &err) < 0)) {
    kt_log("reference: %s", err.msg);
    goto out;
  }
  struct engine *e = NULL;
  uint32_t blocks = 2 * (c->n_before + c->n_after) / c->block_size + 8;
  if (engine_new(fixture_device(), f,
                 &(struct engine_opts){.block_size = c->block_size, .n_blocks = blocks,
                                       .kv_type = c->kt},
                 &e, &err) < 0) {
    kt_log("engine: %s", err.msg);
    goto out;
  }
  uint32_t nv = model_ref_hparams(ref)->n_vocab;
  float *got = malloc(nv * 4), *want = malloc(nv * 4);
  int32_t *toks = malloc((c->n_before + c->n_after) * sizeof *toks);
  struct engine_seq *s = NULL, *fk = NULL;
  if (!got || !want || !toks || engine_seq_new(e, &s) < 0) goto free_engine;
  for (uint32_t i = 0; i < c->n_before + c->n_after; i++)
    toks[i] = (int32_t)kt_rand_range(3, nv - 1);
  /* The history as a prompt, in chunks of 7 (the tiled prefill kernel), logits at the end. */
  for (uint32_t done = 0; done < c->n_before;) {
    uint32_t k = c->n_before - done < 7 ? c->n_before - done : 7;
    struct engine_item it = {.seq = s, .tokens = toks + done, .n_tokens = k, .logits = got};
    if (engine_forward(e, &it, 1) < 0) goto free_engine;
    done += k;
  }
  for (uint32_t i = 0; i < c->n_before; i++) {
    if (model_ref_forward(ref, (uint32_t)toks[i], i, want) < 0) goto free_engine;
    if (ref2 && model_ref_forward(ref2, (uint32_t)toks[i], i, want) < 0) goto free_engine;
  }
  if (c->fork && engine_seq_fork(e, s, &fk) < 0) goto free_engine;
  struct kv_pool_stats before, after;
  engine_kv_stats(e, &before);
  int rc = engine_seq_shift(e, s, c->keep, c->n_drop);
  if (rc < 0) {
    kt_log("engine_seq_shift: %s", kvd_strerror(rc));
    goto free_engine;
  }
  if (model_ref_shift(ref, c->keep, c->n_drop) < 0) goto free_engine;
  engine_kv_stats(e, &after);
  if (engine_seq_len(s) != c->n_before - c->n_drop) goto free_engine;
  /* Without a fork the dropped blocks are free again (less the partial one kept); with one,
   * nothing is freed and the moved blocks are copies. */
  if (!c->fork && after.used >= before.used) goto free_engine;
  worst = 0;
  for (uint32_t i = c->n_before; i < c->n_before + c->n_after; i++) {
    worst = fmax(worst, step_both(e, s, ref, toks[i], got, want));
    if (fk) *ret_fork_err = fmax(*ret_fork_err, step_both(e, fk, ref2, toks[i], got, want));
  }
free_engine:
  if (fk) engine_seq_free(e, fk);
  if (s) engine_seq_free(e, s);
  if (e) {
    struct kv_pool_stats st;
    engine_kv_stats(e, &st);
    if (st.free + st.cached != st.total) worst = INFINITY; /* a block leaked */
  }
  engine_free(e);
  free(got);
  free(want);
  free(toks);
out:
  model_ref_free(ref);
  model_ref_free(ref2);
  gguf_close(f);
  return worst;
}

/* Bound per KV type: f32 keeps the rotation's rounding only; the stored types round the rotated
 * keys once more (the device and the reference may land on neighbouring codes where a rotated
 * value falls on a rounding boundary). */
static double bound(enum kv_type kt) {
  switch (kt) {
  case KV_F32:
    return 1e-4;
  case KV_F16:
    return 2e-3;
  case KV_Q8_0:
    return 2e-2;
  default:
    return 8e-2;
  }
}

KT_TEST(shift_matches_reference_in_every_kv_type) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  static const uint32_t blocks[] = {1, 7, 16, 64};
  for (int t = 0; t < KV_TYPE_COUNT; t++)
    for (int b = 0; b < 4; b++) {
      uint32_t bs = blocks[b];
      /* keep: 0, block-aligned, or cutting into a block (its kept rows are copied). */
      uint32_t keep = (uint32_t)(t + b) % 3 == 0 ? 0 : (t + b) % 3 == 1 ? bs : bs + 3 % bs;
      uint32_t n_drop = bs * (bs >= 16 ? 1 : 40 / bs);
      struct shift_case c = {"models/stories260K.gguf", (enum kv_type)t, bs, 0, keep, n_drop, 24,
                             false};
      c.n_before = keep + n_drop + 30;
      double fe;
      double w = run_case(&c, &fe);
      if (isnan(w)) KT_SKIP("stories260K.gguf not found");
      kt_log("KV %s, block %u, %u tokens, keep %u, drop %u: worst %.3g", kv_type_name(c.kt), bs,
             c.n_before, keep, n_drop, w);
      KT_CHECK(w < bound(c.kt));
    }
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(shift_copies_blocks_a_fork_shares) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  for (int t = 0; t < KV_TYPE_COUNT; t += 2) {
    struct shift_case c = {"models/stories260K.gguf", (enum kv_type)t, 16, 100, 5, 32, 20, true};
    double fe;
    double w = run_case(&c, &fe);
    if (isnan(w)) KT_SKIP("stories260K.gguf not found");
    kt_log("KV %s with a fork: shifted %.3g, fork %.3g", kv_type_name(c.kt), w, fe);
    KT_CHECK(w < bound(c.kt));
    KT_CHECK(fe < bound(c.kt));
  }
  FIXTURE_CHECK_VALIDATION();
}

/* neox RoPE (qwen3, head 64, per-head norms), partial rotary (phi3) and gemma3's two RoPE bases
 * (local and global layers rotate at different speeds: each layer's own table). */
KT_TEST(shift_matches_reference_on_other_families) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  static const char *models[] = {"models/arch/qwen3.gguf", "models/arch/phi3.gguf",
                                 "models/arch/gemma3.gguf", "models/arch/llama3.gguf"};
  for (size_t i = 0; i < sizeof models / sizeof models[0]; i++) {
    struct shift_case c = {models[i], KV_F32, 16, 60, 4, 32, 12, false};
    double fe;
    double w = run_case(&c, &fe);
    if (isnan(w)) {
      kt_log("%s not found", models[i]);
      continue;
    }
    kt_log("%s: worst %.3g", models[i], w);
    KT_CHECK(w < bound(c.kt));
  }
  FIXTURE_CHECK_VALIDATION();
}

