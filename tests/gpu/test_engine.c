/* The engine end to end on the real tiny models: greedy ids against SOURCES.md's references,
 * full logits against the CPU reference across many KV block boundaries, batched decode equal to
 * solo runs, chunked prefill, fork with copy-on-write (in every KV type), and the pool's
 * counters. */
#include "engine.h"
#include "generate.h"
#include "gguf_write.h"
#include "gpu_fixture.h"
#include "kvacc.h"
#include "kvd_error.h"
#include "ref_json.h"
#include "ref.h"
#include "sample.h"

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

static struct engine *new_engine(const struct gguf_file *f, const struct engine_opts *o) {
  struct engine *e = NULL;
  struct model_error err = {{0}};
  int rc = engine_new(fixture_device(), f, o, &e, &err);
  if (rc < 0) kt_log("engine_new: %s: %s", kvd_strerror(rc), err.msg);
  return e;
}

struct capture {
  int32_t ids[512];
  float logits[16][512]; /* the logits behind the first 16 generated tokens (vocab <= 512) */
  uint32_t n_vocab;
  uint32_t n;
};

static int on_token(void *ud, int32_t tok, const float *logits, uint32_t n_vocab) {
  struct capture *c = ud;
  c->n_vocab = n_vocab;
  if (c->n < 16 && n_vocab <= 512) memcpy(c->logits[c->n], logits, n_vocab * sizeof(float));
  if (c->n < 512) c->ids[c->n] = tok;
  c->n++;
  return 0;
}

/* Greedy through engine_generate: ids must match exactly, and the reference's top-5 values
 * within tol: log-probs (quant/reference.json, absolute) or raw logits (stories, relative). */
static void check_case(struct engine *e, const cJSON *c, bool logprobs, double tol) {
  uint32_t n_prompt, n_want;
  int32_t *prompt = ref_json_ids(c, "prompt_ids", &n_prompt);
  int32_t *want = ref_json_ids(c, "generated_ids", &n_want);
  int steps = cJSON_GetObjectItemCaseSensitive(c, "steps")->valueint;
  struct capture *cap = calloc(1, sizeof *cap);
  /* llama2.c counts steps as positions run: the last one still yields a token. */
  int n = engine_generate(e, prompt, n_prompt, (uint32_t)steps - n_prompt + 1, NULL, on_token, cap,
                          NULL);
  KT_CHECK_MSG(n >= 0, "engine_generate: %s", kvd_strerror(n));
  KT_CHECK_EQ(cap->n, n_want);
  uint32_t first_diff = UINT32_MAX;
  for (uint32_t i = 0; i < n_want && i < cap->n && i < 512; i++)
    if (cap->ids[i] != want[i] && first_diff == UINT32_MAX) first_diff = i;
  KT_CHECK_MSG(first_diff == UINT32_MAX, "first differing generated token: %u", first_diff);
  const cJSON *tops = cJSON_GetObjectItemCaseSensitive(c, logprobs ? "top_logprobs" : "top_logits");
  const cJSON *entry;
  double worst = 0;
  uint32_t checked = 0;
  float lp[512];
  cJSON_ArrayForEach(entry, tops) {
    /* "pos" is the position whose logits chose the token: generated token pos - (n_prompt-1). */
    uint32_t pos = (uint32_t)cJSON_GetObjectItemCaseSensitive(entry, "pos")->valueint;
    if (pos + 1 < n_prompt) continue;
    pos -= n_prompt - 1;
    if (pos >= 16 || pos >= cap->n) continue;
    const float *row = cap->logits[pos];
    if (logprobs) {
      sample_log_softmax(row, lp, cap->n_vocab);
      row = lp;
    }
    const cJSON *pair;
    cJSON_ArrayForEach(pair, cJSON_GetObjectItemCaseSensitive(entry, "top")) {
      int32_t id = (int32_t)cJSON_GetArrayItem(pair, 0)->valuedouble;
      double v = cJSON_GetArrayItem(pair, 1)->valuedouble;
      double d = fabs(row[id] - v) / (logprobs ? 1.0 : fmax(1.0, fabs(v)));
      if (d > worst) worst = d;
    }
    checked++;
  }
  KT_CHECK(checked > 0);
  KT_CHECK_MSG(worst < tol, "max %s error %.3g over %u positions",
               logprobs ? "|d logprob|" : "rel logit", worst, checked);
  kt_log("%u/%u ids, max %s error %.3g over %u positions", cap->n, n_want,
         logprobs ? "|d logprob|" : "rel logit", worst, checked);
  free(cap);
  free(prompt);
  free(want);
}

/* tol: the stored logits come from the F32 weights; the F16 file's rounded matrices move them
 * by ~2e-3 (the ids stay identical), so it gets a looser bound. */
static void check_stories(const char *rel, double tol) {
  cJSON *ref = ref_json_load("models/stories260K.reference.json");
  struct gguf_file *f = open_model(rel);
  if (!ref || !f) {
    cJSON_Delete(ref);
    gguf_close(f);
    KT_SKIP("models not found under KVD_SHARED_DIR");
  }
  struct engine *e = new_engine(f, &(struct engine_opts){.n_blocks = 64});
  KT_ASSERT(e);
  const cJSON *c;
  cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(ref, "cases"))
      check_case(e, c, false, tol);
  struct kv_pool_stats st;
  engine_kv_stats(e, &st);
  KT_CHECK_EQ(st.free, st.total); /* every generation gave its blocks back */
  engine_free(e);
  gguf_close(f);
  cJSON_Delete(ref);
}

