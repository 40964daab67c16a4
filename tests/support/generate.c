/* The one-shot generation path: one sequence, prefill then decode, on the engine's step API. */
#include "generate.h"

#include "kvd_error.h"
#include "sample.h"

#include <stdlib.h>
#include <time.h>

static double gen_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int engine_generate(struct engine *e, const int32_t *prompt, uint32_t n_prompt, uint32_t max_new,
                    const struct sample_params *params, engine_token_fn on_token, void *ud,
                    struct engine_gen_stats *stats) {
  const struct model_hparams *hp = engine_hparams(e);
  if (n_prompt == 0) return KVD_EINVAL;
  struct sample_params greedy = {.temperature = 0, .top_p = 1, .repeat_penalty = 1};
  struct sampler *smp = NULL;
  struct engine_seq *seq = NULL;
  float *logits = malloc(hp->n_vocab * sizeof(float));
  int32_t *hist = malloc(((size_t)n_prompt + max_new + 1) * sizeof(int32_t));
  int rc =
      (logits && hist) ? sampler_new(hp->n_vocab, params ? params : &greedy, &smp) : KVD_ENOMEM;
  if (rc == 0) rc = engine_seq_new(e, &seq);
  uint32_t n_gen = 0;
  double t0 = gen_now(), t1 = t0;
  /* Prefill in chunks: only the last chunk asks for logits. */
  for (uint32_t done = 0; rc == 0 && done < n_prompt;) {
    uint32_t n = n_prompt - done;
    if (n > engine_max_step_tokens(e)) n = engine_max_step_tokens(e);
    struct engine_item it = {.seq = seq,
                             .tokens = prompt + done,
                             .n_tokens = n,
                             .logits = done + n == n_prompt ? logits : NULL};
    rc = engine_forward(e, &it, 1);
    done += n;
  }
  t1 = gen_now();
  for (uint32_t i = 0; rc == 0 && i < n_prompt; i++)
    hist[i] = prompt[i];
  while (rc == 0 && n_gen < max_new) {
    int32_t tok = sampler_sample(smp, logits, hist, n_prompt + n_gen);
    if (tok < 0) {
      rc = tok;
      break;
    }
    /* BOS mid-stream ends a story too: llama2.c-trained models use it as the separator. */
    if (tok == hp->eos_id || tok == hp->bos_id) break;
    hist[n_prompt + n_gen++] = tok;
    if (on_token && on_token(ud, tok, logits, hp->n_vocab)) break;
    if (n_gen == max_new) break;
    struct engine_item it = {.seq = seq, .tokens = &tok, .n_tokens = 1, .logits = logits};
    rc = engine_forward(e, &it, 1);
  }
  double t2 = gen_now();
  if (stats)
    *stats = (struct engine_gen_stats){
        .n_prompt = n_prompt, .n_generated = n_gen, .prefill_s = t1 - t0, .decode_s = t2 - t1};
  engine_seq_free(e, seq);
  sampler_free(smp);
  free(logits);
  free(hist);
  return rc < 0 ? rc : (int)n_gen;
}
