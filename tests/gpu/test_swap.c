/* Host copies of KV (engine_seq_export / engine_seq_import): a sequence copied out of the pool
 * and back into fresh blocks continues bit for bit like the original, in every KV type and block
 * size; a copy imported behind a prefix-cache hit; a sliding-window sequence with blocks given
 * back; an import that does not fit changes nothing. */
#include "engine.h"
#include "gpu_fixture.h"
#include "kvd_error.h"

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

static int run(struct engine *e, struct engine_seq *s, const int32_t *toks, uint32_t n,
               float *logits) {
  for (uint32_t done = 0; done < n;) {
    uint32_t k = n - done < 37 ? n - done : 37;
    struct engine_item it = {
        .seq = s, .tokens = toks + done, .n_tokens = k, .logits = done + k == n ? logits : NULL};
    int rc = engine_forward(e, &it, 1);
    if (rc < 0) return rc;
    done += k;
  }
  return 0;
}

/* Decodes `steps` tokens on a and on b (separately, same shapes): false at the first logits that
 * differ in any bit. */
static bool same_continuation(struct engine *e, struct engine_seq *a, struct engine_seq *b,
                              const int32_t *toks, uint32_t steps, uint32_t n_vocab) {
  float *la = malloc(n_vocab * sizeof *la), *lb = malloc(n_vocab * sizeof *lb);
  bool same = la && lb;
  for (uint32_t i = 0; i < steps && same; i++) {
    struct engine_item ia = {.seq = a, .tokens = toks + i, .n_tokens = 1, .logits = la};
    struct engine_item ib = {.seq = b, .tokens = toks + i, .n_tokens = 1, .logits = lb};
    same = engine_forward(e, &ia, 1) == 0 && engine_forward(e, &ib, 1) == 0 &&
           memcmp(la, lb, n_vocab * sizeof *la) == 0;
    if (!same) kt_log("step %u differs", i);
  }
  free(la);
  free(lb);
  return same;
}

static bool pool_clean(struct engine *e) {
  struct kv_pool_stats st;
  engine_kv_stats(e, &st);
  return st.free + st.cached == st.total;
}