KT_TEST(stories260K_f32_greedy_matches_reference) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  check_stories("models/stories260K.gguf", 1e-4);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(stories260K_f16_tied_greedy_matches_reference) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  check_stories("models/stories260K-f16.gguf", 5e-3);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(every_quant_file_matches_reference_ids_and_logprobs) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  cJSON *ref = ref_json_load("models/quant/reference.json");
  if (!ref) KT_SKIP("quant/reference.json not found");
  const cJSON *c;
  int n_files = 0;
  cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(ref, "cases")) {
    char rel[256];
    snprintf(rel, sizeof rel, "models/%s",
             cJSON_GetObjectItemCaseSensitive(c, "model")->valuestring);
    struct gguf_file *f = open_model(rel);
    KT_CHECK_MSG(f != NULL, "%s missing", rel);
    if (!f) continue;
    kt_log("%s", rel);
    struct engine *e = new_engine(f, &(struct engine_opts){.n_blocks = 16});
    KT_CHECK(e != NULL);
    if (e) check_case(e, c, true, 1e-4);
    engine_free(e);
    gguf_close(f);
    n_files++;
  }
  KT_CHECK_EQ(n_files, 11);
  cJSON_Delete(ref);
  FIXTURE_CHECK_VALIDATION();
}

/* Runs tokens one step per `chunk` tokens on seq, logits of the last into out. */
static int feed(struct engine *e, struct engine_seq *s, const int32_t *toks, uint32_t n,
                uint32_t chunk, float *out) {
  for (uint32_t done = 0; done < n;) {
    uint32_t k = n - done < chunk ? n - done : chunk;
    struct engine_item it = {
        .seq = s, .tokens = toks + done, .n_tokens = k, .logits = done + k == n ? out : NULL};
    int rc = engine_forward(e, &it, 1);
    if (rc < 0) return rc;
    done += k;
  }
  return 0;
}

static double logits_err(const float *got, const float *want, uint32_t n) {
  double mx = 0, worst = 0;
  for (uint32_t i = 0; i < n; i++)
    mx = fmax(mx, fabs(want[i]));
  for (uint32_t i = 0; i < n; i++)
    worst = fmax(worst, fabs(got[i] - want[i]) / fmax(mx, 1e-6));
  return worst;
}

KT_TEST(logits_match_cpu_reference_across_block_boundaries) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = open_model("models/stories260K.gguf");
  if (!f) KT_SKIP("stories260K.gguf not found");
  struct model_ref *ref = NULL;
  struct model_error err;
  KT_ASSERT_OK(model_ref_new(f, &(struct model_ref_opts){.n_ctx = 128}, &ref, &err));
  /* Block size 4: 70 positions cross 17 block boundaries. */
  struct engine *e = new_engine(f, &(struct engine_opts){.block_size = 4, .n_blocks = 40});
  KT_ASSERT(e);
  struct engine_seq *s;
  KT_ASSERT_OK(engine_seq_new(e, &s));
  float got[512], want[512];
  double worst = 0;
  for (uint32_t pos = 0; pos < 70; pos++) {
    int32_t tok = (int32_t)kt_rand_range(0, 511);
    KT_ASSERT_OK(model_ref_forward(ref, (uint32_t)tok, pos, want));
    KT_ASSERT_OK(feed(e, s, &tok, 1, 1, got));
    worst = fmax(worst, logits_err(got, want, 512));
  }
  kt_log("max logit error vs CPU reference over 70 positions: %.3g", worst);
  KT_CHECK(worst < 1e-4);
  engine_seq_free(e, s);
  engine_free(e);
  model_ref_free(ref);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

/* Logits after each of the last k new tokens of an item (what verifying k drafted tokens in one
 * step needs) match the CPU reference at every position, next to an ordinary item in the same
 * step; asking for more rows than tokens is refused. */
