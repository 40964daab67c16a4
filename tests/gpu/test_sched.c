/* The scheduler on the real model: many requests at once each get exactly their solo greedy
 * output, sessions keep their KV between requests, cancellation ends a request and frees its
 * blocks, and the pool's counters come back. */
#include "engine.h"
#include "gpu_fixture.h"
#include "kvd_error.h"
#include "scheduler.h"
#include "synth.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

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
  int32_t ids[2048];
  uint32_t n;
  bool done;
  enum sched_finish finish;
};

/* Drains events until every request in reqs is done. */
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
          left--;
        } else if (outs[j].n < 2048) {
          outs[j].ids[outs[j].n++] = ev[i].token;
        }
      }
  }
}

/* The KV type new_sched's engines store (the quantized-block runs set it). */
static enum kv_type g_kv_type = KV_F32;

static struct sched *new_sched(struct gguf_file **f, uint32_t n_blocks, uint32_t step_tokens) {
  const char *path = kt_shared_path("models/stories260K.gguf");
  struct gguf_error gerr;
  if (!path || gguf_open(path, f, &gerr) < 0) return NULL;
  struct engine *e;
  struct model_error err;
  if (engine_new(fixture_device(), *f,
                 &(struct engine_opts){.n_blocks = n_blocks, .kv_type = g_kv_type}, &e, &err) < 0)
    return NULL;
  struct sched *s;
  if (sched_new(e, &(struct sched_opts){.step_tokens = step_tokens, .notify = on_notify}, &s) < 0)
    return NULL;
  return s;
}

/* A scheduler over a synthetic model with a short context (the real tiny model's 2048 makes
 * run-to-the-context tests slow on a CPU device). *data is the file, freed after gguf_close. */
static struct sched *new_sched_ctx(uint32_t ctx, uint32_t n_blocks, struct gguf_file **f,
                                   void **data) {
  struct synth_params sp;
  synth_params_default(&sp);
  sp.ctx = ctx;
  size_t size;
  struct gguf_error gerr;
  *f = NULL;
  if (synth_write_mem(&sp, data, &size) < 0) return NULL;
  if (gguf_open_memory(*data, size, f, &gerr) < 0) return NULL;
  struct engine *e;
  struct model_error err;
  if (engine_new(fixture_device(), *f, &(struct engine_opts){.n_blocks = n_blocks}, &e, &err) < 0)
    return NULL;
  struct sched *s;
  if (sched_new(e, &(struct sched_opts){.notify = on_notify}, &s) < 0) return NULL;
  return s;
}

static struct sched_req *greedy_req(const int32_t *toks, uint32_t n, uint32_t max_tokens) {
  struct sched_req *r;
  if (sched_req_new(toks, n, &r) < 0) return NULL;
  r->sp = (struct sample_params){.temperature = 0, .top_p = 1, .repeat_penalty = 1};
  r->max_tokens = max_tokens;
  return r;
}

