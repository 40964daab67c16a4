/* The CPU reference forward pass: its operators on cases with known answers, then whole models
 * against the greedy references in ../shared/models (stories260K.reference.json and
 * quant/reference.json), which an independent float64 implementation produced. */
#include "kt.h"
#include "kvd_error.h"

#include "arch.h"
#include "gguf.h"
#include "gguf_write.h"
#include "ref.h"
#include "ref_ops.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- operators ----------------------------------------------------------------------------- */

KT_TEST(rmsnorm_scales_to_unit_rms) {
  float x[16], w[16], out[16];
  for (int i = 0; i < 16; i++) {
    x[i] = i % 2 ? 3.0f : -3.0f; /* rms 3 */
    w[i] = (float)i;
  }
  ref_rmsnorm(out, x, w, 16, 0.0f);
  for (int i = 0; i < 16; i++)
    KT_CHECK(fabsf(out[i] - (i % 2 ? 1.0f : -1.0f) * w[i]) < 1e-6f);
  /* eps keeps a zero vector finite. */
  float z[4] = {0}, ones[4] = {1, 1, 1, 1};
  ref_rmsnorm(z, z, ones, 4, 1e-5f);
  for (int i = 0; i < 4; i++)
    KT_CHECK(z[i] == 0.0f);
}

KT_TEST(matvec_dequantizes_rows_like_the_whole_matrix) {
  enum { N_OUT = 7, N_IN = 64 };
  float w[N_OUT * N_IN], x[N_IN], want[N_OUT], got[N_OUT], row[N_IN];
  uint16_t w16[N_OUT * N_IN];
  kt_rand_fill(w, N_OUT * N_IN, -1, 1);
  kt_rand_fill(x, N_IN, -1, 1);
  for (int i = 0; i < N_OUT * N_IN; i++) {
    w16[i] = dtype_f32_to_f16(w[i]);
    w[i] = dtype_f16_to_f32(w16[i]);
  }
  ref_matvec_f32(want, w, x, N_OUT, N_IN);
  KT_ASSERT_OK(ref_matvec(got, DTYPE_F16, w16, x, N_OUT, N_IN, row));
  for (int r = 0; r < N_OUT; r++)
    KT_CHECK(got[r] == want[r]);
  /* And against a plain double sum. */
  for (int r = 0; r < N_OUT; r++) {
    double s = 0;
    for (int c = 0; c < N_IN; c++)
      s += (double)w[r * N_IN + c] * x[c];
    KT_CHECK(want[r] == (float)s);
  }
  /* A row of 33 values is not a whole number of q8_0 blocks (32 values each). */
  KT_CHECK(ref_matvec(got, DTYPE_Q8_0, w16, x, 1, 33, row) < 0);
}

KT_TEST(softmax_is_stable_and_normalized) {
  float x[5] = {1000.0f, 1001.0f, 999.0f, -1e30f, 1000.0f};
  ref_softmax(x, 5);
  double sum = 0;
  for (int i = 0; i < 5; i++) {
    KT_CHECK(isfinite(x[i]));
    sum += x[i];
  }
  KT_CHECK(fabs(sum - 1.0) < 1e-6);
  KT_CHECK(x[3] == 0.0f);
  KT_CHECK(x[0] == x[4]);
  double e = exp(1.0), want1 = e / (2.0 + e + exp(-1.0));
  KT_CHECK(fabs(x[1] - want1) < 1e-7);
  float one = -5.0f;
  ref_softmax(&one, 1);
  KT_CHECK(one == 1.0f);
}

KT_TEST(swiglu_and_add) {
  float g[4] = {0.0f, 1.0f, -2.0f, 10.0f}, u[4] = {5.0f, 2.0f, 3.0f, -1.0f}, out[4];
  ref_swiglu(out, g, u, 4);
  for (int i = 0; i < 4; i++) {
    double want = g[i] / (1.0 + exp(-(double)g[i])) * u[i];
    KT_CHECK(fabs(out[i] - want) < 1e-6 * fmax(1.0, fabs(want)));
  }
  ref_add(out, u, 4);
  KT_CHECK(fabsf(out[0] - 5.0f) < 1e-6f);
}