KT_TEST(an_item_returns_logits_for_each_of_its_last_k_tokens) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = open_model("models/stories260K.gguf");
  if (!f) KT_SKIP("stories260K.gguf not found");
  struct model_ref *ref = NULL, *ref2 = NULL;
  struct model_error err;
  KT_ASSERT_OK(model_ref_new(f, &(struct model_ref_opts){.n_ctx = 128}, &ref, &err));
  KT_ASSERT_OK(model_ref_new(f, &(struct model_ref_opts){.n_ctx = 128}, &ref2, &err));
  struct engine *e =
      new_engine(f, &(struct engine_opts){.block_size = 16, .n_blocks = 40, .max_logits = 8});
  KT_ASSERT(e);
  struct engine_seq *a, *b;
  KT_ASSERT_OK(engine_seq_new(e, &a));
  KT_ASSERT_OK(engine_seq_new(e, &b));
  int32_t ta[40], tb[30];
  for (int i = 0; i < 40; i++)
    ta[i] = (int32_t)kt_rand_range(3, 511);
  for (int i = 0; i < 30; i++)
    tb[i] = (int32_t)kt_rand_range(3, 511);
  static float got[10 * 512], gb[512], want[7][512], wb[512];
  KT_ASSERT_OK(feed(e, a, ta, 21, 21, got));
  KT_ASSERT_OK(feed(e, b, tb, 13, 13, gb));
  for (uint32_t p = 0; p < 21; p++)
    KT_ASSERT_OK(model_ref_forward(ref, (uint32_t)ta[p], p, want[0]));
  for (uint32_t p = 0; p < 14; p++)
    KT_ASSERT_OK(model_ref_forward(ref2, (uint32_t)tb[p], p, wb));
  /* One step: 9 tokens of a with the logits of its last 7, one token of b with its own. */
  for (uint32_t p = 21; p < 30; p++)
    KT_ASSERT_OK(model_ref_forward(ref, (uint32_t)ta[p], p, want[p >= 23 ? p - 23 : 0]));
  struct engine_item bad = {
      .seq = a, .tokens = ta + 21, .n_tokens = 2, .logits = got, .n_logits = 3};
  KT_CHECK_EQ(engine_forward(e, &bad, 1), KVD_EINVAL);
  struct engine_item items[2] = {
      {.seq = a, .tokens = ta + 21, .n_tokens = 9, .logits = got, .n_logits = 7},
      {.seq = b, .tokens = tb + 13, .n_tokens = 1, .logits = gb},
  };
  KT_ASSERT_OK(engine_forward(e, items, 2));
  KT_CHECK_EQ(engine_seq_len(a), 30);
  double worst = 0;
  for (int k = 0; k < 7; k++)
    worst = fmax(worst, logits_err(got + k * 512, want[k], 512));
  double wb_err = logits_err(gb, wb, 512);
  kt_log("7 rows of one item: worst %.3g; the other item %.3g", worst, wb_err);
  KT_CHECK(worst < 1e-4 && wb_err < 1e-4);
  /* More rows than a step holds: refused before anything changes. */
  struct engine_item many = {
      .seq = a, .tokens = ta + 30, .n_tokens = 10, .logits = got, .n_logits = 10};
  int32_t ten[10] = {5, 6, 7, 8, 9, 10, 11, 12, 13, 14};
  many.tokens = ten;
  KT_CHECK_EQ(engine_forward(e, &many, 1), KVD_E2BIG); /* 10 rows, the engine holds 8 */
  KT_CHECK_EQ(engine_seq_len(a), 30);
  engine_seq_free(e, a);
  engine_seq_free(e, b);
  engine_free(e);
  model_ref_free(ref);
  model_ref_free(ref2);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(chunked_prefill_equals_one_step_prefill) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = open_model("models/stories260K.gguf");
  if (!f) KT_SKIP("stories260K.gguf not found");
  struct engine *e = new_engine(f, &(struct engine_opts){.block_size = 8, .n_blocks = 64});
  KT_ASSERT(e);
  int32_t toks[100];
  for (int i = 0; i < 100; i++)
    toks[i] = (int32_t)kt_rand_range(3, 511);
  float a[512], b[512], c[512];
  struct engine_seq *s1, *s2, *s3;
  KT_ASSERT_OK(engine_seq_new(e, &s1));
  KT_ASSERT_OK(engine_seq_new(e, &s2));
  KT_ASSERT_OK(engine_seq_new(e, &s3));
  KT_ASSERT_OK(feed(e, s1, toks, 100, 100, a)); /* one step: the tiled mat-mul path */
  KT_ASSERT_OK(feed(e, s2, toks, 100, 7, b));   /* odd chunks across block edges */
  KT_ASSERT_OK(feed(e, s3, toks, 100, 1, c));   /* token by token: the mat-vec path */
  KT_CHECK(logits_err(b, a, 512) < 1e-5);
  KT_CHECK(logits_err(c, a, 512) < 1e-5);
  engine_free(e); /* frees the open sequences too */
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

/* Greedy continuation of `prompt` for n tokens on its own sequence. */
static void solo_greedy(struct engine *e, const int32_t *prompt, uint32_t n_prompt, uint32_t n,
                        int32_t *out) {
  struct engine_seq *s;
  float lg[512];
  KT_ASSERT_OK(engine_seq_new(e, &s));
  KT_ASSERT_OK(feed(e, s, prompt, n_prompt, 64, lg));
  for (uint32_t i = 0; i < n; i++) {
    int32_t best = 0;
    for (int32_t v = 1; v < 512; v++)
      if (lg[v] > lg[best]) best = v;
    out[i] = best;
    KT_ASSERT_OK(feed(e, s, &best, 1, 1, lg));
  }
  engine_seq_free(e, s);
}

KT_TEST(batched_decode_of_8_sequences_equals_solo_runs) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = open_model("models/stories260K.gguf");
  if (!f) KT_SKIP("stories260K.gguf not found");
  struct engine *e = new_engine(f, &(struct engine_opts){.n_blocks = 128});
  KT_ASSERT(e);
  enum { S = 8, N = 12 };
  int32_t prompts[S][40], solo[S][N], batched[S][N];
  uint32_t plen[S];
  for (int i = 0; i < S; i++) {
    plen[i] = kt_rand_range(1, 40);
    prompts[i][0] = 1;
    for (uint32_t j = 1; j < plen[i]; j++)
      prompts[i][j] = (int32_t)kt_rand_range(3, 511);
    solo_greedy(e, prompts[i], plen[i], N, solo[i]);
  }
  struct kv_pool_stats before;
  engine_kv_stats(e, &before);
  /* Prefill all 8 in one step (mixed lengths), then decode all 8 together each step. */
  struct engine_seq *seqs[S];
  static float lg[S][512];
  struct engine_item items[S];
  for (int i = 0; i < S; i++) {
    KT_ASSERT_OK(engine_seq_new(e, &seqs[i]));
    items[i] = (struct engine_item){seqs[i], prompts[i], plen[i], lg[i], 1};
  }
  KT_ASSERT_OK(engine_forward(e, items, S));
  int32_t next[S];
  for (int step = 0; step < N; step++) {
    for (int i = 0; i < S; i++) {
      int32_t best = 0;
      for (int32_t v = 1; v < 512; v++)
        if (lg[i][v] > lg[i][best]) best = v;
      batched[i][step] = next[i] = best;
      items[i] = (struct engine_item){seqs[i], &next[i], 1, lg[i], 1};
    }
    KT_ASSERT_OK(engine_forward(e, items, S));
  }
  for (int i = 0; i < S; i++)
    KT_CHECK_MSG(memcmp(solo[i], batched[i], sizeof solo[i]) == 0, "sequence %d differs", i);
  for (int i = 0; i < S; i++)
    engine_seq_free(e, seqs[i]);
  struct kv_pool_stats after;
  engine_kv_stats(e, &after);
  KT_CHECK_EQ(after.free, before.free);
  KT_CHECK_EQ(after.free, after.total);
  engine_free(e);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

