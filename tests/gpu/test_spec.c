/* Speculative decoding through the scheduler: with prompt-lookup drafts and with a draft model,
 * greedy output equals the references and decoding without drafts on every reference model,
 * seeded sampling is token-identical, the sampled distribution is the target's (chi-square), and
 * max_tokens, end-of-generation, cancellation, sessions and preemption in the middle of drafts
 * behave as without. */
#include "engine.h"
#include "gpu_fixture.h"
#include "kvd_error.h"
#include "ref_json.h"
#include "sample.h"
#include "sched_driver.h"
#include "scheduler.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const int32_t stories_eog[] = {1, 2};

/* The sanitizer build runs the same paths on less (tests/meson.build). */
static bool sanitized(void) {
  return getenv("KVD_SANITIZED") != NULL;
} /* BOS and EOS end a story (SOURCES.md) */

struct rig {
  struct gguf_file *f, *df;
  struct sched *s;
};

static struct engine *rig_engine(const char *rel, uint32_t n_blocks, struct gguf_file **f) {
  const char *path = kt_shared_path(rel);
  struct gguf_error gerr;
  if (!path || gguf_open(path, f, &gerr) < 0) return NULL;
  struct engine *e = NULL;
  struct model_error err = {{0}};
  int rc = engine_new(fixture_device(), *f,
                      &(struct engine_opts){.n_blocks = n_blocks, .max_logits = 96}, &e, &err);
  if (rc < 0) kt_log("%s: %s %s", rel, kvd_strerror(rc), err.msg);
  return rc < 0 ? NULL : e;
}

/* The target at rel with the draft model at draft_rel (NULL: none), n_blocks KV blocks each. */
static bool rig_open(struct rig *g, const char *rel, const char *draft_rel, uint32_t n_blocks) {
  *g = (struct rig){0};
  struct engine *e = rig_engine(rel, n_blocks, &g->f), *d = NULL;
  if (!e) return false;
  if (draft_rel && !(d = rig_engine(draft_rel, n_blocks, &g->df))) {
    engine_free(e);
    return false;
  }
  if (sched_new(e, &(struct sched_opts){.notify = drv_notify, .draft = d}, &g->s) < 0) {
    engine_free(e);
    engine_free(d);
    return false;
  }
  return true;
}

static void rig_close(struct rig *g) {
  sched_free(g->s);
  gguf_close(g->f);
  gguf_close(g->df);
}

static struct sched_req *req_greedy(const int32_t *ids, uint32_t n, uint32_t max_tokens,
                                    enum sched_spec spec) {
  struct sched_req *r;
  if (sched_req_new(ids, n, &r) < 0) return NULL;
  r->sp = (struct sample_params){.temperature = 0, .top_p = 1, .repeat_penalty = 1};
  r->max_tokens = max_tokens;
  r->spec = spec;
  r->eog = stories_eog;
  r->n_eog = 2;
  return r;
}

static const char *spec_name(enum sched_spec m) {
  static const char *n[] = {"auto", "off", "lookup", "draft"};
  return n[m];
}

/* Runs reqs to the end and frees them; outs[i] gets reqs[i]'s tokens. drafted/accepted (may be
 * NULL) get each request's totals. */
static void run_free(struct sched *s, struct sched_req **reqs, struct drv_out *outs, uint32_t n,
                     uint32_t *drafted, uint32_t *accepted) {
  for (uint32_t i = 0; i < n; i++)
    KT_ASSERT_OK(sched_submit(s, reqs[i]));
  drv_run(s, reqs, outs, n);
  for (uint32_t i = 0; i < n; i++) {
    if (drafted) drafted[i] = reqs[i]->draft_tokens;
    if (accepted) accepted[i] = reqs[i]->accepted_tokens;
    sched_req_free(reqs[i]);
  }
}

static uint32_t first_diff(const struct drv_out *a, const struct drv_out *b) {
  uint32_t n = a->n < b->n ? a->n : b->n;
  for (uint32_t i = 0; i < n; i++)
    if (a->ids[i] != b->ids[i]) return i;
  return a->n == b->n ? UINT32_MAX : n;
}