KT_TEST(rope_rotates_the_right_pairs) {
  /* One head of 6 dims, rotating the first 4; pos 1, base 100: pair 0 turns by 1 rad, pair 1 by
   * 100^(-1/2) = 0.1 rad. */
  const float in[6] = {1, 2, 3, 4, 5, 6};
  float x[6];
  uint32_t pos = 1;
  memcpy(x, in, sizeof x);
  ref_rope(x, 1, 1, 6, 4, &pos, MODEL_ROPE_NORMAL, 100.0f, 1.0f, NULL);
  double c0 = cos(1.0), s0 = sin(1.0), c1 = cos(0.1), s1 = sin(0.1);
  KT_CHECK(fabs(x[0] - (1 * c0 - 2 * s0)) < 1e-6 && fabs(x[1] - (1 * s0 + 2 * c0)) < 1e-6);
  KT_CHECK(fabs(x[2] - (3 * c1 - 4 * s1)) < 1e-6 && fabs(x[3] - (3 * s1 + 4 * c1)) < 1e-6);
  KT_CHECK(x[4] == 5 && x[5] == 6);

  memcpy(x, in, sizeof x);
  ref_rope(x, 1, 1, 6, 4, &pos, MODEL_ROPE_NEOX, 100.0f, 1.0f, NULL);
  KT_CHECK(fabs(x[0] - (1 * c0 - 3 * s0)) < 1e-6 && fabs(x[2] - (1 * s0 + 3 * c0)) < 1e-6);
  KT_CHECK(fabs(x[1] - (2 * c1 - 4 * s1)) < 1e-6 && fabs(x[3] - (2 * s1 + 4 * c1)) < 1e-6);
  KT_CHECK(x[4] == 5 && x[5] == 6);

  /* Position 0 is the identity. */
  pos = 0;
  memcpy(x, in, sizeof x);
  ref_rope(x, 1, 1, 6, 6, &pos, MODEL_ROPE_NORMAL, 10000.0f, 1.0f, NULL);
  KT_CHECK(memcmp(x, in, sizeof x) == 0);
}

KT_TEST(rope_per_token_positions_and_linear_scaling) {
  /* Three tokens of two heads; each token at its own position. */
  enum { T = 3, H = 2, D = 8 };
  float x[T * H * D], one[H * D];
  uint32_t pos[T] = {5, 0, 17};
  kt_rand_fill(x, T * H * D, -1, 1);
  float orig[T * H * D];
  memcpy(orig, x, sizeof x);
  ref_rope(x, T, H, D, D, pos, MODEL_ROPE_NEOX, 10000.0f, 1.0f, NULL);
  for (int t = 0; t < T; t++) {
    memcpy(one, orig + t * H * D, sizeof one);
    ref_rope(one, 1, H, D, D, &pos[t], MODEL_ROPE_NEOX, 10000.0f, 1.0f, NULL);
    KT_CHECK(memcmp(one, x + t * H * D, sizeof one) == 0);
  }
  /* Linear scaling by 4: position 8 turns like position 2 unscaled. */
  uint32_t p8 = 8, p2 = 2;
  float a[D], b[D];
  kt_rand_fill(a, D, -1, 1);
  memcpy(b, a, sizeof a);
  ref_rope(a, 1, 1, D, D, &p8, MODEL_ROPE_NORMAL, 10000.0f, 0.25f, NULL);
  ref_rope(b, 1, 1, D, D, &p2, MODEL_ROPE_NORMAL, 10000.0f, 1.0f, NULL);
  KT_CHECK(memcmp(a, b, sizeof a) == 0);
}

KT_TEST(attention_groups_query_heads_onto_kv_heads) {
  /* 4 query heads over 2 kv heads of dim 4, 3 cached positions. */
  enum { NH = 4, NKV = 2, HD = 4, NP = 3 };
  float q[NH * HD], k[NP * NKV * HD], v[NP * NKV * HD], out[NH * HD], scores[NP];
  kt_rand_fill(q, NH * HD, -1, 1);
  kt_rand_fill(v, NP * NKV * HD, -1, 1);
  /* Identical keys: every position weighs the same, so each head returns its kv head's mean v. */
  for (int p = 0; p < NP; p++)
    for (int i = 0; i < NKV * HD; i++)
      k[p * NKV * HD + i] = (float)i;
  ref_attention_one(out, q, k, v, NP, NH, NKV, HD, scores);
  for (int h = 0; h < NH; h++)
    for (int d = 0; d < HD; d++) {
      int kvh = h / 2;
      double mean = 0;
      for (int p = 0; p < NP; p++)
        mean += v[p * NKV * HD + kvh * HD + d] / 3.0;
      KT_CHECK(fabs(out[h * HD + d] - mean) < 1e-6);
    }
  /* One position: the output is that position's v, whatever the scores. */
  ref_attention_one(out, q, k, v, 1, NH, NKV, HD, scores);
  for (int h = 0; h < NH; h++)
    KT_CHECK(memcmp(out + h * HD, v + (h / 2) * HD, HD * sizeof(float)) == 0);
  /* A key aligned with the query dominates when scaled up. */
  for (int i = 0; i < NP * NKV * HD; i++)
    k[i] = 0;
  for (int d = 0; d < HD; d++)
    k[1 * NKV * HD + 0 * HD + d] = 100.0f * q[d];
  ref_attention_one(out, q, k, v, NP, NH, NKV, HD, scores);
  for (int d = 0; d < HD; d++)
    KT_CHECK(fabsf(out[d] - v[1 * NKV * HD + d]) < 1e-3f);
}

/* ---- helpers for whole models -------------------------------------------------------------- */

static struct gguf_file *open_shared(const char *rel) {
  const char *path = kt_shared_path(rel);
  if (!path) return NULL;
  struct gguf_file *f = NULL;
  struct gguf_error gerr = {0};
  int rc = gguf_open(path, &f, &gerr);
  if (rc < 0) {
    kt__fail(__FILE__, __LINE__, "gguf_open(%s): %s: %s", rel, kvd_strerror(rc), gerr.msg);
    return NULL;
  }
  return f;
}