/* A fork shares every block, and the first write into a shared block copies it, in the KV type
 * as stored: the forks answer exactly what two sequences fed the same tokens in the same steps
 * answer on their own. */
static void fork_body(const struct gguf_file *f, enum kv_type kt) {
  struct engine *e =
      new_engine(f, &(struct engine_opts){.block_size = 8, .n_blocks = 32, .kv_type = kt});
  KT_ASSERT(e);
  int32_t prompt[13], a_tok = 300, b_tok = 400;
  for (int i = 0; i < 13; i++)
    prompt[i] = (int32_t)kt_rand_range(3, 511);
  float la[512], lb[512], want_a[512], want_b[512];
  /* The solo answers: the prompt in one step, then one different token each. */
  struct engine_seq *s, *t, *u;
  KT_ASSERT_OK(engine_seq_new(e, &s));
  KT_ASSERT_OK(feed(e, s, prompt, 13, 13, la));
  KT_ASSERT_OK(feed(e, s, &a_tok, 1, 1, want_a));
  engine_seq_free(e, s);
  KT_ASSERT_OK(engine_seq_new(e, &s));
  KT_ASSERT_OK(feed(e, s, prompt, 13, 13, la));
  KT_ASSERT_OK(feed(e, s, &b_tok, 1, 1, want_b));
  engine_seq_free(e, s);

  KT_ASSERT_OK(engine_seq_new(e, &s));
  KT_ASSERT_OK(feed(e, s, prompt, 13, 13, la));
  struct kv_pool_stats st0, st1;
  engine_kv_stats(e, &st0);
  KT_ASSERT_OK(engine_seq_fork(e, s, &t));
  engine_kv_stats(e, &st1);
  KT_CHECK_EQ(st1.used, st0.used); /* forking copies nothing */
  /* Both write position 13 inside the shared second block: the first writer copies it. */
  KT_ASSERT_OK(feed(e, s, &a_tok, 1, 1, la));
  KT_ASSERT_OK(feed(e, t, &b_tok, 1, 1, lb));
  KT_CHECK_MSG(logits_err(la, want_a, 512) < 1e-5, "%s: %g", kv_type_name(kt),
               logits_err(la, want_a, 512));
  KT_CHECK_MSG(logits_err(lb, want_b, 512) < 1e-5, "%s: %g", kv_type_name(kt),
               logits_err(lb, want_b, 512));
  engine_kv_stats(e, &st1);
  KT_CHECK_EQ(st1.used, st0.used + 1);
  KT_CHECK(st1.cow_copies >= 1);
  /* A fork of a fork, then free everything: the pool is whole again. */
  KT_ASSERT_OK(engine_seq_fork(e, t, &u));
  engine_seq_free(e, s);
  engine_seq_free(e, t);
  engine_seq_free(e, u);
  engine_kv_stats(e, &st1);
  KT_CHECK_EQ(st1.free, st1.total);
  engine_free(e);
}

KT_TEST(fork_shares_blocks_and_copies_on_write) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = open_model("models/stories260K.gguf");
  if (!f) KT_SKIP("stories260K.gguf not found");
  for (int t = 0; t < KV_TYPE_COUNT; t++)
    fork_body(f, (enum kv_type)t);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(exhausted_pool_is_a_typed_error_and_changes_nothing) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = open_model("models/stories260K.gguf");
  if (!f) KT_SKIP("stories260K.gguf not found");
  struct engine *e = new_engine(f, &(struct engine_opts){.block_size = 16, .n_blocks = 4});
  KT_ASSERT(e);
  int32_t toks[80];
  for (int i = 0; i < 80; i++)
    toks[i] = (int32_t)kt_rand_range(3, 511);
  struct engine_seq *a, *b;
  KT_ASSERT_OK(engine_seq_new(e, &a));
  KT_ASSERT_OK(engine_seq_new(e, &b));
  float la[512], again[512];
  KT_ASSERT_OK(feed(e, a, toks, 40, 40, la)); /* 3 of 4 blocks */
  struct engine_item it = {b, toks, 40, NULL, 0};
  KT_CHECK_EQ(engine_forward(e, &it, 1), KVD_E_KV_EXHAUSTED);
  KT_CHECK_EQ(engine_seq_len(b), 0);
  KT_CHECK_EQ(engine_seq_len(a), 40);
  /* a is intact: one more token gives the same answer as recomputing from scratch. */
  KT_ASSERT_OK(feed(e, a, toks + 40, 1, 1, la));
  engine_seq_free(e, a);
  KT_ASSERT_OK(feed(e, b, toks, 41, 41, again));
  KT_CHECK(logits_err(la, again, 512) < 1e-5);
  /* Bad input is refused before anything runs. */
  int32_t bad = 512;
  it = (struct engine_item){b, &bad, 1, NULL, 0};
  KT_CHECK_EQ(engine_forward(e, &it, 1), KVD_EINVAL);
  KT_CHECK_EQ(engine_seq_len(b), 41);
  engine_seq_free(e, b);
  struct kv_pool_stats st;
  engine_kv_stats(e, &st);
  KT_CHECK_EQ(st.free, st.total);
  KT_CHECK(st.alloc_failures >= 1);
  engine_free(e);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

