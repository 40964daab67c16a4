/* Engine throughput: prefill and decode tokens/s, time per token with the KV cache against
 * recomputing the whole prefix without it, KV bytes per token, and where a decode step's GPU
 * time goes. A benchmark, not a test. Usage: bench_engine MODEL.gguf [prompt_len] [gen_len] */
#include "bench_util.h"
#include "engine.h"
#include "gpu.h"
#include "kvd_error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int step(struct engine *e, struct engine_seq *s, const int32_t *t, uint32_t n, float *lg) {
  struct engine_item it = {.seq = s, .tokens = t, .n_tokens = n, .logits = lg};
  return engine_forward(e, &it, 1);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: bench_engine MODEL.gguf [prompt_len] [gen_len]\n");
    return 2;
  }
  uint32_t n_prompt = argc > 2 ? (uint32_t)atoi(argv[2]) : 128;
  uint32_t n_gen = argc > 3 ? (uint32_t)atoi(argv[3]) : 128;
  struct gguf_file *f;
  struct gguf_error gerr;
  if (gguf_open(argv[1], &f, &gerr) < 0) {
    fprintf(stderr, "%s: %s\n", argv[1], gerr.msg);
    return 1;
  }
  struct gpu_instance *inst;
  struct gpu_device *dev;
  int rc = bench_device_open(NULL, &inst, &dev);
  if (rc < 0) {
    fprintf(stderr, "device: %s (%s)\n", kvd_strerror(rc), gpu_error_detail());
    return 1;
  }
  struct engine *e;
  struct model_error merr = {{0}};
  double t0 = bench_now();
  rc = engine_new(dev, f, &(struct engine_opts){.n_blocks = 4096}, &e, &merr);
  if (rc < 0) {
    fprintf(stderr, "engine: %s: %s\n", kvd_strerror(rc), merr.msg);
    return 1;
  }
  const struct model_hparams *hp = engine_hparams(e);
  if (n_prompt + n_gen > hp->n_ctx_train) n_gen = hp->n_ctx_train - n_prompt;
  printf("model %s: dim %u, %u layers, vocab %u; device %s\n", argv[1], hp->n_embd, hp->n_layer,
         hp->n_vocab, gpu_device_caps(dev)->name);
  printf("load: %.3f s; KV bytes per token (all layers, K+V, f32): %llu\n", bench_now() - t0,
         (unsigned long long)engine_kv_bytes_per_token(e));

  int32_t *toks = malloc((n_prompt + n_gen) * sizeof *toks);
  float *lg = malloc(hp->n_vocab * sizeof *lg);
  srand(7);
  toks[0] = hp->bos_id >= 0 ? hp->bos_id : 1;
  for (uint32_t i = 1; i < n_prompt + n_gen; i++)
    toks[i] = 3 + rand() % (int)(hp->n_vocab - 3);

  /* Warm-up: the first steps compile nothing (pipelines exist) but fault in memory. */
  struct engine_seq *s;
  engine_seq_new(e, &s);
  step(e, s, toks, 8, lg);
  engine_seq_free(e, s);

  /* Prefill: the whole prompt in one step. */
  engine_seq_new(e, &s);
  t0 = bench_now();
  rc = step(e, s, toks, n_prompt, lg);
  double prefill = bench_now() - t0;
  /* Decode n_gen tokens one step each with the KV cache. */
  t0 = bench_now();
  for (uint32_t i = 0; i < n_gen && rc == 0; i++)
    rc = step(e, s, &toks[n_prompt + i], 1, lg);
  double decode = bench_now() - t0;
  engine_seq_free(e, s);
  if (rc < 0) {
    fprintf(stderr, "forward: %s (%s)\n", kvd_strerror(rc), gpu_error_detail());
    return 1;
  }
  printf("prefill %u tokens: %.3f s = %.1f tokens/s\n", n_prompt, prefill, n_prompt / prefill);
  printf("decode %u tokens after %u: %.3f s = %.1f tokens/s (%.2f ms/token)\n", n_gen, n_prompt,
         decode, n_gen / decode, decode / n_gen * 1e3);

  /* Without a KV cache every new token recomputes the whole prefix: time a few such tokens at
   * the end of the same context and compare with the cached decode's time per token there. */
  uint32_t ctx = n_prompt + n_gen - 4;
  double nocache = 0, cached = 0;
  for (int i = 0; i < 4 && rc == 0; i++) {
    engine_seq_new(e, &s);
    t0 = bench_now();
    rc = step(e, s, toks, ctx + (uint32_t)i, lg); /* prefix recomputed from scratch */
    nocache += bench_now() - t0;
    t0 = bench_now();
    if (rc == 0) rc = step(e, s, &toks[ctx + i], 1, lg); /* the same token with the cache */
    cached += bench_now() - t0;
    engine_seq_free(e, s);
  }
  printf("at %u tokens of context: %.2f ms/token with the KV cache, %.2f ms/token recomputing "
         "the prefix (%.1fx)\n",
         ctx, cached / 4 * 1e3, nocache / 4 * 1e3, nocache / cached);

  /* Where one decode step's GPU time goes (timestamp queries, summed by label). */
  engine_seq_new(e, &s);
  step(e, s, toks, 64, lg);
  step(e, s, &toks[64], 1, lg);
  const struct gpu_timing *tm;
  uint32_t n = engine_last_timings(e, &tm);
  double total = 0;
  for (uint32_t i = 0; i < n; i++)
    total += tm[i].ns;
  printf("one decode step: %u dispatches, %.3f ms of GPU time\n", n, total * 1e-6);
  /* Sum by label, in order of first appearance. */
  const char *labels[64];
  double sums[64];
  int counts[64], nl = 0;
  for (uint32_t i = 0; i < n; i++) {
    int j = 0;
    while (j < nl && strcmp(labels[j], tm[i].label) != 0)
      j++;
    if (j == nl && nl < 64) {
      labels[nl] = tm[i].label;
      sums[nl] = 0;
      counts[nl++] = 0;
    }
    if (j < 64) {
      sums[j] += tm[i].ns;
      counts[j]++;
    }
  }
  for (int j = 0; j < nl; j++)
    printf("  %-16s %3d x  %8.3f ms\n", labels[j], counts[j], sums[j] * 1e-6);
  engine_seq_free(e, s);
  engine_free(e);
  gpu_device_free(dev);
  gpu_instance_free(inst);
  gguf_close(f);
  free(toks);
  free(lg);
  return 0;
}