/* Every case of a greedy reference file whose cases name no model (stories) or name `model`,
 * run in every mode at once (continuous batching with drafts): each equals the reference. */
static void check_reference(struct rig *g, const cJSON *cases, const char *model,
                            uint32_t *drafted_by_mode, uint32_t *accepted_by_mode) {
  struct sched_req *reqs[16];
  struct drv_out *outs = calloc(16, sizeof *outs);
  int32_t *want[16] = {0};
  uint32_t n_want[16], n = 0;
  KT_ASSERT(outs);
  const cJSON *c;
  cJSON_ArrayForEach(c, cases) {
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(c, "model");
    if (model && (!cJSON_IsString(m) || strcmp(m->valuestring + 6, model) != 0)) continue;
    uint32_t n_prompt;
    int32_t *prompt = ref_json_ids(c, "prompt_ids", &n_prompt);
    int steps = cJSON_GetObjectItemCaseSensitive(c, "steps")->valueint;
    for (int mode = 0; mode < 4 && n < 16; mode++) {
      want[n] = ref_json_ids(c, "generated_ids", &n_want[n]);
      /* llama2.c counts steps as positions run: the last one still yields a token. */
      reqs[n] = req_greedy(prompt, n_prompt, (uint32_t)steps - n_prompt + 1, (enum sched_spec)mode);
      KT_ASSERT(reqs[n] && want[n]);
      n++;
    }
    free(prompt);
  }
  KT_ASSERT(n > 0);
  uint32_t drafted[16], accepted[16];
  run_free(g->s, reqs, outs, n, drafted, accepted);
  for (uint32_t i = 0; i < n; i++) {
    enum sched_spec mode = (enum sched_spec)(i % 4);
    uint32_t d = UINT32_MAX;
    for (uint32_t j = 0; j < n_want[i] && j < outs[i].n && d == UINT32_MAX; j++)
      if (outs[i].ids[j] != want[i][j]) d = j;
    KT_CHECK_MSG(outs[i].n == n_want[i] && d == UINT32_MAX,
                 "%s case %u (%s): %u tokens for %u, first difference at %u", model ? model : "",
                 i / 4, spec_name(mode), outs[i].n, n_want[i], d);
    KT_CHECK(accepted[i] <= drafted[i]);
    drafted_by_mode[mode] += drafted[i];
    accepted_by_mode[mode] += accepted[i];
    free(want[i]);
  }
  free(outs);
}

KT_TEST(stories_references_hold_in_every_mode_with_a_q4_0_draft_model) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  cJSON *ref = ref_json_load("models/stories260K.reference.json");
  struct rig g;
  if (!ref || !rig_open(&g, "models/stories260K.gguf", "models/quant/stories260K-q4_0.gguf", 128)) {
    cJSON_Delete(ref);
    KT_SKIP("models not found under KVD_SHARED_DIR");
  }
  uint32_t drafted[4] = {0}, accepted[4] = {0};
  check_reference(&g, cJSON_GetObjectItemCaseSensitive(ref, "cases"), NULL, drafted, accepted);
  for (int m = 0; m < 4; m++)
    kt_log("%-6s drafted %u, accepted %u", spec_name((enum sched_spec)m), drafted[m], accepted[m]);
  KT_CHECK_EQ(drafted[SCHED_SPEC_OFF], 0);
  KT_CHECK(accepted[SCHED_SPEC_LOOKUP] > 0);
  KT_CHECK(accepted[SCHED_SPEC_DRAFT] > 0 && accepted[SCHED_SPEC_DRAFT] < drafted[SCHED_SPEC_DRAFT]);
  struct sched_stats st;
  sched_get_stats(g.s, &st);
  KT_CHECK(st.has_draft && st.spec_drafted == st.lookup_drafted + st.draft_drafted);
  KT_CHECK_EQ(st.spec_accepted, (uint64_t)accepted[0] + accepted[1] + accepted[2] + accepted[3]);
  KT_CHECK_EQ(st.kv.used, 0);
  KT_CHECK_EQ(st.draft_kv.used, 0);
  rig_close(&g);
  cJSON_Delete(ref);
  FIXTURE_CHECK_VALIDATION();
}

