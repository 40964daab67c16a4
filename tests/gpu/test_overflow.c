/* Past the context window through the scheduler (kv.h's overflow policies): generation runs to
 * max_tokens across many context shifts, matched token by token against the CPU reference
 * following the same policy (kv_overflow_plan decides the cuts for both, each executes them its
 * own way); prompts longer than the context run in chunks; the pool's blocks stay flat; the
 * prefix cache, preemption and sessions keep working on shifted sequences. */
#include "engine.h"
#include "gpu_fixture.h"
#include "kvd_error.h"
#include "ref.h"
#include "scheduler.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define MODEL "models/stories260K-f16.gguf" /* context 512 */
#define MAX_OUT 2048

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int notified;

static void on_notify(void *ud) {
  (void)ud;
  pthread_mutex_lock(&mu);
  notified++;
  pthread_cond_signal(&cv);
  pthread_mutex_unlock(&mu);
}

struct out {
  int32_t ids[MAX_OUT];
  uint32_t n;
  bool done;
  enum sched_finish finish;
  int error;
};

static void run_until_done(struct sched *s, struct sched_req **reqs, struct out *outs, int n) {
  int left = n;
  while (left > 0) {
    pthread_mutex_lock(&mu);
    while (!notified)
      pthread_cond_wait(&cv, &mu);
    notified = 0;
    pthread_mutex_unlock(&mu);
    struct sched_event ev[64];
    uint32_t k;
    while ((k = sched_drain(s, ev, 64)) > 0)
      for (uint32_t i = 0; i < k; i++) {
        int j = 0;
        while (j < n && reqs[j] != ev[i].req)
          j++;
        if (j == n) continue;
        if (ev[i].done) {
          outs[j].done = true;
          outs[j].finish = ev[i].finish;
          outs[j].error = ev[i].error;
          left--;
        } else if (outs[j].n < MAX_OUT) {
          outs[j].ids[outs[j].n++] = ev[i].token;
        }
      }
  }
}

static struct sched *new_sched(struct gguf_file *f, uint32_t n_blocks, uint32_t step_tokens) {
  struct engine *e;
  struct model_error err;
  if (engine_new(fixture_device(), f, &(struct engine_opts){.n_blocks = n_blocks}, &e, &err) < 0) {
    kt_log("engine: %s", err.msg);
    return NULL;
  }
  struct sched *s;
  if (sched_new(e, &(struct sched_opts){.step_tokens = step_tokens, .notify = on_notify}, &s) < 0)
    return NULL;
  return s;
}

static struct gguf_file *open_model(void) {
  const char *path = kt_shared_path(MODEL);
  struct gguf_file *f = NULL;
  struct gguf_error err;
  if (path && gguf_open(path, &f, &err) < 0) f = NULL;
  return f;
}

/* Greedy, no end-of-text set: it runs to max_tokens. */
static struct sched_req *req_new(const int32_t *toks, uint32_t n, uint32_t max_tokens,
                                 enum kv_overflow pol, uint32_t keep) {
  struct sched_req *r;
  if (sched_req_new(toks, n, &r) < 0) return NULL;
  r->sp = (struct sample_params){.temperature = 0, .top_p = 1, .repeat_penalty = 1};
  r->max_tokens = max_tokens;
  r->overflow = pol;
  r->keep = keep;
  return r;
}

static uint32_t argmax(const float *x, uint32_t n) {
  uint32_t b = 0;
  for (uint32_t i = 1; i < n; i++)
    if (x[i] > x[b]) b = i;
  return b;
}

/* The reference before running n more tokens: the same cut the scheduler makes. */
static int ref_make_room(struct model_ref *ref, enum kv_overflow pol, uint32_t keep, uint32_t n,
                         uint32_t *n_shifts) {
  struct kv_overflow_cut cut;
  int rc = kv_overflow_plan(pol, model_ref_n_past(ref), n, model_ref_n_ctx(ref), keep,
                            KV_BLOCK_SIZE_DEFAULT, &cut);
  if (rc < 0 || cut.n_drop == 0) return rc;
  (*n_shifts)++;
  return model_ref_shift(ref, cut.keep, cut.n_drop);
}

