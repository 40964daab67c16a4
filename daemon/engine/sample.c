#include "sample.h"

#include "kvd_error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct cand {
  float logit;
  int32_t id;
};

struct sampler {
  struct sample_params p;
  uint32_t n_vocab;
  uint64_t rng[4]; /* xoshiro256** state */
  struct cand *cands;
  uint32_t *counts; /* occurrences of each id in the penalty window */
};

void sample_params_default(struct sample_params *p) {
  *p = (struct sample_params){.temperature = 0.8f,
                              .top_k = 40,
                              .top_p = 0.95f,
                              .min_p = 0.05f,
                              .repeat_penalty = 1.0f,
                              .penalty_last_n = 64,
                              .seed = 0};
}

int sample_params_check(const struct sample_params *p) {
  if (!(p->temperature >= 0) || !(p->top_p > 0 && p->top_p <= 1) ||
      !(p->min_p >= 0 && p->min_p <= 1) || !(p->repeat_penalty > 0) || !isfinite(p->freq_penalty) ||
      !isfinite(p->presence_penalty) || !isfinite(p->temperature))
    return KVD_EINVAL;
  return 0;
}

static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) {
  return (x << k) | (x >> (64 - k));
}

static uint64_t rng_next(uint64_t s[4]) {
  uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return result;
}

int sampler_new(uint32_t n_vocab, const struct sample_params *p, struct sampler **ret) {
  if (n_vocab == 0 || sample_params_check(p) < 0) return KVD_EINVAL;
  struct sampler *s = calloc(1, sizeof *s);
  if (!s) return KVD_ENOMEM;
  s->p = *p;
  s->n_vocab = n_vocab;
  s->cands = malloc(n_vocab * sizeof *s->cands);
  s->counts = calloc(n_vocab, sizeof *s->counts);
  if (!s->cands || !s->counts) {
    sampler_free(s);
    return KVD_ENOMEM;
  }
  uint64_t x = p->seed;
  for (int i = 0; i < 4; i++)
    s->rng[i] = splitmix64(&x);
  *ret = s;
  return 0;
}

void sampler_free(struct sampler *s) {
  if (!s) return;
  free(s->cands);
  free(s->counts);
  free(s);
}

static void apply_penalties(struct sampler *s, float *logits, const int32_t *hist, size_t n) {
  const struct sample_params *p = &s->p;
  if (p->repeat_penalty == 1.0f && p->freq_penalty == 0.0f && p->presence_penalty == 0.0f) return;
  size_t start = (p->penalty_last_n && n > p->penalty_last_n) ? n - p->penalty_last_n : 0;
  for (size_t i = start; i < n; i++)
    if (hist[i] >= 0 && (uint32_t)hist[i] < s->n_vocab) s->counts[hist[i]]++;
  for (size_t i = start; i < n; i++) {
    int32_t id = hist[i];
    if (id < 0 || (uint32_t)id >= s->n_vocab || s->counts[id] == 0) continue;
    float l = logits[id];
    l = l > 0 ? l / p->repeat_penalty : l * p->repeat_penalty;
    l -= (float)s->counts[id] * p->freq_penalty + p->presence_penalty;
    logits[id] = l;
    s->counts[id] = 0; /* applied once per distinct token; also resets for the next call */
  }
}

static int cand_desc(const void *a, const void *b) {
  const struct cand *x = a, *y = b;
  if (x->logit != y->logit) return x->logit < y->logit ? 1 : -1;
  return x->id < y->id ? -1 : x->id > y->id;
}

int32_t sampler_sample(struct sampler *s, float *logits, const int32_t *history, size_t n_history) {
  const struct sample_params *p = &s->p;
  apply_penalties(s, logits, history, n_history);
  if (p->temperature <= 0) {
    int32_t best = 0;
    for (uint32_t i = 1; i < s->n_vocab; i++)
      if (logits[i] > logits[best]) best = (int32_t)i;
    return best;
  }
  uint32_t n = s->n_vocab;
  for (uint32_t i = 0; i < n; i++)
    s->cands[i] = (struct cand){logits[i], (int32_t)i};
  /* A full sort is O(V log V); fine at these vocabulary sizes next to a forward pass. */
  qsort(s->cands, n, sizeof *s->cands, cand_desc);
  if (p->top_k && p->top_k < n) n = p->top_k;
  /* Probabilities at temperature 1 decide the top-p / min-p cut, as users expect from llama.cpp. */
  double mx = s->cands[0].logit, sum = 0;
  for (uint32_t i = 0; i < n; i++)
    sum += exp((double)s->cands[i].logit - mx);
  if (p->top_p < 1.0f) {
    double acc = 0;
    uint32_t keep = n;
    for (uint32_t i = 0; i < n; i++) {
      acc += exp((double)s->cands[i].logit - mx) / sum;
      if (acc >= p->top_p) {
        keep = i + 1;
        break;
      }
    }
    n = keep;
  }
  if (p->min_p > 0.0f) {
    /* p_i / p_best = exp(l_i - l_best) */
    uint32_t keep = 1;
    while (keep < n && exp((double)s->cands[keep].logit - mx) >= p->min_p)
      keep++;
    n = keep;
  }
  double total = 0;
  for (uint32_t i = 0; i < n; i++)
    total += exp(((double)s->cands[i].logit - mx) / p->temperature);
  double u = (double)(rng_next(s->rng) >> 11) * (1.0 / 9007199254740992.0) * total;
  for (uint32_t i = 0; i < n; i++) {
    u -= exp(((double)s->cands[i].logit - mx) / p->temperature);
    if (u < 0) return s->cands[i].id;
  }
  return s->cands[n - 1].id;
}

void sample_log_softmax(const float *logits, float *out, size_t n) {
  double mx = logits[0];
  for (size_t i = 1; i < n; i++)
    if (logits[i] > mx) mx = logits[i];
  double sum = 0;
  for (size_t i = 0; i < n; i++)
    sum += exp((double)logits[i] - mx);
  double lse = mx + log(sum);
  for (size_t i = 0; i < n; i++)
    out[i] = (float)((double)logits[i] - lse);
}