#define OPEN_OR_SKIP(f, rel)                                                                       \
  struct gguf_file *f = open_shared(rel);                                                          \
  if (!f) {                                                                                        \
    if (kt__failed()) return;                                                                      \
    KT_SKIP("%s not found under KVD_SHARED_DIR", rel);                                             \
  }

static cJSON *load_json(const char *rel) {
  const char *path = kt_shared_path(rel);
  if (!path) return NULL;
  FILE *fp = fopen(path, "rb");
  if (!fp) return NULL;
  char *text = NULL;
  size_t len = 0;
  FILE *mem = open_memstream(&text, &len);
  char buf[65536];
  size_t n;
  while (mem && (n = fread(buf, 1, sizeof buf, fp)) > 0)
    fwrite(buf, 1, n, mem);
  fclose(fp);
  if (!mem) return NULL;
  fclose(mem);
  cJSON *j = cJSON_Parse(text);
  free(text);
  return j;
}

/* An integer array of a JSON object as uint32s (malloc'd; *n its length). */
static uint32_t *json_ids(const cJSON *obj, const char *key, size_t *n) {
  const cJSON *a = cJSON_GetObjectItemCaseSensitive(obj, key);
  *n = (size_t)cJSON_GetArraySize(a);
  uint32_t *ids = malloc((*n ? *n : 1) * sizeof *ids);
  size_t i = 0;
  const cJSON *e;
  cJSON_ArrayForEach(e, a) ids[i++] = (uint32_t)e->valuedouble;
  return ids;
}

/* Logits seen during greedy decoding, one row per generated token. */
struct capture {
  size_t n, cap, n_vocab;
  float *logits; /* (cap, n_vocab) */
  uint32_t *pos; /* (cap) */
};

static void capture_fn(void *ud, uint32_t pos, const float *logits, size_t n_vocab) {
  struct capture *c = ud;
  if (c->n == c->cap) return;
  c->n_vocab = n_vocab;
  memcpy(c->logits + c->n * n_vocab, logits, n_vocab * sizeof(float));
  c->pos[c->n++] = pos;
}

static void log_softmax(const float *x, size_t n, double *out) {
  double max = x[0], sum = 0;
  for (size_t i = 1; i < n; i++)
    max = fmax(max, x[i]);
  for (size_t i = 0; i < n; i++)
    sum += exp((double)x[i] - max);
  double lse = max + log(sum);
  for (size_t i = 0; i < n; i++)
    out[i] = (double)x[i] - lse;
}

struct case_result {
  bool ok;         /* ids equal and every value within tolerance */
  double max_err;  /* largest error of a compared value */
  size_t n_values; /* how many were compared */
};

/* Runs one reference case (an element of "cases") on model: greedy from prompt_ids for steps
 * positions, then compares the ids and, per generated position, the listed top entries: logits
 * (key "top_logits", error relative to max(|want|, 1)) or log-probabilities ("top_logprobs",
 * absolute error). tol bounds the error. */
static struct case_result run_case(struct model_ref *r, const cJSON *c, const char *top_key,
                                   double tol, const char *label) {
  struct case_result res = {.ok = false};
  size_t n_prompt, n_want;
  uint32_t *prompt = json_ids(c, "prompt_ids", &n_prompt);
  uint32_t *want = json_ids(c, "generated_ids", &n_want);
  int steps = cJSON_GetObjectItemCaseSensitive(c, "steps")->valueint;
  /* steps counts positions like llama2.c: the prompt, then one new token per position. */
  size_t max_new = (size_t)steps - n_prompt + 1;
  size_t n_vocab = model_ref_hparams(r)->n_vocab;
  struct capture cap = {.cap = max_new, .n_vocab = n_vocab};
  cap.logits = malloc(max_new * n_vocab * sizeof(float));
  cap.pos = malloc(max_new * sizeof(uint32_t));
  uint32_t *got = malloc(max_new * sizeof(uint32_t));
  double *lp = malloc(n_vocab * sizeof(double));
  if (!cap.logits || !cap.pos || !got || !lp) goto out;

  int n_got = model_ref_greedy(r, prompt, n_prompt, max_new, got, capture_fn, &cap);
  if (n_got < 0) {
    kt_log("%s: greedy failed: %s", label, kvd_strerror(n_got));
    goto out;
  }
  bool ids_ok = (size_t)n_got == n_want;
  for (size_t i = 0; ids_ok && i < n_want; i++)
    ids_ok = got[i] == want[i];
  if (!ids_ok) {
    size_t i = 0;
    while (i < n_want && i < (size_t)n_got && got[i] == want[i])
      i++;
    kt_log("%s: %d ids generated, %zu expected, first difference at %zu", label, n_got, n_want, i);
  }

  bool vals_ok = true;
  size_t k = 0;
  const cJSON *entry;
  cJSON_ArrayForEach(entry, cJSON_GetObjectItemCaseSensitive(c, top_key)) {
    if (k >= cap.n) {
      vals_ok = false;
      break;
    }
    uint32_t pos = (uint32_t)cJSON_GetObjectItemCaseSensitive(entry, "pos")->valueint;
    if (pos != cap.pos[k]) vals_ok = false;
    const float *logits = cap.logits + k * n_vocab;
    bool logprobs = strcmp(top_key, "top_logprobs") == 0;
    if (logprobs) log_softmax(logits, n_vocab, lp);
    const cJSON *pair;
    cJSON_ArrayForEach(pair, cJSON_GetObjectItemCaseSensitive(entry, "top")) {
      uint32_t id = (uint32_t)cJSON_GetArrayItem(pair, 0)->valuedouble;
      double want_v = cJSON_GetArrayItem(pair, 1)->valuedouble;
      double err =
          logprobs ? fabs(lp[id] - want_v) : fabs(logits[id] - want_v) / fmax(fabs(want_v), 1.0);
      if (err > res.max_err) res.max_err = err;
      if (!(err <= tol)) vals_ok = false;
      res.n_values++;
    }
    k++;
  }
  res.ok = ids_ok && vals_ok;
out:
  free(prompt);
  free(want);
  free(cap.logits);
  free(cap.pos);
  free(got);
  free(lp);
  return res;
}

