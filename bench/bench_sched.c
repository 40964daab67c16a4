/* Scheduler throughput: tokens/s over all streams for 1, 2, 4, 8 and 16 concurrent requests,
 * time to first token, and KV memory waste (allocated-but-unused token slots / allocated slots,
 * sampled at every event) under a mixed workload. A benchmark, not a test.
 * Usage: bench_sched MODEL.gguf [gen_tokens] */
#include "bench_util.h"
#include "engine.h"
#include "gpu.h"
#include "kvd_error.h"
#include "scheduler.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

struct run_stats {
  double seconds, ttft_mean, waste_mean;
  uint64_t tokens;
};

/* n requests with prompts of mixed lengths, all submitted at once; waits for all of them. */
static void run(struct sched *s, int n, uint32_t gen, uint32_t n_vocab, struct run_stats *out) {
  struct sched_req *reqs[64];
  uint32_t plen[64], got[64] = {0};
  double first[64] = {0};
  double t0 = bench_now();
  for (int i = 0; i < n; i++) {
    plen[i] = 16 + (uint32_t)(i * 37 % 100); /* 16..115 tokens */
    int32_t toks[128];
    toks[0] = 1;
    for (uint32_t j = 1; j < plen[i]; j++)
      toks[j] = 3 + (int32_t)((i * 131 + j * 17) % (n_vocab - 3));
    sched_req_new(toks, plen[i], &reqs[i]);
    reqs[i]->sp = (struct sample_params){.temperature = 0, .top_p = 1, .repeat_penalty = 1};
    reqs[i]->max_tokens = gen;
    sched_submit(s, reqs[i]);
  }
  int left = n;
  double waste_sum = 0;
  uint64_t waste_n = 0, tokens = 0;
  while (left > 0) {
    pthread_mutex_lock(&mu);
    while (!notified)
      pthread_cond_wait(&cv, &mu);
    notified = 0;
    pthread_mutex_unlock(&mu);
    struct sched_event ev[64];
    uint32_t k;
    while ((k = sched_drain(s, ev, 64)) > 0) {
      for (uint32_t e = 0; e < k; e++) {
        int i = 0;
        while (reqs[i] != ev[e].req)
          i++;
        if (ev[e].done) {
          left--;
        } else {
          if (!got[i]++) first[i] = bench_now() - t0;
          tokens++;
        }
      }
      /* Waste: the slots the pool handed out that hold no token yet. */
      struct sched_stats st;
      sched_get_stats(s, &st);
      uint64_t held = 0;
      for (int i = 0; i < n; i++)
        held += got[i] < gen ? plen[i] + got[i] : 0;
      uint64_t slots = (uint64_t)st.kv.used * st.kv.block_size;
      if (slots && held <= slots) {
        waste_sum += (double)(slots - held) / (double)slots;
        waste_n++;
      }
    }
  }
  out->seconds = bench_now() - t0;
  out->tokens = tokens;
  out->ttft_mean = 0;
  for (int i = 0; i < n; i++)
    out->ttft_mean += first[i] / n;
  out->waste_mean = waste_n ? waste_sum / (double)waste_n : 0;
  for (int i = 0; i < n; i++)
    sched_req_free(reqs[i]);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: bench_sched MODEL.gguf [gen_tokens]\n");
    return 2;
  }
  uint32_t gen = argc > 2 ? (uint32_t)atoi(argv[2]) : 64;
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
    rc = engine_new(
        dev, f, &(struct engine_opts){.n_blocks = 2048, .max_step_tokens = 256, .max_logits = 32},
        &e, &merr);
  struct sched *s = NULL;
  if (rc == 0)
    rc = sched_new(
        e, &(struct sched_opts){.step_tokens = 256, .max_running = 32, .notify = on_notify}, &s);
  if (rc < 0) {
    fprintf(stderr, "setup: %s (%s %s)\n", kvd_strerror(rc), merr.msg, gpu_error_detail());
    return 1;
  }
  printf("%s on %s, %u tokens per stream, prompts 16..115 tokens\n", argv[1],
         gpu_device_caps(dev)->name, gen);
  printf("streams  total tok/s  per-stream tok/s  mean TTFT ms  KV waste\n");
  uint32_t n_vocab = engine_hparams(e)->n_vocab;
  static const int counts[] = {1, 2, 4, 8, 16};
  for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++) {
    struct run_stats rs;
    run(s, counts[c], gen, n_vocab, &rs);
    printf("%7d  %11.1f  %16.1f  %12.1f  %7.1f%%\n", counts[c], rs.tokens / rs.seconds,
           rs.tokens / rs.seconds / counts[c], rs.ttft_mean * 1e3, rs.waste_mean * 100);
  }
  /* Time to first token for a 400-token prompt: cold, then again with the same first 384 tokens
   * (a shared system prompt or document) and a new tail, served from the prefix cache. */
  static int32_t doc[400];
  doc[0] = 1;
  for (int i = 1; i < 400; i++)
    doc[i] = 3 + (int32_t)((i * 7919) % (n_vocab - 3));
  double ttft[2];
  for (int pass = 0; pass < 2; pass++) {
    if (pass)
      for (int i = 384; i < 400; i++)
        doc[i] = 3 + (int32_t)((i * 31 + 5) % (n_vocab - 3));
    struct sched_req *r;
    sched_req_new(doc, 400, &r);
    r->sp = (struct sample_params){.temperature = 0, .top_p = 1, .repeat_penalty = 1};
    r->max_tokens = 1;
    double t0 = bench_now();
    sched_submit(s, r);
    for (bool done = false; !done;) {
      pthread_mutex_lock(&mu);
      while (!notified)
        pthread_cond_wait(&cv, &mu);
      notified = 0;
      pthread_mutex_unlock(&mu);
      struct sched_event ev[16];
      uint32_t k;
      while ((k = sched_drain(s, ev, 16)) > 0)
        for (uint32_t i = 0; i < k; i++)
          done |= ev[i].done;
    }
    ttft[pass] = r->t_first - t0;
    if (pass)
      printf("time to first token, 400-token prompt: cold %.1f ms, %u tokens from the "
             "prefix cache %.1f ms\n",
             ttft[0] * 1e3, r->cached_tokens, ttft[1] * 1e3);
    sched_req_free(r);
  }
  struct sched_stats st;
  sched_get_stats(s, &st);
  printf("steps %llu, largest batch %llu tokens, preemptions %llu, prefix hits %llu of %llu "
         "blocks\n",
         (unsigned long long)st.steps, (unsigned long long)st.batch_tokens_max,
         (unsigned long long)st.preemptions, (unsigned long long)st.kv.hits,
         (unsigned long long)st.kv.lookups);
  sched_free(s); /* frees the engine */
  gpu_device_free(dev);
  gpu_instance_free(inst);
  gguf_close(f);
  return 0;
}
