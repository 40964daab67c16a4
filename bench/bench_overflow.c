/* Past the context: one greedy generation of 4x the model's context under each overflow policy
 * (shift, window), with decode tokens/s and KV blocks in use per quarter of the run (both should
 * stay flat: dropping tokens gives whole blocks back), then the cost of one shift measured on the
 * engine directly (a full context, keep 4, drop half) against one decode step. A benchmark, not a
 * test: it prints numbers for BENCHMARKS.md and asserts nothing about speed.
 * Usage: bench_overflow MODEL.gguf [kv_type] */
#include "bench_util.h"
#include "engine.h"
#include "gpu.h"
#include "kvd_error.h"
#include "scheduler.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QUARTERS 4

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int notified;

static void on_notify(void *ud) {
  (void)ud;
  pthread_mutex_lock(&mu);
  notified = 1;
  pthread_cond_signal(&cv);
  pthread_mutex_unlock(&mu);
}

static void wait_notify(void) {
  pthread_mutex_lock(&mu);
  while (!notified)
    pthread_cond_wait(&cv, &mu);
  notified = 0;
  pthread_mutex_unlock(&mu);
}

/* One request of `gen` tokens after a 32-token prompt; prints tokens/s and the most KV blocks in
 * use in each quarter of the generation. */
static int run_policy(struct sched *s, enum kv_overflow pol, uint32_t gen, uint32_t n_vocab) {
  int32_t prompt[32];
  prompt[0] = 1;
  for (int i = 1; i < 32; i++)
    prompt[i] = 3 + (int32_t)((i * 7919) % (n_vocab - 3));
  struct sched_req *r;
  int rc = sched_req_new(prompt, 32, &r);
  if (rc < 0) return rc;
  r->sp = (struct sample_params){.temperature = 0, .top_p = 1, .repeat_penalty = 1};
  r->max_tokens = gen;
  r->overflow = pol;
  r->keep = 4; /* BOS plus three: the window's sinks, and what shift keeps */
  struct sched_stats st0;
  sched_get_stats(s, &st0);
  double t_q[QUARTERS + 1] = {0};
  uint32_t max_used[QUARTERS] = {0}, got = 0;
  rc = sched_submit(s, r);
  if (rc < 0) {
    sched_req_free(r);
    return rc;
  }
  bool done = false;
  int err = 0;
  enum sched_finish fin = SCHED_FINISH_LENGTH;
  while (!done) {
    wait_notify();
    struct sched_event ev[64];
    uint32_t k;
    while ((k = sched_drain(s, ev, 64)) > 0) {
      for (uint32_t i = 0; i < k; i++) {
        if (ev[i].done) {
          done = true;
          fin = ev[i].finish;
          err = ev[i].error;
          continue;
        }
        if (got == 0) t_q[0] = bench_now(); /* decode speed: from the first token on */
        got++;
        uint32_t q = (uint32_t)((uint64_t)(got - 1) * QUARTERS / gen);
        if (q >= QUARTERS) q = QUARTERS - 1;
        struct sched_stats st;
        sched_get_stats(s, &st);
        if (st.kv.used > max_used[q]) max_used[q] = st.kv.used;
        t_q[q + 1] = bench_now();
      }
    }
  }
  struct sched_stats st;
  sched_get_stats(s, &st);
  printf("%-6s  %5u tokens (%s)", kv_overflow_name(pol), got,
         fin == SCHED_FINISH_ERROR  ? kvd_strerror(err)
         : fin == SCHED_FINISH_STOP ? "end of text"
                                    : "max_tokens");
  for (int q = 0; q < QUARTERS; q++) {
    double dt = t_q[q + 1] - t_q[q];
    uint32_t n = gen / QUARTERS - (q == 0); /* the first token starts the clock */
    printf("  | %6.1f tok/s %3u blk", dt > 0 ? n / dt : 0.0, max_used[q]);
  }
  printf("  | %llu shifts, %llu tokens dropped\n", (unsigned long long)(st.shifts - st0.shifts),
         (unsigned long long)(st.shift_dropped - st0.shift_dropped));
  sched_req_free(r);
  return fin == SCHED_FINISH_ERROR ? err : 0;
}

static int step_one(struct engine *e, struct engine_seq *seq, int32_t tok, float *logits) {
  struct engine_item it = {.seq = seq, .tokens = &tok, .n_tokens = 1, .logits = logits};
  return engine_forward(e, &it, 1);
}