/* An arch/ model (synthetic weights of a modern family, references from llama.cpp: see
 * ../shared/models/arch/README.md) teacher-forced through the engine: at each of the first
 * ARCH_POSITIONS generated positions of the first case the reference's top-5 log-probs match
 * within tol, and the greedy token is the reference's wherever its top-1/top-2 gap is wide
 * enough for the choice to be meaningful. One case and 24 positions keep it quick on a CPU
 * device with these 50-150K vocabularies; e2e/test_arch.py runs every case through the daemon. */
#define ARCH_POSITIONS 24
static void check_arch_case(const char *name, int ci, double tol) {
  char rel[128];
  snprintf(rel, sizeof rel, "models/arch/%s.json", name);
  cJSON *ref = ref_json_load(rel);
  snprintf(rel, sizeof rel, "models/arch/%s.gguf", name);
  struct gguf_file *f = ref ? open_model(rel) : NULL;
  if (!ref || !f) {
    cJSON_Delete(ref);
    gguf_close(f);
    KT_SKIP("models/arch not found under KVD_SHARED_DIR");
  }
  struct engine *e = new_engine(f, &(struct engine_opts){.n_blocks = 64});
  KT_ASSERT(e);
  uint32_t n_vocab = engine_hparams(e)->n_vocab;
  float *logits = malloc(n_vocab * sizeof *logits), *lp = malloc(n_vocab * sizeof *lp);
  KT_ASSERT(logits && lp);
  double worst = 0;
  uint32_t checked = 0, greedy_checked = 0;
  const cJSON *c;
  c = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(ref, "cases"), ci);
  if (c) {
    uint32_t n_prompt, n_gen;
    int32_t *prompt = ref_json_ids(c, "prompt_ids", &n_prompt);
    int32_t *gen = ref_json_ids(c, "generated_ids", &n_gen);
    struct engine_seq *s = NULL;
    KT_ASSERT_OK(engine_seq_new(e, &s));
    KT_ASSERT_OK(feed(e, s, prompt, n_prompt, 64, logits));
    const cJSON *tops = cJSON_GetObjectItemCaseSensitive(c, "top_logprobs"), *entry;
    uint32_t j = 0;
    cJSON_ArrayForEach(entry, tops) {
      if (j >= n_gen || j >= ARCH_POSITIONS) break;
      sample_log_softmax(logits, lp, n_vocab);
      const cJSON *top = cJSON_GetObjectItemCaseSensitive(entry, "top");
      double v0 = cJSON_GetArrayItem(cJSON_GetArrayItem(top, 0), 1)->valuedouble;
      double v1 = cJSON_GetArrayItem(cJSON_GetArrayItem(top, 1), 1)->valuedouble;
      const cJSON *pair;
      cJSON_ArrayForEach(pair, top) {
        int32_t id = (int32_t)cJSON_GetArrayItem(pair, 0)->valuedouble;
        double d = fabs(lp[id] - cJSON_GetArrayItem(pair, 1)->valuedouble);
        if (d > worst) worst = d;
      }
      checked++;
      if (v0 - v1 > 0.05) {
        uint32_t best = 0;
        for (uint32_t i = 1; i < n_vocab; i++)
          if (logits[i] > logits[best]) best = i;
        KT_CHECK_MSG((int32_t)best == gen[j], "%s: step %u: greedy %u, reference %d", name, j, best,
                     gen[j]);
        greedy_checked++;
      }
      /* Teacher forcing: the reference's token goes in, whatever ours would have been. */
      KT_ASSERT_OK(feed(e, s, &gen[j], 1, 1, logits));
      j++;
    }
    engine_seq_free(e, s);
    free(prompt);
    free(gen);
  }
  kt_log("%s case %d: max |d logprob| %.3g over %u positions, %u greedy choices checked", name, ci,
         worst, checked, greedy_checked);
  KT_CHECK(checked > 0 && greedy_checked > 0);
  KT_CHECK_MSG(worst < tol, "%s: max |d logprob| %.3g", name, worst);
  free(logits);
  free(lp);
  engine_free(e);
  gguf_close(f);
  cJSON_Delete(ref);
}

static void check_arch(const char *name, double tol) {
  check_arch_case(name, 0, tol);
}

/* Llama 3.1/3.2: RoPE scaling carried by the rope_freqs.weight tensor (per-pair divisors). */
KT_TEST(llama3_rope_freqs_matches_llama_cpp) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  check_arch("llama3", 2e-2);
  FIXTURE_CHECK_VALIDATION();
}

/* Qwen3: per-head q/k RMSNorm, head size 64 where n_embd / n_head is 32. */
KT_TEST(qwen3_head_norms_and_decoupled_head_size_match_llama_cpp) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  check_arch("qwen3", 2e-2);
  FIXTURE_CHECK_VALIDATION();
}

/* Gemma 3: sqrt(n_embd) embedding scale, GeGLU, post-norms, q/k norms, one KV head; the third
 * case's 205-token prompt runs five of the six layers past their 64-position window, while the
 * global layer rotates with its own base and linear x8 scaling. */
KT_TEST(gemma3_windows_geglu_and_post_norms_match_llama_cpp) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  check_arch_case("gemma3", 2, 2e-2);
  FIXTURE_CHECK_VALIDATION();
}

/* Phi-3: fused qkv and gate/up projections, rotary on 24 of 32 head dimensions. */
KT_TEST(phi3_fused_projections_and_partial_rotary_match_llama_cpp) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  check_arch("phi3", 2e-2);
  FIXTURE_CHECK_VALIDATION();
}

/* A 64-position sliding window on every layer, read past it by the third case (205 tokens). */
KT_TEST(mistral_sliding_window_matches_llama_cpp) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  check_arch_case("mistral_swa", 2, 2e-2);
  FIXTURE_CHECK_VALIDATION();
}