KT_TEST(sixteen_concurrent_requests_equal_their_solo_runs) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = NULL;
  struct sched *s = new_sched(&f, 256, 64); /* a small step budget forces chunked prefill */
  if (!s && !f) KT_SKIP("stories260K.gguf not found");
  KT_ASSERT(s);
  enum { N = 16, GEN = 10 };
  int32_t prompts[N][48];
  uint32_t plen[N];
  struct sched_req *reqs[N];
  static struct out solo[N], together[N];
  memset(solo, 0, sizeof solo);
  memset(together, 0, sizeof together);
  for (int i = 0; i < N; i++) {
    plen[i] = kt_rand_range(1, 48);
    prompts[i][0] = 1;
    for (uint32_t j = 1; j < plen[i]; j++)
      prompts[i][j] = (int32_t)kt_rand_range(3, 511);
  }
  for (int i = 0; i < N; i++) { /* one at a time */
    reqs[i] = greedy_req(prompts[i], plen[i], GEN);
    sched_submit(s, reqs[i]);
    run_until_done(s, &reqs[i], &solo[i], 1);
  }
  for (int i = 0; i < N; i++)
    sched_req_free(reqs[i]);
  for (int i = 0; i < N; i++) { /* all at once */
    reqs[i] = greedy_req(prompts[i], plen[i], GEN);
    sched_submit(s, reqs[i]);
  }
  run_until_done(s, reqs, together, N);
  for (int i = 0; i < N; i++) {
    KT_CHECK_EQ(together[i].n, solo[i].n);
    KT_CHECK_MSG(memcmp(together[i].ids, solo[i].ids, solo[i].n * 4) == 0, "request %d differs", i);
    sched_req_free(reqs[i]);
  }
  struct sched_stats st;
  sched_get_stats(s, &st);
  KT_CHECK_EQ(st.kv.used, 0);
  KT_CHECK_EQ(st.kv.free + st.kv.cached, st.kv.total);
  KT_CHECK(st.batch_tokens_max > 16); /* requests really shared steps */
  sched_free(s);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(session_keeps_kv_and_cancel_frees_blocks) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = NULL;
  struct sched *s = new_sched(&f, 64, 0);
  if (!s && !f) KT_SKIP("stories260K.gguf not found");
  KT_ASSERT(s);
  struct sched_session *ss;
  KT_ASSERT_OK(sched_session_new(s, &ss));
  int32_t p1[] = {1, 403, 407, 261, 378}, p2[] = {432, 383};
  struct out o1 = {0}, o2 = {0};
  struct sched_req *r1 = greedy_req(p1, 5, 8);
  r1->session = ss;
  sched_submit(s, r1);
  run_until_done(s, &r1, &o1, 1);
  KT_CHECK_EQ(o1.finish, SCHED_FINISH_LENGTH);
  KT_CHECK_EQ(r1->cached_tokens, 0);
  struct sched_req *r2 = greedy_req(p2, 2, 4);
  r2->session = ss;
  sched_submit(s, r2);
  run_until_done(s, &r2, &o2, 1);
  /* Turn two reused everything turn one ran (prompt + 7 completions; the 8th was pending). */
  KT_CHECK_EQ(r2->cached_tokens, 5 + 7);
  KT_CHECK_EQ(r2->n_tokens, 1 + 2); /* the pending token, then the new prompt */
  sched_req_free(r1);
  sched_req_free(r2);

  /* Cancel a long request mid-way: it ends CANCELLED and its blocks return. */
  int32_t p3[] = {1};
  struct out o3 = {0};
  struct sched_req *r3 = greedy_req(p3, 1, 400);
  sched_submit(s, r3);
  sched_cancel(r3);
  run_until_done(s, &r3, &o3, 1);
  KT_CHECK_EQ(o3.finish, SCHED_FINISH_CANCELLED);
  KT_CHECK(o3.n < 400);
  sched_req_free(r3);
  sched_session_free(s, ss);
  /* The free is applied on the engine thread: wait for a step to publish it. */
  struct out o4 = {0};
  struct sched_req *r4 = greedy_req(p3, 1, 1);
  sched_submit(s, r4);
  run_until_done(s, &r4, &o4, 1);
  sched_req_free(r4);
  struct sched_stats st;
  sched_get_stats(s, &st);
  KT_CHECK_EQ(st.kv.used, 0);
  KT_CHECK_EQ(st.kv.free + st.kv.cached, st.kv.total);
  sched_free(s);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

static void preemption_body(void) {
  struct gguf_file *f = NULL;
  /* 12 blocks of 16 tokens for 6 requests that each grow to ~60 tokens: they cannot all be
   * resident, so the scheduler must preempt and recompute, and outputs must not change. */
  struct sched *s = new_sched(&f, 12, 32);
  if (!s && !f) KT_SKIP("stories260K.gguf not found");
  KT_ASSERT(s);
  enum { N = 6, GEN = 40 };
  int32_t prompts[N][24];
  uint32_t plen[N];
  struct sched_req *reqs[N];
  static struct out solo[N], together[N];
  memset(solo, 0, sizeof solo);
  memset(together, 0, sizeof together);
  for (int i = 0; i < N; i++) {
    plen[i] = kt_rand_range(8, 24);
    prompts[i][0] = 1;
    for (uint32_t j = 1; j < plen[i]; j++)
      prompts[i][j] = (int32_t)kt_rand_range(3, 511);
    reqs[i] = greedy_req(prompts[i], plen[i], GEN);
    sched_submit(s, reqs[i]);
    run_until_done(s, &reqs[i], &solo[i], 1);
    sched_req_free(reqs[i]);
  }
  for (int i = 0; i < N; i++) {
    reqs[i] = greedy_req(prompts[i], plen[i], GEN);
    sched_submit(s, reqs[i]);
  }
  run_until_done(s, reqs, together, N);
  struct sched_stats st;
  sched_get_stats(s, &st);
  kt_log("preemptions: %llu", (unsigned long long)st.preemptions);
  KT_CHECK(st.preemptions > 0);
  for (int i = 0; i < N; i++) {
    KT_CHECK_EQ(together[i].finish, SCHED_FINISH_LENGTH);
    KT_CHECK_EQ(together[i].n, solo[i].n);
    KT_CHECK_MSG(memcmp(together[i].ids, solo[i].ids, solo[i].n * 4) == 0, "request %d differs", i);
    sched_req_free(reqs[i]);
  }
  KT_CHECK_EQ(st.kv.used, 0);
  KT_CHECK_EQ(st.kv.free + st.kv.cached, st.kv.total);
  /* A prompt larger than the whole pool is refused up front, not left waiting. */
  static int32_t big[200];
  for (int i = 0; i < 200; i++)
    big[i] = (int32_t)kt_rand_range(3, 511);
  struct out o = {0};
  struct sched_req *r = greedy_req(big, 200, 4);
  sched_submit(s, r);
  run_until_done(s, &r, &o, 1);
  KT_CHECK_EQ(o.finish, SCHED_FINISH_ERROR);
  sched_req_free(r);
  sched_free(s);
  gguf_close(f);
}