/* The f16 file and every quantized file of quant/ as the target, stories260K (f32) drafting for
 * the stories files and the q4_K_M file for the wide synthetic ones. */
KT_TEST(every_quant_file_holds_its_reference_with_drafts) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  cJSON *ref = ref_json_load("models/quant/reference.json");
  if (!ref) KT_SKIP("quant/reference.json not found");
  const char *files[] = {"stories260K-q8_0.gguf",   "stories260K-q4_0.gguf",
                         "stories260K-q4_1.gguf",   "stories260K-q5_0.gguf",
                         "stories260K-q5_1.gguf",   "wide-synth-q4_k_m.gguf",
                         "wide-synth-q5_k_m.gguf",  "wide-synth-q6_k.gguf",
                         "wide-synth-q8_0.gguf",    "wide-synth-bf16.gguf",
                         "wide-synth-f16.gguf"};
  uint32_t drafted[4] = {0}, accepted[4] = {0};
  size_t n_files = sanitized() ? 2 : sizeof files / sizeof *files;
  for (size_t i = 0; i < n_files; i++) {
    char rel[128];
    snprintf(rel, sizeof rel, "models/quant/%s", files[i]);
    bool wide = strncmp(files[i], "wide", 4) == 0;
    struct rig g;
    KT_CHECK_MSG(rig_open(&g, rel,
                          wide ? "models/quant/wide-synth-q4_k_m.gguf" : "models/stories260K.gguf",
                          64),
                 "%s", rel);
    if (!g.s) continue;
    check_reference(&g, cJSON_GetObjectItemCaseSensitive(ref, "cases"), files[i], drafted,
                    accepted);
    rig_close(&g);
  }
  kt_log("lookup drafted %u accepted %u; draft model drafted %u accepted %u",
         drafted[SCHED_SPEC_LOOKUP], accepted[SCHED_SPEC_LOOKUP], drafted[SCHED_SPEC_DRAFT],
         accepted[SCHED_SPEC_DRAFT]);
  KT_CHECK(accepted[SCHED_SPEC_DRAFT] > 0);
  cJSON_Delete(ref);
  FIXTURE_CHECK_VALIDATION();
}

/* The arch/ families (random weights: near-ties are common) against decoding without drafts in
 * the same engine, up to the first position where that run's own top-1/top-2 gap is under 1e-3
 * (what float rounding between step shapes could flip): llama3 drafted by its q8_0 twin, the
 * others by themselves (a second engine of the same file). */
