/* What a KV type costs in accuracy, measured: a text is generated greedily with exact (f32) KV,
 * then teacher-forced through an engine storing KV in the type under test, and at every position
 * the next-token distributions are compared. Used by test_engine (thresholds) and bench_kv
 * (BENCHMARKS.md). Test support, never in kvd. */
#ifndef KVD_TEST_KVACC_H
#define KVD_TEST_KVACC_H

#include "engine.h"

struct kvacc_result {
  uint32_t n;          /* positions compared */
  double mean_kl;      /* mean KL(p_f32 || p_type), nats */
  double max_kl;
  double top1;         /* share of positions where both put the same token first */
  double ppl_f32;      /* perplexity of the text's next tokens under each */
  double ppl_type;
};

/* text: n_text token ids (a prompt then its f32-KV greedy continuation, kvacc_text()). Runs it
 * one token per step (prefill chunks of 64 first, then decode) through an f32-KV engine and a
 * kv_type engine on dev. 0 or a negative kvd code. */
int kvacc_measure(struct gpu_device *dev, const struct gguf_file *f, enum kv_type kv_type,
                  const int32_t *text, uint32_t n_text, struct kvacc_result *ret);

/* A text to measure on: prompt, then greedy tokens with f32 KV up to n_text in all (stops early
 * at the model's EOS). Returns the length, or a negative code. */
int kvacc_text(struct gpu_device *dev, const struct gguf_file *f, const int32_t *prompt,
               uint32_t n_prompt, int32_t *text, uint32_t n_text);

#endif