KT_TEST(preemption_under_a_tiny_pool_keeps_every_output_exact) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  preemption_body();
  FIXTURE_CHECK_VALIDATION();
}

static void shared_prefix_body(void) {
  struct gguf_file *f = NULL, *f2 = NULL;
  struct sched *s = new_sched(&f, 64, 0);
  if (!s && !f) KT_SKIP("stories260K.gguf not found");
  KT_ASSERT(s);
  /* A "system prompt" of 100 tokens shared by two requests with different tails. */
  int32_t a[110], b[108];
  a[0] = b[0] = 1;
  for (int i = 1; i < 100; i++)
    a[i] = b[i] = (int32_t)kt_rand_range(3, 511);
  for (int i = 100; i < 110; i++)
    a[i] = (int32_t)kt_rand_range(3, 511);
  for (int i = 100; i < 108; i++)
    b[i] = (int32_t)kt_rand_range(3, 511);
  struct out oa = {0}, ob = {0}, ob_cold = {0};
  struct sched_req *ra = greedy_req(a, 110, 8);
  sched_submit(s, ra);
  run_until_done(s, &ra, &oa, 1);
  struct sched_stats before;
  sched_get_stats(s, &before);
  struct sched_req *rb = greedy_req(b, 108, 8);
  sched_submit(s, rb);
  run_until_done(s, &rb, &ob, 1);
  struct sched_stats after;
  sched_get_stats(s, &after);
  /* Blocks 0..5 (96 tokens) are a's: only b's last 12 prompt tokens are computed. */
  KT_CHECK_EQ(rb->cached_tokens, 96);
  KT_CHECK_EQ(after.prefill_tokens - before.prefill_tokens, 108 - 96);
  KT_CHECK(after.kv.hits >= 6);
  /* The same request on a cold scheduler gives the same tokens. */
  struct sched *cold = new_sched(&f2, 64, 0);
  KT_ASSERT(cold);
  struct sched_req *rc = greedy_req(b, 108, 8);
  sched_submit(cold, rc);
  run_until_done(cold, &rc, &ob_cold, 1);
  KT_CHECK_EQ(rc->cached_tokens, 0);
  KT_CHECK_EQ(ob.n, ob_cold.n);
  KT_CHECK(memcmp(ob.ids, ob_cold.ids, ob.n * 4) == 0);
  sched_req_free(ra);
  sched_req_free(rb);
  sched_req_free(rc);
  /* Everything is back: used 0; blocks stay cached (free + cached = total). */
  KT_CHECK_EQ(after.kv.used, 0);
  KT_CHECK_EQ(after.kv.free + after.kv.cached, after.kv.total);
  sched_free(cold);
  sched_free(s);
  gguf_close(f);
  gguf_close(f2);
}

KT_TEST(shared_prefix_is_prefilled_once_and_output_is_unchanged) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  shared_prefix_body();
  FIXTURE_CHECK_VALIDATION();
}

/* Preemption (recompute) and prefix sharing on f16, q8_0 and q4_0 blocks: outputs equal the solo
 * runs on the same KV type exactly, since a value is always stored the same way. */