KT_TEST(arch_families_decode_the_same_with_drafts) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  const char *names[] = {"llama3", "mistral_swa", "qwen2", "qwen3", "gemma3", "phi3"};
  uint32_t compared = 0, n_gen = sanitized() ? 12 : 24;
  size_t n_names = sanitized() ? 2 : sizeof names / sizeof *names;
  for (size_t k = 0; k < n_names; k++) {
    char rel[96], drel[96], jrel[96];
    snprintf(rel, sizeof rel, "models/arch/%s.gguf", names[k]);
    snprintf(drel, sizeof drel, "models/arch/%s.gguf", k == 0 ? "llama3_q8_0" : names[k]);
    snprintf(jrel, sizeof jrel, "models/arch/%s.json", names[k]);
    cJSON *ref = ref_json_load(jrel);
    struct rig g;
    if (!ref || !rig_open(&g, rel, drel, 64)) {
      cJSON_Delete(ref);
      KT_SKIP("models/arch not found under KVD_SHARED_DIR");
    }
    const cJSON *c = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(ref, "cases"), 0);
    uint32_t n_prompt;
    int32_t *prompt = ref_json_ids(c, "prompt_ids", &n_prompt);
    /* The prompt once more after itself: lookup drafts have something to copy. */
    int32_t *twice = malloc(2 * n_prompt * sizeof *twice);
    KT_ASSERT(prompt && twice);
    memcpy(twice, prompt, n_prompt * sizeof *twice);
    memcpy(twice + n_prompt, prompt + 1, (n_prompt - 1) * sizeof *twice);
    struct sched_req *reqs[3];
    struct drv_out *outs = calloc(3, sizeof *outs);
    KT_ASSERT(outs);
    for (int m = 0; m < 3; m++) {
      reqs[m] = req_greedy(twice, 2 * n_prompt - 1, n_gen,
                           m == 0 ? SCHED_SPEC_OFF : m == 1 ? SCHED_SPEC_LOOKUP : SCHED_SPEC_DRAFT);
      KT_ASSERT(reqs[m]);
      reqs[m]->n_eog = 0;
      reqs[m]->logprobs = 2;
    }
    uint32_t drafted[3], accepted[3];
    run_free(g.s, reqs, outs, 3, drafted, accepted);
    uint32_t upto = outs[0].n;
    for (uint32_t i = 0; i < outs[0].n; i++)
      if (outs[0].gap[i] < 1e-3f) {
        upto = i + 1; /* the token at a near-tie may differ, and everything after it */
        break;
      }
    for (int m = 1; m < 3; m++) {
      uint32_t d = first_diff(&outs[0], &outs[m]);
      KT_CHECK_MSG(d >= upto, "%s %s: first difference at %u of %u comparable", names[k],
                   spec_name(m == 1 ? SCHED_SPEC_LOOKUP : SCHED_SPEC_DRAFT), d, upto);
      KT_CHECK_EQ(outs[m].n, n_gen);
    }
    kt_log("%s: %u tokens comparable; lookup %u/%u, draft model %u/%u accepted", names[k], upto,
           accepted[1], drafted[1], accepted[2], drafted[2]);
    KT_CHECK(drafted[2] > 0);
    compared += upto;
    free(outs);
    free(prompt);
    free(twice);
    rig_close(&g);
    cJSON_Delete(ref);
  }
  KT_CHECK(compared >= n_gen * n_names / 2);
  FIXTURE_CHECK_VALIDATION();
}

static const int32_t *once_upon(uint32_t *n) {
  static const int32_t ids[] = {1, 403, 407, 261, 378}; /* "Once upon a time" */
  *n = 5;
  return ids;
}

static struct sched_req *req_sampled(uint64_t seed, uint32_t max_tokens, enum sched_spec spec,
                                     const struct sample_params *sp) {
  uint32_t n;
  const int32_t *ids = once_upon(&n);
  struct sched_req *r = req_greedy(ids, n, max_tokens, spec);
  if (!r) return NULL;
  r->sp = *sp;
  r->sp.seed = seed;
  return r;
}

/* The sampler draws once per emitted token, in order, whatever the drafts: the same seed gives
 * the same tokens and the same log-probs (the target's) with and without drafts, penalties and
 * all the cuts included. */
KT_TEST(seeded_sampling_is_token_identical_with_drafts) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct rig g;
  if (!rig_open(&g, "models/stories260K.gguf", "models/quant/stories260K-q4_0.gguf", 256))
    KT_SKIP("models not found under KVD_SHARED_DIR");
  struct sample_params sp;
  sample_params_default(&sp);
  sp.repeat_penalty = 1.1f;
  sp.freq_penalty = 0.05f;
  sp.presence_penalty = 0.02f;
  enum { SEEDS = 8 };
  struct sched_req *reqs[3 * SEEDS];
  struct drv_out *outs = calloc(3 * SEEDS, sizeof *outs);
  KT_ASSERT(outs);
  for (uint32_t i = 0; i < 3 * SEEDS; i++) {
    enum sched_spec m = i % 3 == 0 ? SCHED_SPEC_OFF : i % 3 == 1 ? SCHED_SPEC_LOOKUP : SCHED_SPEC_DRAFT;
    reqs[i] = req_sampled(1000 + i / 3, 120, m, &sp);
    KT_ASSERT(reqs[i]);
    reqs[i]->logprobs = 3;
  }
  uint32_t drafted[3 * SEEDS], accepted[3 * SEEDS], total_d = 0, total_a = 0;
  run_free(g.s, reqs, outs, 3 * SEEDS, drafted, accepted);
  double worst = 0;
  for (uint32_t i = 0; i < 3 * SEEDS; i += 3)
    for (uint32_t m = 1; m < 3; m++) {
      const struct drv_out *a = &outs[i], *b = &outs[i + m];
      KT_CHECK_MSG(first_diff(a, b) == UINT32_MAX, "seed %u mode %u: first difference at %u",
                   1000 + i / 3, m, first_diff(a, b));
      for (uint32_t j = 0; j < a->n && j < b->n; j++)
        worst = fmax(worst, fabs((double)a->logprob[j] - b->logprob[j]));
      total_d += drafted[i + m];
      total_a += accepted[i + m];
    }
  kt_log("drafted %u, accepted %u; max |d logprob| %.3g", total_d, total_a, worst);
  KT_CHECK(total_a > 0 && total_a < total_d);
  KT_CHECK_MSG(worst < 1e-3, "log-probs differ by %.3g", worst);
  free(outs);
  rig_close(&g);
  FIXTURE_CHECK_VALIDATION();
}

