/* KV types side by side: for each of f32, f16, q8_0 and q4_0, the accuracy against f32 KV over a
 * long generated text (mean KL of the next-token distribution, top-1 agreement, perplexity),
 * decode speed at several positions, prefill speed, bytes per token and how many 512-token
 * sequences a 1 GiB budget and the daemon's default budget hold. A benchmark, not a test.
 * Usage: bench_kv MODEL.gguf [text_len] */
#include "bench_util.h"
#include "engine.h"
#include "gpu.h"
#include "kvacc.h"
#include "kvd_error.h"

#include <stdio.h>
#include <stdlib.h>

/* Decode tok/s over 16 steps starting at position pos, and prefill tok/s of pos tokens. */
static int speed(struct gpu_device *dev, const struct gguf_file *f, enum kv_type t,
                 const int32_t *toks, uint32_t pos, double *decode, double *prefill) {
  struct engine *e;
  struct model_error err;
  int rc = engine_new(dev, f, &(struct engine_opts){.n_blocks = (pos + 32) / 16 + 4, .kv_type = t},
                      &e, &err);
  if (rc < 0) return rc;
  uint32_t nv = engine_hparams(e)->n_vocab;
  float *lg = malloc(nv * sizeof *lg);
  struct engine_seq *s;
  rc = engine_seq_new(e, &s);
  double t0 = bench_now();
  for (uint32_t done = 0; rc == 0 && done < pos;) {
    uint32_t k = pos - done < 256 ? pos - done : 256;
    struct engine_item it = {s, toks + done, k, lg, 1};
    rc = engine_forward(e, &it, 1);
    done += k;
  }
  *prefill = pos / (bench_now() - t0);
  t0 = bench_now();
  for (uint32_t i = 0; rc == 0 && i < 16; i++) {
    struct engine_item it = {s, toks + pos + i, 1, lg, 1};
    rc = engine_forward(e, &it, 1);
  }
  *decode = 16 / (bench_now() - t0);
  engine_seq_free(e, s);
  engine_free(e);
  free(lg);
  return rc;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: bench_kv MODEL.gguf [text_len]\n");
    return 2;
  }
  uint32_t n_text = argc > 2 ? (uint32_t)atoi(argv[2]) : 512;
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
  struct model_hparams hp;
  struct model_error merr;
  if (model_hparams_read(f, &hp, &merr) < 0) return 1;
  if (n_text > hp.n_ctx_train) n_text = hp.n_ctx_train;
  int32_t prompt[8], *text = malloc(n_text * sizeof *text);
  srand(11);
  prompt[0] = hp.bos_id >= 0 ? hp.bos_id : 1;
  for (int i = 1; i < 8; i++)
    prompt[i] = 3 + rand() % (int)(hp.n_vocab - 3);
  int n = kvacc_text(dev, f, prompt, 8, text, n_text);
  if (n < 0) {
    fprintf(stderr, "text: %s\n", kvd_strerror(n));
    return 1;
  }
  /* Random ids past the text for the speed runs, which need n_text + 16 tokens. */
  uint32_t n_speed = hp.n_ctx_train < 1024 ? hp.n_ctx_train - 16 : 1008;
  int32_t *toks = malloc((n_speed + 16) * sizeof *toks);
  for (uint32_t i = 0; i < n_speed + 16; i++)
    toks[i] = i < (uint32_t)n ? text[i] : 3 + rand() % (int)(hp.n_vocab - 3);
  printf("model %s, %d-token greedy text (f32 KV), device %s\n", argv[1], n,
         gpu_device_caps(dev)->name);
  printf("| KV | bytes/token | 512-token seqs in 1 GiB | in the default budget | mean KL | max KL "
         "| top-1 | ppl (f32 -> "
         "type) | decode tok/s @32 / @256 / @%u | prefill tok/s (%u) |\n",
         n_speed, n_speed);
  printf("|---|---|---|---|---|---|---|---|---|---|\n");
  for (int t = 0; t < KV_TYPE_COUNT; t++) {
    struct kvacc_result r = {0};
    if ((rc = kvacc_measure(dev, f, (enum kv_type)t, text, (uint32_t)n, &r)) < 0) {
      printf("| %s | %s |\n", kv_type_name((enum kv_type)t), kvd_strerror(rc));
      continue;
    }
    double d32, d256, dend, p32, p256, pend;
    speed(dev, f, (enum kv_type)t, toks, 32, &d32, &p32);
    speed(dev, f, (enum kv_type)t, toks, 256 < n_speed ? 256 : n_speed / 2, &d256, &p256);
    speed(dev, f, (enum kv_type)t, toks, n_speed, &dend, &pend);
    struct engine *e;
    /* The daemon's default budget (half the free device memory, at most 32 full contexts):
     * how many 512-token sequences fit before the scheduler must preempt. */
    engine_new(dev, f, &(struct engine_opts){.kv_type = (enum kv_type)t}, &e, &merr);
    uint64_t bpt = e ? engine_kv_bytes_per_token(e) : 0;
    struct kv_pool_stats st = {0};
    if (e) engine_kv_stats(e, &st);
    engine_free(e);
    printf("| %s | %llu | %llu | %llu | %.2e | %.2e | %.1f%% | %.4f -> %.4f | %.1f / %.1f / %.1f | "
           "%.0f |\n",
           kv_type_name((enum kv_type)t), (unsigned long long)bpt,
           bpt ? (unsigned long long)((1ull << 30) / (512 * bpt)) : 0ull,
           (unsigned long long)(st.total / (512 / KV_BLOCK_SIZE_DEFAULT)), r.mean_kl, r.max_kl,
           100 * r.top1, r.ppl_f32, r.ppl_type, d32, d256, dend, pend);
  }
  free(text);
  free(toks);
  gpu_device_free(dev);
  gpu_instance_free(inst);
  gguf_close(f);
  return 0;
}