static int new_ref(struct gguf_file *f, const struct model_ref_opts *opts, struct model_ref **r) {
  struct model_error err = {{0}};
  int rc = model_ref_new(f, opts, r, &err);
  if (rc < 0) kt_log("model_ref_new: %s: %s", kvd_strerror(rc), err.msg);
  return rc;
}

/* ---- stories260K against stories260K.reference.json ---------------------------------------- */

/* Every case of the reference on one file; the worst error over all of them. */
static void check_stories(const char *rel, double tol) {
  cJSON *ref = load_json("models/stories260K.reference.json");
  if (!ref) KT_SKIP("models/stories260K.reference.json not found or unreadable");
  struct gguf_file *f = open_shared(rel);
  if (!f) {
    cJSON_Delete(ref);
    if (!kt__failed()) KT_SKIP("%s not found", rel);
    return;
  }
  struct model_ref *r = NULL;
  if (new_ref(f, NULL, &r) == 0) {
    double worst = 0;
    size_t n_values = 0, n_cases = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(ref, "cases")) {
      char label[128];
      snprintf(label, sizeof label, "%s \"%s\"", rel,
               cJSON_GetObjectItemCaseSensitive(c, "prompt")->valuestring);
      struct case_result res = run_case(r, c, "top_logits", tol, label);
      if (!res.ok) kt__fail(__FILE__, __LINE__, "%s: max error %.3g", label, res.max_err);
      worst = fmax(worst, res.max_err);
      n_values += res.n_values;
      n_cases++;
    }
    KT_CHECK_EQ(n_cases, 3);
    kt_log("%s: %zu cases, %zu top-5 logits, max relative error %.3g", rel, n_cases, n_values,
           worst);
  } else {
    kt__fail(__FILE__, __LINE__, "cannot build the reference for %s", rel);
  }
  model_ref_free(r);
  gguf_close(f);
  cJSON_Delete(ref);
}

KT_TEST(stories260K_f32_matches_the_greedy_reference) {
  check_stories("models/stories260K.gguf", 1e-4);
}

/* The stored logits come from the F32 weights; rounding the matrices to f16 moves them by more
 * than 1e-4, so here the ids must agree and the logits only roughly. */
KT_TEST(stories260K_f16_matches_the_greedy_reference) {
  check_stories("models/stories260K-f16.gguf", 5e-3);
}

/* ---- every quantized file against quant/reference.json ------------------------------------- */

KT_TEST(quantized_files_match_their_references) {
  cJSON *ref = load_json("models/quant/reference.json");
  if (!ref) KT_SKIP("models/quant/reference.json not found or unreadable");
  size_t n_cases = 0;
  double worst = 0;
  const cJSON *c;
  cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(ref, "cases")) {
    char rel[256];
    const char *model = cJSON_GetObjectItemCaseSensitive(c, "model")->valuestring;
    snprintf(rel, sizeof rel, "models/%s", model);
    struct gguf_file *f = open_shared(rel);
    if (!f) {
      kt__fail(__FILE__, __LINE__, "%s listed in reference.json but not readable", rel);
      continue;
    }
    struct model_ref *r = NULL;
    if (new_ref(f, NULL, &r) == 0) {
      struct case_result res = run_case(r, c, "top_logprobs", 1e-4, model);
      if (!res.ok)
        kt__fail(__FILE__, __LINE__, "%s: max |log-prob error| %.3g", model, res.max_err);
      kt_log("%-32s %zu log-probs, max abs error %.3g", model, res.n_values, res.max_err);
      worst = fmax(worst, res.max_err);
    } else {
      kt__fail(__FILE__, __LINE__, "cannot build the reference for %s", model);
    }
    model_ref_free(r);
    gguf_close(f);
    n_cases++;
  }
  KT_CHECK_EQ(n_cases, 11);
  kt_log("%zu quantized files, max abs log-prob error %.3g", n_cases, worst);
  cJSON_Delete(ref);
}