/* The upper critical value of chi-square with df degrees of freedom at significance 1e-3
 * (Wilson-Hilferty: within 1% of the tables for df >= 3). */
static double chi2_crit(double df) {
  double z = 3.090, h = 2.0 / (9.0 * df);
  double t = 1.0 - h + z * sqrt(h);
  return df * t * t * t;
}

/* Temperature 1.5 and no cuts, so every token has weight: over many seeds, the second token
 * after "Once upon a time" given the most common first token (verified against a draft: the draft
 * model's greedy guess) and the third given the most common pair (sampled from the row after an
 * accepted draft in the same step, or from a later step) follow the target's softmax within a
 * chi-square bound. A verifier that favoured its drafts would put too much mass on them. */
KT_TEST(sampled_tokens_follow_the_target_distribution) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct rig g;
  if (!rig_open(&g, "models/stories260K.gguf", "models/quant/stories260K-q4_0.gguf", 512))
    KT_SKIP("models not found under KVD_SHARED_DIR");
  struct sample_params sp = {.temperature = 1.5f, .top_p = 1, .repeat_penalty = 1};
  enum { BATCH = 200 };
  const uint32_t N = sanitized() ? 400 : 1600;
  struct drv_out *outs = calloc(N, sizeof *outs);
  KT_ASSERT(outs);
  uint32_t tot_d = 0, tot_a = 0;
  for (uint32_t b = 0; b < N; b += BATCH) {
    struct sched_req *reqs[BATCH];
    uint32_t d[BATCH], a[BATCH];
    for (uint32_t i = 0; i < BATCH; i++) {
      reqs[i] = req_sampled(kt_rand_u64(), 3, SCHED_SPEC_DRAFT, &sp);
      KT_ASSERT(reqs[i]);
      reqs[i]->n_eog = 0;
    }
    run_free(g.s, reqs, outs + b, BATCH, d, a);
    for (uint32_t i = 0; i < BATCH; i++) {
      tot_d += d[i];
      tot_a += a[i];
    }
  }
  kt_log("drafted %u, accepted %u", tot_d, tot_a);
  KT_CHECK(tot_a > 0 && tot_a < tot_d);
  /* The target's distributions, from a plain engine on the same file. */
  struct gguf_file *f = NULL;
  struct engine *e = rig_engine("models/stories260K.gguf", 16, &f);
  KT_ASSERT(e);
  uint32_t v = engine_hparams(e)->n_vocab, np;
  const int32_t *prompt = once_upon(&np);
  uint32_t *count = calloc(v, sizeof *count);
  float *logits = malloc(v * sizeof *logits);
  double *p = malloc(v * sizeof *p);
  KT_ASSERT(count && logits && p);
  for (uint32_t pos = 1; pos <= 2; pos++) {
    /* The most common prefix of length pos among the samples. */
    int32_t pre[2] = {-1, -1};
    uint32_t best = 0;
    for (uint32_t i = 0; i < N; i++) {
      uint32_t same = 0;
      for (uint32_t j = 0; j < N; j++)
        same += outs[j].n == 3 && memcmp(outs[j].ids, outs[i].ids, pos * sizeof(int32_t)) == 0;
      if (same > best) {
        best = same;
        memcpy(pre, outs[i].ids, pos * sizeof(int32_t));
      }
      if (best > N / 2) break;
    }
    memset(count, 0, v * sizeof *count);
    for (uint32_t j = 0; j < N; j++)
      if (outs[j].n == 3 && memcmp(outs[j].ids, pre, pos * sizeof(int32_t)) == 0)
        count[outs[j].ids[pos]]++;
    int32_t ctx[8];
    memcpy(ctx, prompt, np * sizeof *ctx);
    memcpy(ctx + np, pre, pos * sizeof *ctx);
    struct engine_seq *s;
    KT_ASSERT_OK(engine_seq_new(e, &s));
    struct engine_item it = {s, ctx, np + pos, logits, 1};
    KT_ASSERT_OK(engine_forward(e, &it, 1));
    engine_seq_free(e, s);
    double mx = logits[0], sum = 0;
    for (uint32_t i = 1; i < v; i++)
      mx = fmax(mx, logits[i]);
    for (uint32_t i = 0; i < v; i++)
      sum += p[i] = exp(((double)logits[i] - mx) / sp.temperature);
    /* Categories expected at least 5 times; the rest pooled into one. */
    double chi = 0, rest_p = 0, rest_c = 0;
    uint32_t cats = 0;
    for (uint32_t i = 0; i < v; i++) {
      double ex = p[i] / sum * best;
      if (ex >= 5) {
        chi += (count[i] - ex) * (count[i] - ex) / ex;
        cats++;
      } else {
        rest_p += ex;
        rest_c += count[i];
      }
    }
    if (rest_p >= 5) {
      chi += (rest_c - rest_p) * (rest_c - rest_p) / rest_p;
      cats++;
    }
    KT_ASSERT(cats >= 3);
    double crit = chi2_crit(cats - 1);
    kt_log("token %u after %u samples of its prefix: chi-square %.1f over %u categories "
           "(bound %.1f)",
           pos + 1, best, chi, cats, crit);
    KT_CHECK_MSG(chi < crit, "token %u: chi-square %.1f >= %.1f", pos + 1, chi, crit);
  }
  free(count);
  free(logits);
  free(p);
  engine_free(e);
  gguf_close(f);
  free(outs);
  rig_close(&g);
  FIXTURE_CHECK_VALIDATION();
}