KT_TEST(preemption_and_prefix_cache_on_quantized_blocks) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  for (int t = KV_F16; t < KV_TYPE_COUNT; t++) {
    g_kv_type = (enum kv_type)t;
    kt_log("KV %s", kv_type_name(g_kv_type));
    preemption_body();
    shared_prefix_body();
  }
  g_kv_type = KV_F32;
  FIXTURE_CHECK_VALIDATION();
}

/* Randomised schedule: requests arrive while others run (random gaps), prompts of mixed lengths
 * that partly share prefixes, a pool small enough to force preemption, some requests cancelled
 * mid-way and forked sessions. Every request that completes must produce exactly its solo
 * output, a cancelled one a prefix of it, and the pool must end with nothing in use. */
KT_TEST(randomised_schedule_stress_equals_solo) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = NULL, *fs = NULL;
  struct sched *s = new_sched(&f, 14, 24);
  struct sched *solo_s = new_sched(&fs, 64, 0);
  if (!s && !f) KT_SKIP("stories260K.gguf not found");
  KT_ASSERT(s && solo_s);
  enum { N = 10, GEN = 24 };
  static int32_t prompts[N][40];
  uint32_t plen[N];
  int32_t common[20];
  common[0] = 1;
  for (int j = 1; j < 20; j++)
    common[j] = (int32_t)kt_rand_range(3, 511);
  for (int i = 0; i < N; i++) {
    plen[i] = kt_rand_range(4, 40);
    bool share = kt_rand_range(0, 1);
    for (uint32_t j = 0; j < plen[i]; j++)
      prompts[i][j] = share && j < 20 ? common[j] : (j == 0 ? 1 : (int32_t)kt_rand_range(3, 511));
  }
  static struct out solo[N], got[N];
  memset(solo, 0, sizeof solo);
  memset(got, 0, sizeof got);
  struct sched_req *reqs[N];
  for (int i = 0; i < N; i++) {
    reqs[i] = greedy_req(prompts[i], plen[i], GEN);
    sched_submit(solo_s, reqs[i]);
    run_until_done(solo_s, &reqs[i], &solo[i], 1);
    sched_req_free(reqs[i]);
  }
  bool cancel_me[N] = {false};
  cancel_me[kt_rand_range(0, N - 1)] = true;
  cancel_me[kt_rand_range(0, N - 1)] = true;
  int submitted = 0, left = N;
  while (left > 0) {
    /* Arrivals: 0..2 new requests between event batches. */
    for (uint32_t k = kt_rand_range(0, 2); k > 0 && submitted < N; k--, submitted++) {
      reqs[submitted] = greedy_req(prompts[submitted], plen[submitted], GEN);
      sched_submit(s, reqs[submitted]);
    }
    if (submitted == 0) continue;
    pthread_mutex_lock(&mu);
    while (!notified)
      pthread_cond_wait(&cv, &mu);
    notified = 0;
    pthread_mutex_unlock(&mu);
    struct sched_event ev[64];
    uint32_t k;
    while ((k = sched_drain(s, ev, 64)) > 0)
      for (uint32_t e = 0; e < k; e++) {
        int j = 0;
        while (reqs[j] != ev[e].req)
          j++;
        if (ev[e].done) {
          got[j].done = true;
          got[j].finish = ev[e].finish;
          left--;
        } else {
          got[j].ids[got[j].n++] = ev[e].token;
          if (cancel_me[j] && got[j].n == 3) sched_cancel(reqs[j]);
        }
      }
  }
  for (int i = 0; i < N; i++) {
    if (cancel_me[i]) {
      KT_CHECK(got[i].finish == SCHED_FINISH_CANCELLED || got[i].finish == SCHED_FINISH_LENGTH);
      KT_CHECK(got[i].n <= solo[i].n);
    } else {
      KT_CHECK_EQ(got[i].finish, SCHED_FINISH_LENGTH);
      KT_CHECK_EQ(got[i].n, solo[i].n);
    }
    KT_CHECK_MSG(memcmp(got[i].ids, solo[i].ids, got[i].n * 4) == 0, "request %d differs", i);
    sched_req_free(reqs[i]);
  }
  /* A forked session continues exactly like its source would. */
  struct sched_session *a, *b;
  KT_ASSERT_OK(sched_session_new(s, &a));
  struct out o1 = {0}, o2 = {0}, o3 = {0};
  struct sched_req *r1 = greedy_req(prompts[0], plen[0], 6);
  r1->session = a;
  sched_submit(s, r1);
  run_until_done(s, &r1, &o1, 1);
  KT_ASSERT_OK(sched_session_fork(s, a, &b));
  int32_t more[] = {300, 301};
  struct sched_req *r2 = greedy_req(more, 2, 5), *r3 = greedy_req(more, 2, 5);
  r2->session = a;
  r3->session = b;
  sched_submit(s, r2);
  sched_submit(s, r3);
  struct sched_req *pair[2] = {r2, r3};
  static struct out outs[2];
  memset(outs, 0, sizeof outs);
  run_until_done(s, pair, outs, 2);
  o2 = outs[0];
  o3 = outs[1];
  KT_CHECK_EQ(o2.n, o3.n);
  KT_CHECK(memcmp(o2.ids, o3.ids, o2.n * 4) == 0);
  sched_req_free(r1);
  sched_req_free(r2);
  sched_req_free(r3);
  sched_session_free(s, a);
  sched_session_free(s, b);
  /* A last request makes the engine thread apply the frees and publish. */
  struct out o4 = {0};
  struct sched_req *r4 = greedy_req(prompts[1], 1, 1);
  sched_submit(s, r4);
  run_until_done(s, &r4, &o4, 1);
  sched_req_free(r4);
  struct sched_stats st;
  sched_get_stats(s, &st);
  kt_log("stress: %llu steps, %llu preemptions, prefix hits %llu/%llu",
         (unsigned long long)st.steps, (unsigned long long)st.preemptions,
         (unsigned long long)st.kv.hits, (unsigned long long)st.kv.lookups);
  KT_CHECK_EQ(st.kv.used, 0);
  KT_CHECK_EQ(st.kv.free + st.kv.cached, st.kv.total);
  sched_free(s);
  sched_free(solo_s);
  gguf_close(f);
  gguf_close(fs);
  FIXTURE_CHECK_VALIDATION();
}