/* Runs the prompt through the reference as the scheduler chunks it (step_tokens per step, up to
 * the context, then room for the next chunk, at most half the context), then teacher-forces the
 * engine's output: every generated id must be the reference's argmax, or within `tie` of it
 * (a near-tie the two sides' rounding may break either way). Returns the ids that differed. */
static int ref_follow(struct model_ref *ref, const int32_t *prompt, uint32_t n_prompt,
                      const struct out *o, enum kv_overflow pol, uint32_t keep,
                      uint32_t step_tokens, double tie, uint32_t *n_shifts, uint32_t *n_ties) {
  uint32_t n_ctx = model_ref_n_ctx(ref), nv = model_ref_hparams(ref)->n_vocab;
  float *lg = malloc(nv * sizeof *lg);
  if (!lg) return -1;
  model_ref_reset(ref);
  *n_shifts = *n_ties = 0;
  int bad = 0;
  for (uint32_t i = 0; i < n_prompt;) {
    uint32_t chunk = n_prompt - i < step_tokens ? n_prompt - i : step_tokens;
    if (model_ref_n_past(ref) >= n_ctx &&
        ref_make_room(ref, pol, keep, chunk < n_ctx / 2 ? chunk : n_ctx / 2, n_shifts) < 0)
      goto fail;
    uint32_t room = n_ctx - model_ref_n_past(ref);
    if (chunk > room) chunk = room;
    for (uint32_t j = 0; j < chunk; j++)
      if (model_ref_forward(ref, (uint32_t)prompt[i + j], model_ref_n_past(ref), lg) < 0)
        goto fail;
    i += chunk;
  }
  for (uint32_t g = 0; g < o->n; g++) {
    uint32_t best = argmax(lg, nv), got = (uint32_t)o->ids[g];
    if (got != best) {
      if (lg[best] - lg[got] < tie) {
        (*n_ties)++;
      } else {
        if (bad < 5)
          kt_log("token %u: engine %u, reference %u (logits %.4f vs %.4f)", g, got, best,
                 lg[got], lg[best]);
        bad++;
      }
    }
    if (g + 1 == o->n) break;
    if (ref_make_room(ref, pol, keep, 1, n_shifts) < 0 ||
        model_ref_forward(ref, got, model_ref_n_past(ref), lg) < 0)
      goto fail;
  }
  free(lg);
  return bad;
fail:
  free(lg);
  return -1;
}

static void random_prompt(int32_t *p, uint32_t n) {
  p[0] = 1;
  for (uint32_t i = 1; i < n; i++)
    p[i] = (int32_t)kt_rand_range(3, 511);
}