/* A prompt that repeats, so lookup drafts run long: case 0's story, then its opening again. */
static int32_t *repeat_prompt(uint32_t *n, int32_t **story, uint32_t *n_story) {
  cJSON *ref = ref_json_load("models/stories260K.reference.json");
  if (!ref) return NULL;
  const cJSON *c = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(ref, "cases"), 0);
  *story = ref_json_ids(c, "generated_ids", n_story);
  cJSON_Delete(ref);
  if (!*story || *n_story < 120) return NULL;
  int32_t *p = malloc(140 * sizeof *p);
  if (!p) return NULL;
  p[0] = 1;
  memcpy(p + 1, *story, 120 * sizeof *p);
  memcpy(p + 121, *story, 19 * sizeof *p);
  *n = 140;
  return p;
}

/* max_tokens, an end-of-generation token and a cancel that fall in the middle of accepted drafts
 * end the request exactly where decoding without drafts would, and the pool is whole after. */
KT_TEST(limits_stops_and_cancel_inside_drafts) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct rig g;
  uint32_t n, n_story;
  int32_t *story = NULL, *prompt = repeat_prompt(&n, &story, &n_story);
  if (!prompt || !rig_open(&g, "models/stories260K.gguf", NULL, 128)) {
    free(prompt);
    free(story);
    KT_SKIP("models not found under KVD_SHARED_DIR");
  }
  struct drv_out *outs = calloc(8, sizeof *outs);
  KT_ASSERT(outs);
  struct sched_req *base[1] = {req_greedy(prompt, n, 80, SCHED_SPEC_OFF)};
  base[0]->n_eog = 0;
  run_free(g.s, base, outs, 1, NULL, NULL);
  const struct drv_out *want = &outs[0];
  KT_ASSERT(want->n == 80);
  /* A token first seen late in the reference continuation ends the generation there. */
  uint32_t stop_at = 40;
  int32_t stop_tok = want->ids[stop_at];
  for (uint32_t i = 0; i < stop_at; i++)
    if (want->ids[i] == stop_tok) stop_at = i;
  struct sched_req *reqs[4];
  uint32_t lims[] = {7, 29};
  for (int i = 0; i < 2; i++) {
    reqs[i] = req_greedy(prompt, n, lims[i], SCHED_SPEC_LOOKUP);
    reqs[i]->n_eog = 0;
  }
  reqs[2] = req_greedy(prompt, n, 80, SCHED_SPEC_LOOKUP);
  reqs[2]->eog = &want->ids[stop_at];
  reqs[2]->n_eog = 1;
  reqs[3] = req_greedy(prompt, n, 80, SCHED_SPEC_LOOKUP);
  reqs[3]->n_eog = 0;
  outs[4].cancel_at = 11;
  uint32_t drafted[4], accepted[4];
  run_free(g.s, reqs, outs + 1, 4, drafted, accepted);
  for (int i = 0; i < 2; i++) {
    KT_CHECK_EQ(outs[1 + i].n, lims[i]);
    KT_CHECK_EQ(outs[1 + i].finish, SCHED_FINISH_LENGTH);
    KT_CHECK(memcmp(outs[1 + i].ids, want->ids, lims[i] * sizeof(int32_t)) == 0);
  }
  KT_CHECK_EQ(outs[3].finish, SCHED_FINISH_STOP);
  KT_CHECK_EQ(outs[3].n, stop_at);
  KT_CHECK(memcmp(outs[3].ids, want->ids, stop_at * sizeof(int32_t)) == 0);
  KT_CHECK_EQ(outs[4].finish, SCHED_FINISH_CANCELLED);
  KT_CHECK(outs[4].n >= 11 && outs[4].n < 80);
  KT_CHECK(memcmp(outs[4].ids, want->ids, outs[4].n * sizeof(int32_t)) == 0);
  kt_log("the copied continuation: %u of %u drafts accepted", accepted[2], drafted[2]);
  KT_CHECK(accepted[2] > 0);
  struct sched_stats st;
  sched_get_stats(g.s, &st);
  KT_CHECK_EQ(st.kv.used, 0);
  free(outs);
  free(prompt);
  free(story);
  rig_close(&g);
  FIXTURE_CHECK_VALIDATION();
}