/* Defect: max_tokens near 2^32 wrapped the history size in sched_admit (n_tokens + 1 + max_tokens
 * in 32 bits): a buffer smaller than the prompt (heap overflow) or, with 2^32-1 exactly, one that
 * holds only the prompt, so preempted requests resumed from a truncated history. Any max_tokens
 * past the context must behave as 0 (run to the context), also under preemption. */
KT_TEST(max_tokens_near_2_32_runs_to_the_context_like_0) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = NULL, *ft = NULL;
  void *d = NULL, *dt = NULL;
  const uint32_t n_ctx = 160, bs = KV_BLOCK_SIZE_DEFAULT;
  struct sched *big = new_sched_ctx(n_ctx, 256, &f, &d);
  KT_ASSERT(big);
  enum { N = 3 };
  static int32_t prompts[N][256];
  uint32_t plen[N];
  for (int i = 0; i < N; i++) {
    plen[i] = kt_rand_range(n_ctx / 2 - 16, n_ctx / 2);
    prompts[i][0] = 1;
    for (uint32_t j = 1; j < plen[i]; j++)
      prompts[i][j] = (int32_t)kt_rand_range(3, 511);
  }
  static struct out ref[N], got[N];
  memset(ref, 0, sizeof ref);
  struct sched_req *reqs[N];
  for (int i = 0; i < N; i++) {
    reqs[i] = greedy_req(prompts[i], plen[i], 0);
    sched_submit(big, reqs[i]);
    run_until_done(big, &reqs[i], &ref[i], 1);
    sched_req_free(reqs[i]);
    KT_CHECK_EQ(ref[i].finish, SCHED_FINISH_LENGTH);
    KT_CHECK(ref[i].n > 0);
  }
  const uint32_t huge[] = {4294967295u, 4294967290u, 4294967295u - plen[2]};
  for (int h = 0; h < 3; h++) { /* each value on one prompt */
    memset(got, 0, sizeof got);
    for (int i = h; i == h; i++) {
      reqs[i] = greedy_req(prompts[i], plen[i], huge[h]);
      sched_submit(big, reqs[i]);
      run_until_done(big, &reqs[i], &got[i], 1);
      KT_CHECK_EQ(got[i].finish, SCHED_FINISH_LENGTH);
      KT_CHECK_EQ(got[i].n, ref[i].n);
      KT_CHECK_MSG(memcmp(got[i].ids, ref[i].ids, ref[i].n * 4) == 0, "max_tokens %u, request %d",
                   huge[h], i);
      sched_req_free(reqs[i]);
    }
  }
  /* All three at once on a pool that holds one and a half of them: they are preempted and
   * resumed from their history, which must hold every token. */
  struct sched *tight = new_sched_ctx(n_ctx, n_ctx * 3 / 2 / bs, &ft, &dt);
  KT_ASSERT(tight);
  memset(got, 0, sizeof got);
  for (int i = 0; i < N; i++) {
    reqs[i] = greedy_req(prompts[i], plen[i], 4294967295u);
    sched_submit(tight, reqs[i]);
  }
  run_until_done(tight, reqs, got, N);
  struct sched_stats st;
  sched_get_stats(tight, &st);
  KT_CHECK(st.preemptions > 0);
  for (int i = 0; i < N; i++) {
    KT_CHECK_EQ(got[i].finish, SCHED_FINISH_LENGTH);
    KT_CHECK_EQ(got[i].n, ref[i].n);
    KT_CHECK_MSG(memcmp(got[i].ids, ref[i].ids, ref[i].n * 4) == 0, "preempted request %d", i);
    sched_req_free(reqs[i]);
  }
  sched_free(tight);
  sched_free(big);
  gguf_close(ft);
  gguf_close(f);
  free(dt);
  free(d);
  FIXTURE_CHECK_VALIDATION();
}