/* On a model whose every layer is windowed (mistral_swa: 64 positions), a long sequence that
 * gives back the blocks before its window gets bit-identical logits to one that keeps them all,
 * while holding a bounded number of blocks; the pool gets every block back at the end. */
KT_TEST(windowed_model_gives_back_blocks_outside_the_window) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = open_model("models/arch/mistral_swa.gguf");
  if (!f) KT_SKIP("models/arch/mistral_swa.gguf not found");
  struct engine *e = new_engine(f, &(struct engine_opts){.block_size = 16, .n_blocks = 48});
  KT_ASSERT(e);
  uint32_t n_vocab = engine_hparams(e)->n_vocab;
  float *la = malloc(n_vocab * 4), *lb = malloc(n_vocab * 4);
  int32_t toks[260];
  for (int i = 0; i < 260; i++)
    toks[i] = (int32_t)kt_rand_range(3, (int)n_vocab - 1);
  struct engine_seq *keep, *drop;
  KT_ASSERT(la && lb);
  KT_ASSERT_OK(engine_seq_new(e, &keep));
  KT_ASSERT_OK(engine_seq_new(e, &drop));
  uint32_t most = 0, done = 0;
  double worst = 0;
  /* A 100-token prefill, then steps of 1 to 9 tokens (drops land mid-step and on block edges):
   * 17 blocks kept by one sequence, at most 6 by the other. */
  while (done < 260) {
    uint32_t k = done == 0 ? 100 : (uint32_t)kt_rand_range(1, 9);
    if (k > 260 - done) k = 260 - done;
    KT_ASSERT_OK(feed(e, keep, toks + done, k, k, la));
    KT_ASSERT_OK(feed(e, drop, toks + done, k, k, lb));
    done += k;
    KT_ASSERT(engine_seq_drop_window(e, drop, UINT32_MAX) >= 0);
    KT_CHECK_EQ(engine_seq_drop_window(e, keep, 0), 0); /* keep_from 0: nothing goes */
    if (engine_seq_live_blocks(drop) > most) most = engine_seq_live_blocks(drop);
    worst = fmax(worst, logits_err(lb, la, n_vocab));
  }
  kt_log("window 64: at most %u blocks held (the other sequence %u); max logit difference %.3g",
         most, engine_seq_live_blocks(keep), worst);
  KT_CHECK(most <= 64 / 16 + 2);
  KT_CHECK_EQ(engine_seq_live_blocks(keep), 17);
  KT_CHECK(worst == 0);
  engine_seq_free(e, keep);
  engine_seq_free(e, drop);
  struct kv_pool_stats st;
  engine_kv_stats(e, &st);
  KT_CHECK_EQ(st.free + st.cached, st.total);
  free(la);
  free(lb);
  engine_free(e);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

/* ---- family switches without an llama.cpp reference: the engine against the CPU reference -- */

/* A variant of an arch/ file: every key copied (keys of src_arch renamed to arch's), tensors
 * whose name contains `drop` left out, then extra(w) adds keys and tensors. The bytes are in
 * *ret (free() after gguf_close of what was opened from them). */
struct variant {
  const char *src_arch, *arch;
  const char *drop[3]; /* substrings of tensor names to leave out; NULL ends the list */
  void (*extra)(struct gguf_writer *w, const struct gguf_file *src);
};

static struct gguf_file *open_variant(const char *rel, const struct variant *v, void **ret) {
  struct gguf_file *src = open_model(rel);
  if (!src) return NULL;
  struct gguf_writer *w;
  struct gguf_file *out = NULL;
  *ret = NULL;
  if (gguf_writer_new(&w) < 0) goto done;
  size_t sl = strlen(v->src_arch);
  int rc = 0;
  for (uint64_t i = 0; rc == 0 && i < src->n_kv; i++) {
    const struct gguf_kv *kv = &src->kv[i];
    char key[160];
    snprintf(key, sizeof key, "%.*s", (int)kv->key.len, kv->key.ptr);
    if (!strcmp(key, "general.architecture")) {
      rc = gguf_writer_add_str(w, key, v->arch);
      continue;
    }
    if (!strncmp(key, v->src_arch, sl) && key[sl] == '.') {
      char renamed[192];
      snprintf(renamed, sizeof renamed, "%s%s", v->arch, key + sl);
      rc = gguf_writer_add_value(w, renamed, &kv->value);
    } else {
      rc = gguf_writer_add_value(w, key, &kv->value);
    }
  }
  for (uint64_t i = 0; rc == 0 && i < src->n_tensors; i++) {
    const struct gguf_tensor *t = &src->tensors[i];
    char name[160];
    snprintf(name, sizeof name, "%.*s", (int)t->name.len, t->name.ptr);
    bool dropped = false;
    for (int d = 0; d < 3 && v->drop[d]; d++)
      dropped = dropped || strstr(name, v->drop[d]) != NULL;
    if (dropped) continue;
    rc = gguf_writer_add_tensor(w, name, t->n_dims, t->ne, t->type, t->data, t->nbytes);
  }
  if (rc == 0 && v->extra) v->extra(w, src);
  size_t size = 0;
  if (rc == 0 && gguf_writer_write_mem(w, ret, &size) == 0) {
    struct gguf_error gerr;
    if (gguf_open_memory(*ret, size, &out, &gerr) < 0) out = NULL;
  }
  gguf_writer_free(w);
done:
  gguf_close(src);
  return out;
}

/* Teacher-forces n random tokens through the engine and the CPU reference; the worst logit
 * error relative to the largest logit. */