/* A session's turns with drafts (rejected ones cut off its sequence, the last sampled token kept
 * pending) read the same as without: two sessions, one drafting, give the same second turn. */
KT_TEST(session_turns_with_drafts_equal_turns_without) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct rig g;
  uint32_t n, n_story;
  int32_t *story = NULL, *prompt = repeat_prompt(&n, &story, &n_story);
  if (!prompt || !rig_open(&g, "models/stories260K.gguf", "models/quant/stories260K-q4_0.gguf", 128)) {
    free(prompt);
    free(story);
    KT_SKIP("models not found under KVD_SHARED_DIR");
  }
  struct sched_session *ss[2];
  KT_ASSERT_OK(sched_session_new(g.s, &ss[0]));
  KT_ASSERT_OK(sched_session_new(g.s, &ss[1]));
  struct drv_out *outs = calloc(4, sizeof *outs);
  KT_ASSERT(outs);
  for (int turn = 0; turn < 2; turn++) {
    struct sched_req *reqs[2];
    for (int i = 0; i < 2; i++) {
      reqs[i] = turn == 0 ? req_greedy(prompt, n, 37, i ? SCHED_SPEC_AUTO : SCHED_SPEC_OFF)
                          : req_greedy(story + 30, 20, 37, i ? SCHED_SPEC_DRAFT : SCHED_SPEC_OFF);
      reqs[i]->session = ss[i];
      reqs[i]->n_eog = 0;
    }
    run_free(g.s, reqs, outs + 2 * turn, 2, NULL, NULL);
    KT_CHECK_EQ(outs[2 * turn].n, 37);
    KT_CHECK_MSG(first_diff(&outs[2 * turn], &outs[2 * turn + 1]) == UINT32_MAX,
                 "turn %d: first difference at %u", turn,
                 first_diff(&outs[2 * turn], &outs[2 * turn + 1]));
    KT_CHECK_EQ(sched_session_len(ss[0]), sched_session_len(ss[1]));
  }
  sched_session_free(g.s, ss[0]);
  sched_session_free(g.s, ss[1]);
  free(outs);
  free(prompt);
  free(story);
  rig_close(&g);
  FIXTURE_CHECK_VALIDATION();
}