/* ---- the model object ---------------------------------------------------------------------- */

static const uint32_t once_upon[] = {1, 403, 407, 261, 378, 432, 383, 286, 261, 376};
enum { N_ONCE = sizeof once_upon / sizeof once_upon[0] };

KT_TEST(streamed_weights_give_identical_logits) {
  OPEN_OR_SKIP(f, "models/quant/wide-synth-q4_k_m.gguf");
  struct model_ref *a = NULL, *b = NULL;
  struct model_ref_opts stream = {.n_ctx = 16, .stream_weights = true};
  struct model_ref_opts load = {.n_ctx = 16};
  if (new_ref(f, &load, &a) == 0 && new_ref(f, &stream, &b) == 0) {
    float la[512], lb[512];
    for (uint32_t p = 0; p < 6; p++) {
      KT_CHECK_EQ(model_ref_forward(a, once_upon[p], p, la), 0);
      KT_CHECK_EQ(model_ref_forward(b, once_upon[p], p, lb), 0);
      KT_CHECK(memcmp(la, lb, sizeof la) == 0);
    }
  } else {
    kt__fail(__FILE__, __LINE__, "model_ref_new failed");
  }
  model_ref_free(a);
  model_ref_free(b);
  gguf_close(f);
}

KT_TEST(reset_and_rewind_reproduce_logits) {
  OPEN_OR_SKIP(f, "models/stories260K.gguf");
  struct model_ref *r = NULL;
  struct model_ref_opts o = {.n_ctx = 32};
  if (new_ref(f, &o, &r) < 0) {
    gguf_close(f);
    KT_ASSERT_MSG(false, "model_ref_new failed");
  }
  static float first[N_ONCE][512];
  float l[512];
  for (uint32_t p = 0; p < N_ONCE; p++)
    KT_CHECK_EQ(model_ref_forward(r, once_upon[p], p, first[p]), 0);
  model_ref_reset(r);
  for (uint32_t p = 0; p < N_ONCE; p++) {
    KT_CHECK_EQ(model_ref_forward(r, once_upon[p], p, l), 0);
    KT_CHECK(memcmp(l, first[p], sizeof l) == 0);
  }
  /* Rewinding to position 3 recomputes from there; a different token there changes the logits. */
  KT_CHECK_EQ(model_ref_forward(r, once_upon[3], 3, l), 0);
  KT_CHECK(memcmp(l, first[3], sizeof l) == 0);
  KT_CHECK_EQ(model_ref_forward(r, once_upon[4], 4, l), 0);
  KT_CHECK(memcmp(l, first[4], sizeof l) == 0);
  KT_CHECK_EQ(model_ref_forward(r, 300, 3, l), 0);
  KT_CHECK(memcmp(l, first[3], sizeof l) != 0);
  /* No gaps: position 5 is not reachable after rewinding to 3. */
  KT_CHECK_EQ(model_ref_forward(r, 300, 5, l), KVD_EINVAL);
  KT_CHECK_EQ(model_ref_forward(r, 512, 4, l), KVD_EINVAL);
  model_ref_free(r);
  gguf_close(f);
}

KT_TEST(context_length_bounds_the_cache) {
  OPEN_OR_SKIP(f, "models/stories260K-f16.gguf");
  struct model_ref *r = NULL;
  struct model_ref_opts big = {.n_ctx = 513}; /* the file says 512 */
  struct model_error err = {{0}};
  KT_CHECK_EQ(model_ref_new(f, &big, &r, &err), KVD_E_CONTEXT);
  KT_CHECK(r == NULL);
  struct model_ref_opts small = {.n_ctx = 8};
  if (new_ref(f, &small, &r) < 0) {
    gguf_close(f);
    KT_ASSERT_MSG(false, "model_ref_new failed");
  }
  KT_CHECK_EQ(model_ref_n_ctx(r), 8);
  float l[512];
  for (uint32_t p = 0; p < 8; p++)
    KT_CHECK_EQ(model_ref_forward(r, 300, p, l), 0);
  KT_CHECK_EQ(model_ref_forward(r, 300, 8, l), KVD_E_CONTEXT);
  /* Greedy stops when the cache is full: 5 prompt positions leave room for 4 new tokens (the
   * last one is chosen at position 7 and never run). */
  uint32_t out[64];
  KT_CHECK_EQ(model_ref_greedy(r, once_upon, 5, 64, out, NULL, NULL), 4);
  KT_CHECK_EQ(out[0], 432);
  KT_CHECK_EQ(model_ref_greedy(r, once_upon, 9, 64, out, NULL, NULL), KVD_E_CONTEXT);
  KT_CHECK_EQ(model_ref_greedy(r, once_upon, 0, 64, out, NULL, NULL), KVD_EINVAL);
  model_ref_free(r);
  gguf_close(f);
}