static double engine_vs_ref(struct gguf_file *f, uint32_t n, uint32_t block_size) {
  struct model_ref *ref = NULL;
  struct model_error err = {{0}};
  /* The model's whole context, as the engine runs it: LongRoPE's factors depend on it. */
  if (model_ref_new(f, NULL, &ref, &err) < 0) {
    kt_log("reference: %s", err.msg);
    return INFINITY;
  }
  struct engine *e = new_engine(f, &(struct engine_opts){.block_size = block_size, .n_blocks = 64});
  uint32_t nv = model_ref_hparams(ref)->n_vocab;
  float *got = malloc(nv * 4), *want = malloc(nv * 4);
  struct engine_seq *s = NULL;
  double worst = e && got && want && engine_seq_new(e, &s) == 0 ? 0 : INFINITY;
  for (uint32_t pos = 0; s && pos < n && worst < INFINITY; pos++) {
    int32_t tok = (int32_t)kt_rand_range(3, (int)nv - 1);
    if (model_ref_forward(ref, (uint32_t)tok, pos, want) < 0 || feed(e, s, &tok, 1, 1, got) < 0)
      worst = INFINITY;
    else
      worst = fmax(worst, logits_err(got, want, nv));
  }
  if (s) engine_seq_free(e, s);
  engine_free(e);
  free(got);
  free(want);
  model_ref_free(ref);
  return worst;
}

/* gemma2 from gemma3's weights: no q/k norms, every other layer windowed (64), attention scores
 * soft-capped at 5 and logits at 3, tight enough for the caps to bend most values. */
static void gemma2_caps(struct gguf_writer *w, const struct gguf_file *src) {
  (void)src;
  gguf_writer_add_f32(w, "gemma2.attn_logit_softcapping", 5.0f);
  gguf_writer_add_f32(w, "gemma2.final_logit_softcapping", 3.0f);
}

/* llama3 with YaRN x4 over an original context of 64 (so the ramp covers real pairs) on top of
 * its rope_freqs factors. */
static void llama_yarn(struct gguf_writer *w, const struct gguf_file *src) {
  (void)src;
  gguf_writer_add_str(w, "llama.rope.scaling.type", "yarn");
  gguf_writer_add_f32(w, "llama.rope.scaling.factor", 4.0f);
  gguf_writer_add_u32(w, "llama.rope.scaling.original_context_length", 64);
}

/* phi3 with LongRoPE: short and long factor tensors (12 pairs of the 24 rotated dimensions) and
 * an attention factor; the context run (4096) is past the original 2048, so the long ones
 * apply. */
static void phi3_longrope(struct gguf_writer *w, const struct gguf_file *src) {
  (void)src;
  static float lf[12], sf[12];
  for (int i = 0; i < 12; i++) {
    lf[i] = 1.0f + (float)i * 0.7f;
    sf[i] = 1.0f + (float)(i % 3) * 0.1f;
  }
  uint64_t ne[1] = {12};
  gguf_writer_add_tensor(w, "rope_factors_long.weight", 1, ne, DTYPE_F32, lf, sizeof lf);
  gguf_writer_add_tensor(w, "rope_factors_short.weight", 1, ne, DTYPE_F32, sf, sizeof sf);
  gguf_writer_add_f32(w, "phi3.rope.scaling.attn_factor", 1.19f);
  gguf_writer_add_u32(w, "phi3.rope.scaling.original_context_length", 2048);
}

static void check_variant(const char *rel, const struct variant *v, uint32_t n, double tol) {
  void *bytes = NULL;
  struct gguf_file *f = open_variant(rel, v, &bytes);
  if (!f) {
    free(bytes);
    KT_SKIP("%s not found or not rewritable", rel);
  }
  struct model_weights *w = NULL;
  struct model_error err = {{0}};
  KT_ASSERT_MSG(model_weights_new(f, &w, &err) == 0, "%s as %s: %s", rel, v->arch, err.msg);
  model_weights_free(w);
  double worst = engine_vs_ref(f, n, 16);
  kt_log("%s as a %s variant: max logit error vs the CPU reference over %u positions %.3g", rel,
         v->arch, n, worst);
  KT_CHECK(worst < tol);
  gguf_close(f);
  free(bytes);
}

KT_TEST(gemma2_soft_capping_and_alternating_windows_match_the_reference) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct variant v = {"gemma3", "gemma2", {"attn_q_norm", "attn_k_norm", NULL}, gemma2_caps};
  check_variant("models/arch/gemma3.gguf", &v, 72, 1e-4);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(yarn_and_longrope_match_the_reference) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct variant yarn = {"llama", "llama", {NULL}, llama_yarn};
  check_variant("models/arch/llama3.gguf", &yarn, 24, 1e-4);
  struct variant longrope = {"phi3", "phi3", {NULL}, phi3_longrope};
  check_variant("models/arch/phi3.gguf", &longrope, 24, 1e-4);
  FIXTURE_CHECK_VALIDATION();
}

/* ---- KV types: f16, q8_0 and q4_0 blocks against a reference that rounds its cache alike ---- */

/* The engine storing K/V in type kt and the CPU reference rounding each cached row through the
 * same type (kv_format.c) compute the same logits up to where a K or V value lands within f32
 * noise of a rounding boundary of the format: the engine's f32 value and the reference's
 * (float64 sums) then round to neighbouring codes, one step apart, and that step stays in the
 * cache. So the bound is a fraction of what the type moves the logits from exact f32 KV (an
 * engine that stored or read the rows wrongly is off by the whole of it or more; f16's floor is
 * below); test_attn
 * checks the kernels exactly, on identical rows. */