/* Defect: once a prompt's prefix was cached, its cached tokens were counted twice against the
 * context and the pool, so a prompt over half the context worked cold and failed warm. */
KT_TEST(a_prompt_over_half_the_context_works_warm_as_cold) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = NULL;
  void *d = NULL;
  const uint32_t n_ctx = 256;
  struct sched *s = new_sched_ctx(n_ctx, 64, &f, &d);
  KT_ASSERT(s);
  static int32_t prompt[256];
  const uint32_t n = n_ctx / 2 + 1 + kt_rand_range(0, 40);
  prompt[0] = 1;
  for (uint32_t j = 1; j < n; j++)
    prompt[j] = (int32_t)kt_rand_range(3, 511);
  static struct out cold, warm;
  memset(&cold, 0, sizeof cold);
  memset(&warm, 0, sizeof warm);
  struct sched_req *r = greedy_req(prompt, n, 6);
  sched_submit(s, r);
  run_until_done(s, &r, &cold, 1);
  sched_req_free(r);
  KT_CHECK_EQ(cold.finish, SCHED_FINISH_LENGTH);
  r = greedy_req(prompt, n, 6);
  sched_submit(s, r);
  run_until_done(s, &r, &warm, 1);
  KT_CHECK(r->cached_tokens >= n / 2); /* the prefix cache really supplied most of it */
  KT_CHECK_EQ(warm.finish, SCHED_FINISH_LENGTH);
  KT_CHECK_EQ(warm.n, cold.n);
  KT_CHECK(memcmp(warm.ids, cold.ids, cold.n * 4) == 0);
  sched_req_free(r);
  sched_free(s);
  gguf_close(f);
  free(d);
  FIXTURE_CHECK_VALIDATION();
}

/* Defect: with many clients on a small pool, some requests ended with KVD_E_KV_EXHAUSTED while
 * waiting requests still held blocks. Rule: a request that fits the pool alone never fails for
 * lack of KV; it waits or is preempted. 64 requests on a 63-block pool all finish with the text
 * they get on a pool with room for all of them. */