/* ---- qwen2: NeoX RoPE and q/k/v biases ----------------------------------------------------- */

/* Row order that makes NeoX RoPE act like normal RoPE: within each head, the even dimensions
 * first, then the odd ones. Rotating the permuted q and k by halves rotates the same pairs as
 * the original by adjacent dims, and q·k is unchanged when both are permuted alike. */
static void permute_heads(float *dst, const float *src, size_t n_heads, size_t head_dim,
                          size_t row_len) {
  for (size_t h = 0; h < n_heads; h++)
    for (size_t i = 0; i < head_dim / 2; i++) {
      size_t base = h * head_dim;
      memcpy(dst + (base + i) * row_len, src + (base + 2 * i) * row_len, row_len * sizeof(float));
      memcpy(dst + (base + head_dim / 2 + i) * row_len, src + (base + 2 * i + 1) * row_len,
             row_len * sizeof(float));
    }
}

/* An F32 tensor of the same shape as t (1-D when ne[1] is 1), data from ptr. */
static int add_f32(struct gguf_writer *gw, const char *name, const uint64_t *ne, const void *ptr) {
  uint32_t n_dims = ne[1] > 1 ? 2 : 1;
  return gguf_writer_add_tensor(gw, name, n_dims, ne, DTYPE_F32, ptr,
                                ne[0] * ne[1] * sizeof(float));
}

/* stories260K (w, all F32) rewritten as arch with the given q/k/v biases (per layer: q_dim, then
 * kv_dim for k, then for v); for qwen2 the q and k rows and biases are permuted for NeoX. */
static int rebuild(const struct model_weights *w, const char *arch, const float *biases,
                   void **ret_data, size_t *ret_size) {
  const struct model_hparams *hp = &w->hp;
  bool neox = strcmp(arch, "qwen2") == 0;
  size_t d = hp->n_embd, hd = hp->head_dim, nh = hp->n_head, nkv = hp->n_head_kv;
  size_t q_dim = nh * hd, kv_dim = nkv * hd;
  /* This layer's q and k matrices and biases, rewritten. */
  float *wq = malloc((q_dim * d + kv_dim * d + q_dim + kv_dim) * sizeof(float));
  if (!wq) return KVD_ENOMEM;
  float *wk = wq + q_dim * d, *bq = wk + kv_dim * d, *bk = bq + q_dim;
  struct gguf_writer *gw = NULL;
  char key[96], name[64];
  int rc = gguf_writer_new(&gw);
  if (rc < 0) goto out;
#define TRY(call)                                                                                  \
  do {                                                                                             \
    if ((rc = (call)) < 0) goto out;                                                               \
  } while (0)
#define KEY(suffix) (snprintf(key, sizeof key, "%s." suffix, arch), key)
  TRY(gguf_writer_add_str(gw, "general.architecture", arch));
  TRY(gguf_writer_add_u32(gw, KEY("embedding_length"), hp->n_embd));
  TRY(gguf_writer_add_u32(gw, KEY("block_count"), hp->n_layer));
  TRY(gguf_writer_add_u32(gw, KEY("attention.head_count"), hp->n_head));
  TRY(gguf_writer_add_u32(gw, KEY("attention.head_count_kv"), hp->n_head_kv));
  TRY(gguf_writer_add_u32(gw, KEY("feed_forward_length"), hp->n_ff));
  TRY(gguf_writer_add_u32(gw, KEY("context_length"), 64));
  TRY(gguf_writer_add_u32(gw, KEY("vocab_size"), hp->n_vocab));
  TRY(gguf_writer_add_f32(gw, KEY("attention.layer_norm_rms_epsilon"), hp->rms_eps));
#undef KEY
  TRY(add_f32(gw, "token_embd.weight", w->token_embd->ne, w->token_embd->data));
  TRY(add_f32(gw, "output_norm.weight", w->output_norm->ne, w->output_norm->data));
  TRY(add_f32(gw, "output.weight", w->output->ne, w->output->data));
  for (uint32_t il = 0; il < hp->n_layer; il++) {
    const struct model_layer *l = &w->layers[il];
    const float *b = biases + il * (q_dim + 2 * kv_dim);
    if (neox) {
      permute_heads(wq, l->attn_q->data, nh, hd, d);
      permute_heads(wk, l->attn_k->data, nkv, hd, d);
      permute_heads(bq, b, nh, hd, 1);
      permute_heads(bk, b + q_dim, nkv, hd, 1);
    } else {
      memcpy(wq, l->attn_q->data, q_dim * d * sizeof(float));
      memcpy(wk, l->attn_k->data, kv_dim * d * sizeof(float));
      memcpy(bq, b, q_dim * sizeof(float));
      memcpy(bk, b + q_dim, kv_dim * sizeof(float));
    }
    const uint64_t ne_q[2] = {q_dim, 1}, ne_kv[2] = {kv_dim, 1};
#define NAME(suffix) (snprintf(name, sizeof name, "blk.%u." suffix, il), name)
    TRY(add_f32(gw, NAME("attn_norm.weight"), l->attn_norm->ne, l->attn_norm->data));
    TRY(add_f32(gw, NAME("attn_q.weight"), l->attn_q->ne, wq));
    TRY(add_f32(gw, NAME("attn_k.weight"), l->attn_k->ne, wk));
    TRY(add_f32(gw, NAME("attn_v.weight"), l->attn_v->ne, l->attn_v->data));
    TRY(add_f32(gw, NAME("attn_q.bias"), ne_q, bq));
    TRY(add_f32(gw, NAME("attn_k.bias"), ne_kv, bk));
    TRY(add_f32(gw, NAME("attn_v.bias"), ne_kv, b + q_dim + kv_dim));
    TRY(add_f32(gw, NAME("attn_output.weight"), l->attn_output->ne, l->attn_output->data));
    TRY(add_f32(gw, NAME("ffn_norm.weight"), l->ffn_norm->ne, l->ffn_norm->data));
    TRY(add_f32(gw, NAME("ffn_gate.weight"), l->ffn_gate->ne, l->ffn_gate->data));
    TRY(add_f32(gw, NAME("ffn_up.weight"), l->ffn_up->ne, l->ffn_up->data));
    TRY(add_f32(gw, NAME("ffn_down.weight"), l->ffn_down->ne, l->ffn_down->data));
#undef NAME
  }
#undef TRY
  rc = gguf_writer_write_mem(gw, ret_data, ret_size);
out:
  gguf_writer_free(gw);
  free(wq);
  return rc;
}