/* The cost of one shift on a full sequence against a decode step at the same length. */
static int time_shift(struct engine *e, uint32_t n_ctx, uint32_t n_vocab, uint32_t block_size) {
  float *logits = malloc((size_t)n_vocab * sizeof *logits);
  int32_t *toks = malloc((size_t)n_ctx * sizeof *toks);
  if (!logits || !toks) {
    free(logits);
    free(toks);
    return KVD_ENOMEM;
  }
  for (uint32_t i = 0; i < n_ctx; i++)
    toks[i] = 3 + (int32_t)((i * 31 + 7) % (n_vocab - 3));
  toks[0] = 1;
  uint32_t step = engine_max_step_tokens(e);
  double shift_best = 1e9, decode_best = 1e9;
  int rc = 0;
  uint32_t keep = 4, n_drop = 0;
  for (int round = 0; round < 5 && rc == 0; round++) {
    struct engine_seq *seq;
    if ((rc = engine_seq_new(e, &seq)) < 0) break;
    for (uint32_t at = 0; at < n_ctx - 1 && rc == 0;) {
      uint32_t n = n_ctx - 1 - at < step ? n_ctx - 1 - at : step;
      struct engine_item it = {.seq = seq, .tokens = toks + at, .n_tokens = n, .logits = NULL};
      rc = engine_forward(e, &it, 1);
      at += n;
    }
    double t0 = bench_now();
    if (rc == 0) rc = step_one(e, seq, toks[n_ctx - 1], logits); /* decode at a full context */
    double t1 = bench_now();
    /* What the scheduler's shift policy drops at a full context: half of what follows keep,
     * rounded down to whole blocks. */
    n_drop = (n_ctx - keep) / 2 / block_size * block_size;
    if (rc == 0) rc = engine_seq_shift(e, seq, keep, n_drop);
    double t2 = bench_now();
    if (rc == 0 && t1 - t0 < decode_best) decode_best = t1 - t0;
    if (rc == 0 && t2 - t1 < shift_best) shift_best = t2 - t1;
    engine_seq_free(e, seq);
  }
  if (rc == 0)
    printf("one shift at a full context of %u (keep %u, drop %u, %u tokens' keys rotated): "
           "%.2f ms, best of 5; one decode step there: %.2f ms\n",
           n_ctx, keep, n_drop, n_ctx - keep - n_drop, shift_best * 1e3, decode_best * 1e3);
  free(logits);
  free(toks);
  return rc;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: bench_overflow MODEL.gguf [f32|f16|q8_0|q4_0]\n");
    return 2;
  }
  enum kv_type kt = KV_F16;
  if (argc > 2 && kv_type_parse(argv[2], &kt) < 0) {
    fprintf(stderr, "unknown KV type %s\n", argv[2]);
    return 2;
  }
  struct gguf_file *f;
  struct gguf_error gerr;
  if (gguf_open(argv[1], &f, &gerr) < 0) {
    fprintf(stderr, "%s: %s\n", argv[1], gerr.msg);
    return 1;
  }
  struct gpu_instance *inst;
  struct gpu_device *dev;
  int rc = bench_device_open(NULL, &inst, &dev);
  struct engine *e = NULL;
  struct model_error merr = {{0}};
  if (rc == 0)
    rc = engine_new(dev, f,
                    &(struct engine_opts){
                        .n_blocks = 256, .max_step_tokens = 256, .max_logits = 8, .kv_type = kt},
                    &e, &merr);
  if (rc < 0) {
    fprintf(stderr, "setup: %s (%s %s)\n", kvd_strerror(rc), merr.msg, gpu_error_detail());
    return 1;
  }
  uint32_t n_ctx = engine_hparams(e)->n_ctx_train, n_vocab = engine_hparams(e)->n_vocab;
  struct kv_pool_stats kst;
  engine_kv_stats(e, &kst);
  /* Stories260K claims 2048 positions but was trained on 512; the arch/ models say their own. */
  printf("%s on %s, KV %s, context %u, block %u tokens, %u-token generation (4x the context)\n",
         argv[1], gpu_device_caps(dev)->name, kv_type_name(kt), n_ctx, kst.block_size, 4 * n_ctx);
  rc = time_shift(e, n_ctx, n_vocab, kst.block_size);
  if (rc < 0) fprintf(stderr, "shift timing: %s\n", kvd_strerror(rc));
  struct sched *s = NULL;
  if (rc == 0)
    rc = sched_new(
        e, &(struct sched_opts){.step_tokens = 256, .max_running = 8, .notify = on_notify}, &s);
  if (rc < 0) {
    fprintf(stderr, "sched: %s\n", kvd_strerror(rc));
    return 1;
  }
  printf("policy  generated           | quarter 1: decode speed, most KV blocks in use | 2 | 3 "
         "| 4\n");
  static const enum kv_overflow pols[] = {KV_OVERFLOW_SHIFT, KV_OVERFLOW_WINDOW};
  for (size_t i = 0; i < sizeof pols / sizeof pols[0] && rc == 0; i++)
    rc = run_policy(s, pols[i], 4 * n_ctx, n_vocab);
  sched_free(s); /* frees the engine */
  gpu_device_free(dev);
  gpu_instance_free(inst);
  gguf_close(f);
  return rc < 0 ? 1 : 0;
}