KT_TEST(sixty_four_requests_on_a_63_block_pool_all_finish) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = NULL, *fr = NULL;
  struct sched *s = new_sched(&f, 63, 0);
  if (!s && !f) KT_SKIP("stories260K.gguf not found");
  struct sched *roomy = new_sched(&fr, 1024, 0);
  KT_ASSERT(s && roomy);
  enum { N = 64 };
  static int32_t prompts[N][48];
  uint32_t plen[N], gen[N];
  int32_t common[32];
  common[0] = 1;
  for (int j = 1; j < 32; j++)
    common[j] = (int32_t)kt_rand_range(3, 511);
  for (int i = 0; i < N; i++) {
    plen[i] = kt_rand_range(4, 48);
    gen[i] = kt_rand_range(8, 64);
    bool share = kt_rand_range(0, 2) == 0; /* some share a prefix (cached blocks in play) */
    for (uint32_t j = 0; j < plen[i]; j++)
      prompts[i][j] = share && j < 32 ? common[j] : (j == 0 ? 1 : (int32_t)kt_rand_range(3, 511));
  }
  static struct out ref[N], got[N];
  memset(ref, 0, sizeof ref);
  memset(got, 0, sizeof got);
  struct sched_req *reqs[N];
  for (int i = 0; i < N; i++) {
    reqs[i] = greedy_req(prompts[i], plen[i], gen[i]);
    sched_submit(roomy, reqs[i]);
  }
  run_until_done(roomy, reqs, ref, N);
  for (int i = 0; i < N; i++) {
    KT_CHECK_EQ(ref[i].finish, SCHED_FINISH_LENGTH);
    sched_req_free(reqs[i]);
    reqs[i] = greedy_req(prompts[i], plen[i], gen[i]);
    sched_submit(s, reqs[i]);
  }
  run_until_done(s, reqs, got, N);
  struct sched_stats st;
  sched_get_stats(s, &st);
  kt_log("63 blocks, 64 requests: %llu preemptions, %llu steps", (unsigned long long)st.preemptions,
         (unsigned long long)st.steps);
  int failed = 0;
  for (int i = 0; i < N; i++) {
    if (got[i].finish != SCHED_FINISH_LENGTH) failed++;
    KT_CHECK_MSG(got[i].finish == SCHED_FINISH_LENGTH, "request %d ended %d", i, got[i].finish);
    KT_CHECK_EQ(got[i].n, ref[i].n);
    KT_CHECK_MSG(memcmp(got[i].ids, ref[i].ids, got[i].n * 4) == 0, "request %d differs", i);
    sched_req_free(reqs[i]);
  }
  KT_CHECK_EQ(failed, 0);
  KT_CHECK_EQ(st.kv.used, 0);
  sched_free(roomy);
  sched_free(s);
  gguf_close(fr);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

/* A request stops on any id of the end-of-generation set it carries (not only eos: chat models
 * end turns with <|eot_id|>, <|im_end|>, <end_of_turn>), without emitting it; with no set it runs
 * to max_tokens. */
KT_TEST(request_stops_on_its_end_of_generation_set) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = NULL;
  struct sched *s = new_sched(&f, 64, 0);
  if (!s && !f) KT_SKIP("stories260K.gguf not found");
  KT_ASSERT(s);
  int32_t prompt[12];
  prompt[0] = 1;
  for (int j = 1; j < 12; j++)
    prompt[j] = (int32_t)kt_rand_range(3, 511);
  static struct out ref, got;
  memset(&ref, 0, sizeof ref);
  struct sched_req *r = greedy_req(prompt, 12, 16);
  sched_submit(s, r);
  run_until_done(s, &r, &ref, 1);
  sched_req_free(r);
  KT_ASSERT_EQ(ref.finish, SCHED_FINISH_LENGTH);
  KT_ASSERT_EQ(ref.n, 16);
  uint32_t at = kt_rand_range(2, 12);
  uint32_t first = 0; /* where that id first appears */
  while (ref.ids[first] != ref.ids[at])
    first++;
  int32_t eog[3] = {600000, ref.ids[at], -7}; /* ids never sampled around it */
  memset(&got, 0, sizeof got);
  r = greedy_req(prompt, 12, 16);
  r->eog = eog;
  r->n_eog = 3;
  sched_submit(s, r);
  run_until_done(s, &r, &got, 1);
  KT_CHECK_EQ(got.finish, SCHED_FINISH_STOP);
  KT_CHECK_EQ(got.n, first);
  KT_CHECK(memcmp(got.ids, ref.ids, first * 4) == 0);
  sched_req_free(r);
  sched_free(s);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

/* The top-k log-probs (a heap over the vocabulary) come out best first, ties to the lower id,
 * the first is the greedy token's own, and they are a part of one distribution. */