KT_TEST(qwen2_neox_with_biases_equals_llama_with_biases) {
  OPEN_OR_SKIP(f, "models/stories260K.gguf");
  struct model_error err = {{0}};
  struct model_weights *w = NULL;
  void *lb = NULL, *qb = NULL;
  size_t lb_size, qb_size;
  struct gguf_file *lf = NULL, *qf = NULL;
  struct model_ref *plain = NULL, *lr = NULL, *qr = NULL;
  struct gguf_error gerr;
  float *biases = NULL;
  if (model_weights_new(f, &w, &err) < 0) {
    kt__fail(__FILE__, __LINE__, "%s", err.msg);
    goto out;
  }
  size_t n_bias = w->hp.n_layer * (w->hp.n_embd + 2 * (size_t)w->hp.n_head_kv * w->hp.head_dim);
  biases = malloc(n_bias * sizeof(float));
  KT_ASSERT(biases != NULL);
  kt_rand_fill(biases, n_bias, -0.5f, 0.5f);
  if (rebuild(w, "llama", biases, &lb, &lb_size) < 0 ||
      rebuild(w, "qwen2", biases, &qb, &qb_size) < 0 ||
      gguf_open_memory(lb, lb_size, &lf, &gerr) < 0 ||
      gguf_open_memory(qb, qb_size, &qf, &gerr) < 0) {
    kt__fail(__FILE__, __LINE__, "could not build the rebuilt models");
    goto out;
  }
  struct model_ref_opts o = {.n_ctx = 16};
  if (new_ref(f, &o, &plain) < 0 || new_ref(lf, &o, &lr) < 0 || new_ref(qf, &o, &qr) < 0) {
    kt__fail(__FILE__, __LINE__, "model_ref_new failed");
    goto out;
  }
  KT_CHECK_EQ(model_ref_hparams(qr)->rope_mode, MODEL_ROPE_NEOX);
  double worst = 0, bias_effect = 0;
  for (uint32_t p = 0; p < N_ONCE; p++) {
    float l0[512], l1[512], l2[512];
    KT_CHECK_EQ(model_ref_forward(plain, once_upon[p], p, l0), 0);
    KT_CHECK_EQ(model_ref_forward(lr, once_upon[p], p, l1), 0);
    KT_CHECK_EQ(model_ref_forward(qr, once_upon[p], p, l2), 0);
    worst = fmax(worst, kt_max_rel_err(l2, l1, 512, 1.0));
    bias_effect = fmax(bias_effect, kt_max_rel_err(l1, l0, 512, 1.0));
  }
  kt_log("qwen2 vs llama: max relative logit difference %.3g; the biases move logits by %.3g",
         worst, bias_effect);
  KT_CHECK(worst < 1e-5);
  KT_CHECK(bias_effect > 1e-2);
out:
  model_ref_free(plain);
  model_ref_free(lr);
  model_ref_free(qr);
  gguf_close(lf);
  gguf_close(qf);
  free(lb);
  free(qb);
  free(biases);
  model_weights_free(w);
  gguf_close(f);
}

/* ---- the arch/ families against llama.cpp (../shared/models/arch/README.md) ----------------- */

/* Teacher-forces case `ci` of an arch/ reference through the CPU reference: the prompt, then at
 * every generated position the top-5 log-probs of `key` ("top_logprobs": llama.cpp's; or the
 * float64 cross-check's, for llama3_q8_0 whose llama.cpp numbers carry 8-bit activations) match
 * within tol, and the greedy token is the reference's wherever its top-1/top-2 gap exceeds 0.05.
 * The oracle the engine tests lean on, so every position of the case is checked. */