KT_TEST(export_import_continues_bit_for_bit) {
  FIXTURE_DEVICE(dev);
  struct gguf_file *f = open_model("models/stories260K.gguf");
  if (!f) KT_SKIP("stories260K.gguf not found");
  static const uint32_t block_sizes[] = {1, 7, 16};
  /* Under the sanitizers (slow), every other KV type and block size. */
  int step = getenv("KVD_SANITIZED") ? 2 : 1;
  for (int t = 0; t < KV_TYPE_COUNT; t += step)
    for (int b = 0; b < 3; b += step) {
      struct engine *e = NULL;
      struct model_error err = {{0}};
      int rc =
          engine_new(dev, f,
                     &(struct engine_opts){
                         .block_size = block_sizes[b], .n_blocks = 400, .kv_type = (enum kv_type)t},
                     &e, &err);
      KT_ASSERT(rc == 0);
      uint32_t nv = engine_hparams(e)->n_vocab, n = 50 + (uint32_t)kt_rand_range(0, 20);
      int32_t toks[100];
      for (int i = 0; i < 100; i++)
        toks[i] = (int32_t)kt_rand_range(3, nv - 1);
      float *lg = malloc(nv * sizeof *lg);
      struct engine_seq *s = NULL, *c = NULL;
      KT_ASSERT(engine_seq_new(e, &s) == 0 && run(e, s, toks, n, lg) == 0);
      uint32_t first;
      uint64_t nb = engine_seq_export_blocks(s, &first);
      uint64_t unit = engine_kv_block_bytes(e);
      KT_CHECK(first == 0 && nb == (n + block_sizes[b] - 1) / block_sizes[b]);
      uint8_t *host = malloc(nb * unit), *again = malloc(nb * unit);
      KT_ASSERT(host && again);
      KT_CHECK(engine_seq_export(e, s, host) == 0);
      KT_CHECK(engine_seq_new(e, &c) == 0);
      /* Malformed imports are refused before anything is taken. */
      KT_CHECK(engine_seq_import(e, c, host, (uint32_t)nb, (uint32_t)nb * block_sizes[b] + 1) ==
               KVD_EINVAL);
      if (block_sizes[b] > 1)
        KT_CHECK(engine_seq_import(e, c, host, (uint32_t)nb + 1, n) == KVD_EINVAL);
      KT_CHECK(engine_seq_len(c) == 0);
      KT_CHECK(engine_seq_import(e, c, host, (uint32_t)nb, n) == 0);
      KT_CHECK(engine_seq_len(c) == n);
      /* The copy holds the same bytes... */
      KT_CHECK(engine_seq_export(e, c, again) == 0);
      KT_CHECK(memcmp(host, again, nb * unit) == 0);
      /* ...and reads like the original. */
      KT_CHECK(same_continuation(e, s, c, toks + n, 12, nv));
      kt_log("KV %s, block %u: %u tokens, %llu blocks of %llu bytes", kv_type_name((enum kv_type)t),
             block_sizes[b], n, (unsigned long long)nb, (unsigned long long)unit);
      engine_seq_free(e, s);
      engine_seq_free(e, c);
      KT_CHECK(pool_clean(e));
      free(host);
      free(again);
      free(lg);
      engine_free(e);
    }
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

/* Swap-in behind the prefix cache: the blocks still cached are shared, only the rest is copied. */
KT_TEST(import_after_a_prefix_hit) {
  FIXTURE_DEVICE(dev);
  struct gguf_file *f = open_model("models/stories260K.gguf");
  if (!f) KT_SKIP("stories260K.gguf not found");
  struct engine *e = NULL;
  struct model_error err = {{0}};
  KT_ASSERT(engine_new(dev, f,
                       &(struct engine_opts){.block_size = 16, .n_blocks = 64, .kv_type = KV_F16},
                       &e, &err) == 0);
  uint32_t nv = engine_hparams(e)->n_vocab, n = 87;
  int32_t toks[120];
  for (int i = 0; i < 120; i++)
    toks[i] = (int32_t)kt_rand_range(3, nv - 1);
  float *lg = malloc(nv * sizeof *lg);
  struct engine_seq *s = NULL, *c = NULL;
  KT_ASSERT(engine_seq_new(e, &s) == 0 && run(e, s, toks, n, lg) == 0);
  KT_CHECK(engine_seq_register(e, s, toks, n) == 5);
  uint64_t nb = engine_seq_export_blocks(s, NULL), unit = engine_kv_block_bytes(e);
  uint8_t *host = malloc(nb * unit);
  KT_ASSERT(host && engine_seq_export(e, s, host) == 0);
  uint32_t cached = 0;
  KT_CHECK(engine_seq_new_prefix(e, toks, n, &c, &cached) == 0);
  KT_CHECK(cached == 80); /* five whole blocks; the last partial one is not in the cache */
  uint32_t skip = cached / 16;
  KT_CHECK(engine_seq_import(e, c, host + skip * unit, (uint32_t)nb - skip, n - cached) == 0);
  KT_CHECK(engine_seq_len(c) == n);
  KT_CHECK(same_continuation(e, s, c, toks + n, 20, nv));
  engine_seq_free(e, s);
  engine_seq_free(e, c);
  KT_CHECK(pool_clean(e));
  free(host);
  free(lg);
  engine_free(e);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

/* A sliding-window model gives its oldest blocks back as it goes: the copy holds only the live
 * ones and the restored sequence starts with the same given-back entries. */
KT_TEST(windowed_sequence_round_trip) {
  FIXTURE_DEVICE(dev);
  struct gguf_file *f = open_model("models/arch/mistral_swa.gguf");
  if (!f) KT_SKIP("mistral_swa.gguf not found");
  struct engine *e = NULL;
  struct model_error err = {{0}};
  KT_ASSERT(engine_new(dev, f,
                       &(struct engine_opts){.block_size = 16, .n_blocks = 64, .kv_type = KV_F32},
                       &e, &err) == 0);
  uint32_t nv = engine_hparams(e)->n_vocab, n = 150;
  int32_t toks[200];
  for (int i = 0; i < 200; i++)
    toks[i] = (int32_t)kt_rand_range(3, nv - 1);
  float *lg = malloc(nv * sizeof *lg);
  struct engine_seq *s = NULL, *c = NULL;
  KT_ASSERT(engine_seq_new(e, &s) == 0 && run(e, s, toks, n, lg) == 0);
  KT_CHECK(engine_seq_drop_window(e, s, UINT32_MAX) > 0);
  uint32_t first;
  uint64_t nb = engine_seq_export_blocks(s, &first), unit = engine_kv_block_bytes(e);
  KT_CHECK(first > 0 && first == engine_seq_dropped_blocks(s));
  uint8_t *host = malloc(nb * unit);
  KT_ASSERT(host && engine_seq_export(e, s, host) == 0);
  KT_CHECK(engine_seq_new(e, &c) == 0);
  KT_CHECK(engine_seq_skip_dropped(e, c, first) == 0);
  KT_CHECK(engine_seq_import(e, c, host, (uint32_t)nb, n - first * 16) == 0);
  KT_CHECK(engine_seq_len(c) == n && engine_seq_shifted(c));
  KT_CHECK(same_continuation(e, s, c, toks + n, 20, nv));
  engine_seq_free(e, s);
  engine_seq_free(e, c);
  KT_CHECK(pool_clean(e));
  free(host);
  free(lg);
  engine_free(e);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(import_that_does_not_fit_changes_nothing) {
  FIXTURE_DEVICE(dev);
  struct gguf_file *f = open_model("models/stories260K.gguf");
  if (!f) KT_SKIP("stories260K.gguf not found");
  struct engine *e = NULL;
  struct model_error err = {{0}};
  KT_ASSERT(engine_new(dev, f,
                       &(struct engine_opts){.block_size = 16, .n_blocks = 8, .kv_type = KV_F16},
                       &e, &err) == 0);
  uint32_t nv = engine_hparams(e)->n_vocab;
  int32_t toks[100];
  for (int i = 0; i < 100; i++)
    toks[i] = (int32_t)kt_rand_range(3, nv - 1);
  float *lg = malloc(nv * sizeof *lg);
  struct engine_seq *s = NULL, *c = NULL, *hog = NULL;
  KT_ASSERT(engine_seq_new(e, &s) == 0 && run(e, s, toks, 80, lg) == 0); /* 5 blocks */
  uint64_t nb = engine_seq_export_blocks(s, NULL), unit = engine_kv_block_bytes(e);
  uint8_t *host = malloc(nb * unit);
  KT_ASSERT(host && engine_seq_export(e, s, host) == 0);
  KT_CHECK(engine_seq_new(e, &hog) == 0 && run(e, hog, toks, 20, lg) == 0); /* 2 more */
  struct kv_pool_stats before, after;
  engine_kv_stats(e, &before);
  KT_CHECK(engine_seq_new(e, &c) == 0);
  KT_CHECK(engine_seq_import(e, c, host, (uint32_t)nb, 80) == KVD_E_KV_EXHAUSTED);
  engine_kv_stats(e, &after);
  KT_CHECK(engine_seq_len(c) == 0 && after.free == before.free && after.used == before.used);
  /* With the other sequence gone it fits. */
  engine_seq_free(e, hog);
  engine_seq_free(e, s);
  KT_CHECK(engine_seq_import(e, c, host, (uint32_t)nb, 80) == 0 && engine_seq_len(c) == 80);
  engine_seq_free(e, c);
  KT_CHECK(pool_clean(e));
  free(host);
  free(lg);
  engine_free(e);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}