static void check_kv_type(const char *rel, enum kv_type kt, uint32_t n, uint32_t block_size) {
  struct gguf_file *f = open_model(rel);
  if (!f) KT_SKIP("%s not found", rel);
  struct model_ref *ref = NULL, *exact = NULL;
  struct model_error err = {{0}};
  KT_ASSERT_OK(model_ref_new(f, &(struct model_ref_opts){.kv_type = kt}, &ref, &err));
  KT_ASSERT_OK(model_ref_new(f, NULL, &exact, &err));
  struct engine *e =
      new_engine(f, &(struct engine_opts){
                        .block_size = block_size, .n_blocks = n / block_size + 4, .kv_type = kt});
  KT_ASSERT(e);
  KT_CHECK_EQ(engine_kv_type(e), kt);
  uint32_t nv = model_ref_hparams(ref)->n_vocab;
  float *got = malloc(nv * 4), *want = malloc(nv * 4), *f32 = malloc(nv * 4);
  KT_ASSERT(got && want && f32);
  struct engine_seq *s;
  KT_ASSERT_OK(engine_seq_new(e, &s));
  double worst = 0, moved = 0;
  for (uint32_t pos = 0; pos < n; pos++) {
    int32_t tok = (int32_t)kt_rand_range(3, (int)nv - 1);
    KT_ASSERT_OK(model_ref_forward(ref, (uint32_t)tok, pos, want));
    KT_ASSERT_OK(model_ref_forward(exact, (uint32_t)tok, pos, f32));
    KT_ASSERT_OK(feed(e, s, &tok, 1, 1, got));
    worst = fmax(worst, logits_err(got, want, nv));
    moved = fmax(moved, logits_err(want, f32, nv));
  }
  kt_log("%s, KV %s, block %u: engine vs reference %.3g; the type moves logits by %.3g", rel,
         kv_type_name(kt), block_size, worst, moved);
  /* f16 moves logits by ~1e-3 in all, so one flipped half is a good part of it: there the floor
   * is 1e-3 (a misread half, or f32 bits taken for two halves, is off by orders more). */
  KT_CHECK(worst < fmax(kt == KV_F16 ? 1e-3 : 1e-4, 0.35 * moved));
  if (kt == KV_F32) KT_CHECK(moved == 0);
  if (kt != KV_F32) KT_CHECK(moved > 0); /* the rounding is really applied */
  /* Bytes per token: 2x, ~3.8x, ~7x fewer than f32 for head_dim >= 32 (kv_format.h). */
  uint64_t per_tok = engine_kv_bytes_per_token(e);
  kt_log("  %llu KV bytes per token", (unsigned long long)per_tok);
  engine_seq_free(e, s);
  engine_free(e);
  model_ref_free(ref);
  model_ref_free(exact);
  free(got), free(want), free(f32);
  gguf_close(f);
}

KT_TEST(every_kv_type_matches_a_reference_rounding_alike) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  static const uint32_t blocks[] = {1, 7, 16, 64};
  for (int t = 0; t < KV_TYPE_COUNT; t++)
    for (int b = 0; b < 2; b++)
      check_kv_type("models/stories260K.gguf", (enum kv_type)t, 70, blocks[(t + 2 * b) % 4]);
  check_kv_type("models/arch/qwen3.gguf", KV_Q8_0, 20, 16); /* head_dim 64: groups of 32 */
  check_kv_type("models/arch/gemma3.gguf", KV_Q4_0, 20, 7);
  check_kv_type("models/arch/phi3.gguf", KV_F16, 20, 16);
  FIXTURE_CHECK_VALIDATION();
}

/* What each KV type costs in accuracy on stories260K, over a 160-token greedy text teacher-forced
 * against f32 KV (kvacc.c; bench_kv measures 512 tokens for BENCHMARKS.md: mean KL 4e-6 f16,
 * 3e-3 q8_0, 0.7 q4_0, whose 8-value heads are the worst case for 4-bit groups). The bounds are
 * those measurements with a margin of about 3x. */
KT_TEST(kv_type_accuracy_stays_within_measured_bounds) {
  FIXTURE_DEVICE(dev);
  struct gguf_file *f = open_model("models/stories260K.gguf");
  if (!f) KT_SKIP("stories260K.gguf not found");
  int32_t prompt[8] = {1, 403, 407, 261, 378, 300, 422, 293}, text[160];
  int n = kvacc_text(dev, f, prompt, 8, text, 160);
  KT_ASSERT(n > 100);
  static const struct {
    enum kv_type t;
    double max_mean_kl, min_top1, max_ppl_ratio;
  } bounds[] = {
      {KV_F16, 1e-4, 0.99, 1.002},
      {KV_Q8_0, 0.02, 0.90, 1.05},
      {KV_Q4_0, 2.0, 0.40, 4.0},
  };
  for (size_t i = 0; i < sizeof bounds / sizeof bounds[0]; i++) {
    struct kvacc_result r;
    KT_ASSERT_OK(kvacc_measure(dev, f, bounds[i].t, text, (uint32_t)n, &r));
    kt_log("KV %s over %u positions: mean KL %.3g (max %.3g), top-1 %.1f%%, ppl %.4f -> %.4f",
           kv_type_name(bounds[i].t), r.n, r.mean_kl, r.max_kl, 100 * r.top1, r.ppl_f32,
           r.ppl_type);
    KT_CHECK(r.mean_kl > 0); /* the type is really in use */
    KT_CHECK(r.mean_kl < bounds[i].max_mean_kl);
    KT_CHECK(r.top1 >= bounds[i].min_top1);
    KT_CHECK(r.ppl_type / r.ppl_f32 < bounds[i].max_ppl_ratio);
  }
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}