static void check_arch_ref(const char *name, int ci, bool crosscheck, double tol) {
  char rel[128];
  snprintf(rel, sizeof rel, "models/arch/%s.json", name);
  cJSON *ref = load_json(rel);
  if (!ref) KT_SKIP("%s not found under KVD_SHARED_DIR", rel);
  snprintf(rel, sizeof rel, "models/arch/%s.gguf", name);
  struct gguf_file *f = open_shared(rel);
  if (!f) {
    cJSON_Delete(ref);
    if (kt__failed()) return;
    KT_SKIP("%s not found", rel);
  }
  struct model_ref *r;
  KT_ASSERT_OK(new_ref(f, &(struct model_ref_opts){.n_ctx = 1024}, &r));
  size_t n_vocab = model_ref_hparams(r)->n_vocab;
  float *logits = malloc(n_vocab * sizeof *logits);
  double *lp = malloc(n_vocab * sizeof *lp);
  KT_ASSERT(logits && lp);
  const cJSON *c = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(ref, "cases"), ci);
  KT_ASSERT(c);
  size_t n_prompt, n_gen;
  uint32_t *prompt = json_ids(c, "prompt_ids", &n_prompt);
  uint32_t *gen = json_ids(c, "generated_ids", &n_gen);
  for (size_t i = 0; i < n_prompt; i++)
    KT_ASSERT_OK(model_ref_forward(r, prompt[i], (uint32_t)i, logits));
  const cJSON *src = crosscheck ? cJSON_GetObjectItemCaseSensitive(c, "float64_crosscheck") : c;
  const cJSON *entry;
  double worst = 0;
  size_t j = 0, greedy = 0;
  cJSON_ArrayForEach(entry, cJSON_GetObjectItemCaseSensitive(src, "top_logprobs")) {
    if (j >= n_gen) break;
    KT_CHECK_EQ((size_t)cJSON_GetObjectItemCaseSensitive(entry, "pos")->valueint, n_prompt - 1 + j);
    log_softmax(logits, n_vocab, lp);
    const cJSON *top = cJSON_GetObjectItemCaseSensitive(entry, "top"), *pair;
    cJSON_ArrayForEach(pair, top) {
      uint32_t id = (uint32_t)cJSON_GetArrayItem(pair, 0)->valuedouble;
      double d = fabs(lp[id] - cJSON_GetArrayItem(pair, 1)->valuedouble);
      if (d > worst) worst = d;
    }
    double gap = cJSON_GetArrayItem(cJSON_GetArrayItem(top, 0), 1)->valuedouble -
                 cJSON_GetArrayItem(cJSON_GetArrayItem(top, 1), 1)->valuedouble;
    if (gap > 0.05) {
      uint32_t best = (uint32_t)cJSON_GetArrayItem(cJSON_GetArrayItem(top, 0), 0)->valuedouble;
      size_t am = 0;
      for (size_t i = 1; i < n_vocab; i++)
        if (logits[i] > logits[am]) am = i;
      KT_CHECK_MSG(am == best, "%s case %d step %zu: argmax %zu, reference %u", name, ci, j, am,
                   best);
      greedy++;
    }
    KT_ASSERT_OK(model_ref_forward(r, gen[j], (uint32_t)(n_prompt + j), logits));
    j++;
  }
  kt_log("%s case %d: max |d logprob| %.3g over %zu positions (%zu greedy checks)", name, ci, worst,
         j, greedy);
  KT_CHECK(j == n_gen && greedy > 0);
  KT_CHECK_MSG(worst < tol, "%s: max |d logprob| %.3g", name, worst);
  free(prompt);
  free(gen);
  free(logits);
  free(lp);
  model_ref_free(r);
  gguf_close(f);
  cJSON_Delete(ref);
}

KT_TEST(arch_llama3_rope_freqs) {
  check_arch_ref("llama3", 0, false, 2e-2);
}

/* llama.cpp's Q8_0 path quantizes activations too; the float64 pass is exact. */
KT_TEST(arch_llama3_q8_0_against_the_float64_crosscheck) {
  check_arch_ref("llama3_q8_0", 0, true, 2e-3);
}

KT_TEST(arch_qwen2_and_qwen3) {
  check_arch_ref("qwen2", 0, false, 2e-2);
  check_arch_ref("qwen3", 0, false, 2e-2);
}

/* gemma3's third case (205 prompt tokens) runs well past its 64-position window on five of its
 * six layers. */
KT_TEST(arch_gemma3_windows_geglu_post_norms_and_two_ropes) {
  check_arch_ref("gemma3", 0, false, 2e-2);
  check_arch_ref("gemma3", 2, false, 2e-2);
}

KT_TEST(arch_phi3_fused_projections_and_partial_rotary) {
  check_arch_ref("phi3", 0, false, 2e-2);
}

/* Every layer windowed (64 positions); the third case's 205-token prompt is past it. */
KT_TEST(arch_mistral_sliding_window) {
  check_arch_ref("mistral_swa", 2, false, 2e-2);
}