KT_TEST(logprobs_top_k_are_the_k_best_in_order) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = NULL;
  struct sched *s = new_sched(&f, 64, 0);
  if (!s && !f) KT_SKIP("stories260K.gguf not found");
  KT_ASSERT(s);
  int32_t prompt[8] = {1, 300, 301, 302, 303, 304, 305, 306};
  struct sched_req *r = greedy_req(prompt, 8, 6);
  r->logprobs = SCHED_MAX_TOP;
  sched_submit(s, r);
  int left = 1, events = 0;
  while (left) {
    pthread_mutex_lock(&mu);
    while (!notified)
      pthread_cond_wait(&cv, &mu);
    notified = 0;
    pthread_mutex_unlock(&mu);
    struct sched_event ev[16];
    uint32_t k;
    while ((k = sched_drain(s, ev, 16)) > 0)
      for (uint32_t i = 0; i < k; i++) {
        if (ev[i].done) {
          left = 0;
          continue;
        }
        events++;
        KT_CHECK_EQ(ev[i].n_top, SCHED_MAX_TOP);
        KT_CHECK_EQ(ev[i].top_id[0], ev[i].token); /* greedy: the best is the one taken */
        KT_CHECK(fabsf(ev[i].top_logprob[0] - ev[i].logprob) < 1e-6f);
        for (uint32_t j = 1; j < ev[i].n_top; j++)
          KT_CHECK(ev[i].top_logprob[j] < ev[i].top_logprob[j - 1] ||
                   (ev[i].top_logprob[j] == ev[i].top_logprob[j - 1] &&
                    ev[i].top_id[j] > ev[i].top_id[j - 1]));
        float sum = 0;
        for (uint32_t j = 0; j < ev[i].n_top; j++)
          sum += expf(ev[i].top_logprob[j]);
        KT_CHECK(sum <= 1.0001f && sum > 0.0f);
      }
  }
  KT_CHECK_EQ(events, 6);
  sched_req_free(r);
  sched_free(s);
  gguf_close(f);
  FIXTURE_CHECK_VALIDATION();
}

/* Defect: a session turn that failed (here: a prompt past the context, refused at admission)
 * consumed the session's pending token (the last answer's final token, not yet run) and could
 * leave its prompt's KV behind. A turn that yields nothing leaves the session as it was: the
 * next turn continues exactly as if the failed one had never been sent. */
KT_TEST(failed_session_turn_leaves_the_session_as_it_was) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct gguf_file *f = NULL;
  void *d = NULL;
  const uint32_t n_ctx = 128;
  struct sched *s = new_sched_ctx(n_ctx, 64, &f, &d);
  KT_ASSERT(s);
  int32_t pa[6] = {1, 300, 301, 302, 303, 304}, pc[3] = {305, 306, 307};
  static int32_t too_long[128];
  for (uint32_t i = 0; i < n_ctx; i++)
    too_long[i] = (int32_t)kt_rand_range(3, 511);
  struct sched_session *s1, *s2;
  KT_ASSERT_OK(sched_session_new(s, &s1));
  KT_ASSERT_OK(sched_session_new(s, &s2));
  static struct out oa, ob, oc, oa2, oc2;
  memset(&oa, 0, sizeof oa), memset(&ob, 0, sizeof ob), memset(&oc, 0, sizeof oc);
  memset(&oa2, 0, sizeof oa2), memset(&oc2, 0, sizeof oc2);
  struct sched_req *r[5];
  r[0] = greedy_req(pa, 6, 5);
  r[0]->session = s1;
  sched_submit(s, r[0]);
  run_until_done(s, &r[0], &oa, 1);
  uint32_t len1 = sched_session_len(s1);
  r[1] = greedy_req(too_long, n_ctx, 5); /* fails */
  r[1]->session = s1;
  sched_submit(s, r[1]);
  run_until_done(s, &r[1], &ob, 1);
  KT_CHECK_EQ(ob.finish, SCHED_FINISH_ERROR);
  KT_CHECK_EQ(sched_session_len(s1), len1);
  r[2] = greedy_req(pc, 3, 5);
  r[2]->session = s1;
  sched_submit(s, r[2]);
  run_until_done(s, &r[2], &oc, 1);
  /* The same conversation without the failed turn. */
  r[3] = greedy_req(pa, 6, 5);
  r[3]->session = s2;
  sched_submit(s, r[3]);
  run_until_done(s, &r[3], &oa2, 1);
  r[4] = greedy_req(pc, 3, 5);
  r[4]->session = s2;
  sched_submit(s, r[4]);
  run_until_done(s, &r[4], &oc2, 1);
  KT_CHECK_EQ(oc.n, 5);
  KT_CHECK_EQ(oc2.n, 5);
  KT_CHECK_MSG(memcmp(oc.ids, oc2.ids, 5 * 4) == 0, "the failed turn changed the session");
  KT_CHECK_EQ(sched_session_len(s1), sched_session_len(s2));
  for (int i = 0; i < 5; i++)
    sched_req_free(r[i]);
  sched_session_free(s, s1);
  sched_session_free(s, s2);
  sched_free(s);
  gguf_close(f);
  free(d);
  FIXTURE_CHECK_VALIDATION();
}