/* A pool too small for every request at once: requests are preempted with drafts in flight
 * (recomputed from their tokens) and still produce exactly their solo output. */
KT_TEST(preemption_between_drafting_steps_loses_nothing) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct rig g;
  uint32_t n, n_story;
  int32_t *story = NULL, *prompt = repeat_prompt(&n, &story, &n_story);
  /* Four prompts of 140 tokens that share no block, each run to 200 tokens (13 blocks of 16):
   * 52 blocks wanted at once, 30 in the pool. */
  if (!prompt || !rig_open(&g, "models/stories260K.gguf", "models/quant/stories260K-q4_0.gguf", 30)) {
    free(prompt);
    free(story);
    KT_SKIP("models not found under KVD_SHARED_DIR");
  }
  enum { R = 4 };
  int32_t prompts[R][140];
  struct sched_req *solo[R], *reqs[R];
  for (int i = 0; i < R; i++) {
    memcpy(prompts[i], prompt, sizeof prompts[i]);
    prompts[i][1] = story[i + 1]; /* a different first block */
    solo[i] = req_greedy(prompts[i], n, 60, SCHED_SPEC_OFF);
    reqs[i] = req_greedy(prompts[i], n, 60, i % 2 ? SCHED_SPEC_DRAFT : SCHED_SPEC_LOOKUP);
    solo[i]->n_eog = reqs[i]->n_eog = 0;
  }
  struct drv_out *outs = calloc(2 * R, sizeof *outs);
  KT_ASSERT(outs);
  for (int i = 0; i < R; i++)
    run_free(g.s, &solo[i], outs + i, 1, NULL, NULL);
  uint32_t drafted[R], accepted[R], td = 0;
  run_free(g.s, reqs, outs + R, R, drafted, accepted);
  for (int i = 0; i < R; i++) {
    KT_CHECK_EQ(outs[i].n, 60);
    KT_CHECK_MSG(first_diff(&outs[i], &outs[R + i]) == UINT32_MAX,
                 "request %d: first difference at %u", i, first_diff(&outs[i], &outs[R + i]));
    td += drafted[i];
  }
  struct sched_stats st;
  sched_get_stats(g.s, &st);
  kt_log("%llu preemptions, %u drafted", (unsigned long long)st.preemptions, td);
  KT_CHECK(st.preemptions > 0 && td > 0);
  KT_CHECK_EQ(st.kv.used, 0);
  free(outs);
  free(prompt);
  free(story);
  rig_close(&g);
  FIXTURE_CHECK_VALIDATION();
}

/* Asking for the draft model where there is none is a clear error for that request only. */
KT_TEST(draft_mode_without_a_draft_model_is_unsupported) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct rig g;
  if (!rig_open(&g, "models/stories260K.gguf", NULL, 32)) KT_SKIP("models not found");
  uint32_t n;
  const int32_t *ids = once_upon(&n);
  struct sched_req *reqs[2] = {req_greedy(ids, n, 5, SCHED_SPEC_DRAFT),
                               req_greedy(ids, n, 5, SCHED_SPEC_AUTO)};
  struct drv_out *outs = calloc(2, sizeof *outs);
  KT_ASSERT(outs);
  run_free(g.s, reqs, outs, 2, NULL, NULL);
  KT_CHECK_EQ(outs[0].finish, SCHED_FINISH_ERROR);
  KT_CHECK_EQ(outs[0].error, KVD_E_UNSUPPORTED);
  KT_CHECK_EQ(outs[1].finish, SCHED_FINISH_LENGTH);
  KT_CHECK_EQ(outs[1].n, 5);
  free(outs);
  rig_close(&g);
  FIXTURE_CHECK_VALIDATION();
}
