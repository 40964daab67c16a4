/* Token sampling from logits: greedy, temperature, top-k, top-p, min-p, and repetition /
 * frequency / presence penalties, driven by a seeded generator so the same seed gives the same
 * text. Order of application: penalties, top-k, top-p, min-p, temperature, draw. */
#ifndef KVD_MODEL_SAMPLE_H
#define KVD_MODEL_SAMPLE_H

#include <stddef.h>
#include <stdint.h>

struct sample_params {
  float temperature;       /* <= 0: greedy (argmax, lowest id on ties) */
  uint32_t top_k;          /* 0 = off */
  float top_p;             /* 1 = off */
  float min_p;             /* 0 = off: drop tokens below min_p * p(best) */
  float repeat_penalty;    /* 1 = off: CTRL-style divide positive / multiply negative logits */
  float freq_penalty;      /* 0 = off: minus count * freq_penalty */
  float presence_penalty;  /* 0 = off: minus presence_penalty once a token appeared */
  uint32_t penalty_last_n; /* how many recent tokens the penalties look at (0 = all) */
  uint64_t seed;
};

/* The defaults a user expects: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, no penalties. */
void sample_params_default(struct sample_params *p);
/* Checks ranges (temperature >= 0, 0 < top_p <= 1, 0 <= min_p <= 1, repeat_penalty > 0 ...):
 * KVD_EINVAL names nothing; the caller reports which request was bad. */
int sample_params_check(const struct sample_params *p);

struct sampler;

int sampler_new(uint32_t n_vocab, const struct sample_params *p, struct sampler **ret);
void sampler_free(struct sampler *s);

/* Picks the next token from logits (n_vocab floats, modified in place by the penalties) given the
 * tokens so far (prompt and output). Returns the token id (>= 0) or a negative code. */
int32_t sampler_sample(struct sampler *s, float *logits, const int32_t *history, size_t n_history);

/* log-softmax of logits into out (n floats), in float64 internally; for logprobs reporting. */
void sample_log_softmax(const float *logits, float *out, size_t n);

#endif