/* The check: 3x the context, under each policy, token by token against the reference. */
KT_TEST(three_contexts_of_generation_match_the_reference_under_each_policy) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = open_model();
  if (!f) KT_SKIP(MODEL " not found");
  struct model_ref *ref = NULL;
  struct model_error err;
  KT_ASSERT_OK(model_ref_new(f, NULL, &ref, &err));
  uint32_t n_ctx = model_ref_n_ctx(ref);
  KT_CHECK_EQ(n_ctx, 512);
  static const struct {
    enum kv_overflow pol;
    uint32_t keep;
  } cases[] = {{KV_OVERFLOW_SHIFT, 1}, {KV_OVERFLOW_WINDOW, 4}};
  /* Sanitizer builds run the same paths over 1.25 contexts (several shifts each) in a fraction
   * of the time; the plain build runs the three. */
  uint32_t n_gen = getenv("KVD_SANITIZED") ? n_ctx * 5 / 4 : 3 * n_ctx;
  int32_t prompt[40];
  random_prompt(prompt, 40);
  /* Both policies at once, batched in the same steps (half the time of one after the other). */
  enum { N = sizeof cases / sizeof cases[0] };
  struct sched *s = new_sched(f, 160, 0);
  KT_ASSERT(s);
  static struct out o[N];
  memset(o, 0, sizeof o);
  struct sched_req *r[N];
  for (int c = 0; c < N; c++) {
    r[c] = req_new(prompt, 40, n_gen, cases[c].pol, cases[c].keep);
    KT_ASSERT(r[c] && sched_submit(s, r[c]) == 0);
  }
  run_until_done(s, r, o, N);
  struct sched_stats st;
  sched_get_stats(s, &st);
  /* Blocks in use stay within one context per sequence, and twice that at most while a shift
   * copies the blocks the prefix cache holds (it keeps the originals, cached, while free
   * blocks last): flat, however long the text. */
  uint32_t per_ctx = n_ctx / KV_BLOCK_SIZE_DEFAULT;
  kt_log("high water %u blocks for %d sequences of up to %u", st.kv.high_water, N, per_ctx);
  KT_CHECK(st.kv.high_water <= N * (2 * per_ctx + 2));
  KT_CHECK(st.kv.high_water > per_ctx);
  KT_CHECK_EQ(st.kv.used, 0);
  for (int c = 0; c < N; c++) {
    KT_CHECK_EQ(o[c].finish, SCHED_FINISH_LENGTH);
    KT_CHECK_EQ(o[c].n, n_gen);
    KT_CHECK(r[c]->n_shifts > 0);
    uint32_t shifts, ties;
    int bad = ref_follow(ref, prompt, 40, &o[c], cases[c].pol, cases[c].keep, 512, 1e-3, &shifts,
                         &ties);
    kt_log("%s keep %u: %u tokens, %u shifts, %u near-ties, %d differ",
           kv_overflow_name(cases[c].pol), cases[c].keep, o[c].n, r[c]->n_shifts, ties, bad);
    KT_CHECK_EQ(shifts, r[c]->n_shifts); /* the same cuts */
    KT_CHECK_EQ(bad, 0);
    sched_req_free(r[c]);
  }
  sched_free(s);
  model_ref_free(ref);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(a_prompt_longer_than_the_context_runs_in_chunks) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = open_model();
  if (!f) KT_SKIP(MODEL " not found");
  struct model_ref *ref = NULL;
  struct model_error err;
  KT_ASSERT_OK(model_ref_new(f, NULL, &ref, &err));
  static int32_t prompt[1300];
  random_prompt(prompt, 1300);
  static const enum kv_overflow pols[] = {KV_OVERFLOW_SHIFT, KV_OVERFLOW_WINDOW};
  for (int c = 0; c < 2; c++) {
    struct sched *s = new_sched(f, 64, 96);
    KT_ASSERT(s);
    static struct out o;
    memset(&o, 0, sizeof o);
    struct sched_req *r = req_new(prompt, 1300, 40, pols[c], 4);
    KT_ASSERT(r && sched_submit(s, r) == 0);
    run_until_done(s, &r, &o, 1);
    KT_CHECK_EQ(o.finish, SCHED_FINISH_LENGTH);
    KT_CHECK_EQ(o.n, 40);
    uint32_t shifts, ties;
    int bad = ref_follow(ref, prompt, 1300, &o, pols[c], 4, 96, 1e-3, &shifts, &ties);
    kt_log("%s: 1300-token prompt, %u shifts, %u near-ties, %d differ", kv_overflow_name(pols[c]),
           r->n_shifts, ties, bad);
    KT_CHECK_EQ(shifts, r->n_shifts);
    KT_CHECK_EQ(bad, 0);
    sched_req_free(r);
    /* Under the wall the same prompt is refused with KVD_E_CONTEXT. */
    memset(&o, 0, sizeof o);
    r = req_new(prompt, 1300, 40, KV_OVERFLOW_ERROR, 0);
    KT_ASSERT(r && sched_submit(s, r) == 0);
    run_until_done(s, &r, &o, 1);
    KT_CHECK_EQ(o.finish, SCHED_FINISH_ERROR);
    KT_CHECK_EQ(o.error, KVD_E_CONTEXT);
    sched_req_free(r);
    sched_free(s);
  }
  model_ref_free(ref);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

/* A shifted request registers nothing past its cut, but what it registered before stays good: a
 * later request with the same prompt starts from those blocks and says exactly what the first
 * one said before its first shift. */
KT_TEST(prefix_cache_and_preemption_keep_working_on_shifted_sequences) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = open_model();
  if (!f) KT_SKIP(MODEL " not found");
  static int32_t prompt[480];
  random_prompt(prompt, 480);
  struct sched *s = new_sched(f, 128, 0);
  KT_ASSERT(s);
  static struct out a, b;
  memset(&a, 0, sizeof a);
  memset(&b, 0, sizeof b);
  struct sched_req *ra = req_new(prompt, 480, 60, KV_OVERFLOW_SHIFT, 1);
  KT_ASSERT(ra && sched_submit(s, ra) == 0);
  run_until_done(s, &ra, &a, 1);
  KT_CHECK(ra->n_shifts > 0);
  struct sched_req *rb = req_new(prompt, 480, 20, KV_OVERFLOW_SHIFT, 1);
  KT_ASSERT(rb && sched_submit(s, rb) == 0);
  run_until_done(s, &rb, &b, 1);
  KT_CHECK_EQ(rb->cached_tokens, 464); /* the prompt's whole blocks but the one it computes */
  KT_CHECK_EQ(b.n, 20);
  KT_CHECK(memcmp(a.ids, b.ids, 20 * sizeof(int32_t)) == 0);
  sched_req_free(ra);
  sched_req_free(rb);
  sched_free(s);

  /* Three long prompts on a pool for two contexts: they preempt each other (recomputing their
   * kept tokens) and all run to max_tokens across shifts; nothing leaks. */
  for (int pol = KV_OVERFLOW_SHIFT; pol <= KV_OVERFLOW_WINDOW; pol++) {
    s = new_sched(f, 2 * 512 / KV_BLOCK_SIZE_DEFAULT + 4, 0);
    KT_ASSERT(s);
    static struct out o[3];
    memset(o, 0, sizeof o);
    struct sched_req *r[3];
    for (int i = 0; i < 3; i++) {
      random_prompt(prompt, 400);
      r[i] = req_new(prompt, 400, 150, (enum kv_overflow)pol, 4);
      KT_ASSERT(r[i] && sched_submit(s, r[i]) == 0);
    }
    run_until_done(s, r, o, 3);
    struct sched_stats st;
    sched_get_stats(s, &st);
    kt_log("%s: %llu preemptions, %llu shifts", kv_overflow_name((enum kv_overflow)pol),
           (unsigned long long)st.preemptions, (unsigned long long)st.shifts);
    KT_CHECK(st.preemptions > 0);
    KT_CHECK(st.shifts > 0);
    for (int i = 0; i < 3; i++) {
      KT_CHECK_EQ(o[i].finish, SCHED_FINISH_LENGTH);
      KT_CHECK_EQ(o[i].n, 150);
      sched_req_free(r[i]);
    }
    KT_CHECK_EQ(st.kv.used, 0);
    sched_free(s);
  }
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

/* A session under a context policy never hits the wall: 30 turns of 60 tokens in and 10 out on a
 * 512 context (2100 tokens in all), every turn answered, the history bounded by the context; a
 * fork of the shifted session goes on too. */
KT_TEST(thirty_turn_session_never_errors) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = open_model();
  if (!f) KT_SKIP(MODEL " not found");
  struct sched *s = new_sched(f, 64, 0);
  KT_ASSERT(s);
  struct sched_session *ss, *fork = NULL;
  KT_ASSERT_OK(sched_session_new(s, &ss));
  uint32_t shifts = 0;
  for (int turn = 0; turn < 30; turn++) {
    int32_t prompt[60];
    random_prompt(prompt, 60);
    static struct out o;
    memset(&o, 0, sizeof o);
    struct sched_req *r = req_new(prompt + (turn ? 1 : 0), turn ? 59 : 60, 10, KV_OVERFLOW_SHIFT, 1);
    KT_ASSERT(r);
    r->session = turn == 29 && fork ? fork : ss;
    KT_ASSERT_OK(sched_submit(s, r));
    run_until_done(s, &r, &o, 1);
    KT_CHECK_MSG(o.finish == SCHED_FINISH_LENGTH, "turn %d ended with %d (%s)", turn, o.finish,
                 kvd_strerror(o.error));
    KT_CHECK_EQ(o.n, 10);
    KT_CHECK(sched_session_len(r->session) <= 512 + 1);
    shifts += r->n_shifts;
    sched_req_free(r);
    if (turn == 20) KT_ASSERT_OK(sched_session_fork(s, ss, &fork));
  }
  kt_log("30 turns, %u shifts", shifts);
  KT_CHECK(shifts >= 3);
  sched_session_free(s, ss);
  sched_session_free(s, fork);
  sched_free(s);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}
