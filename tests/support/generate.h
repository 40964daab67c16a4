/* One-shot generation over the engine, for tests and benchmarks (the daemon goes through the
 * scheduler): a fresh sequence, the prompt in chunks, then sampling until EOS or a limit. */
#ifndef KVD_TESTSUPPORT_GENERATE_H
#define KVD_TESTSUPPORT_GENERATE_H

#include <stdint.h>

#include "engine.h"

/* ---- one-shot generation ---- */

/* Called with each generated token and the logits it was chosen from (n_vocab floats); return
 * nonzero to stop. */
typedef int (*engine_token_fn)(void *ud, int32_t token, const float *logits, uint32_t n_vocab);

struct sample_params;

struct engine_gen_stats {
  uint32_t n_prompt, n_generated;
  double prefill_s, decode_s; /* wall time of the prefill steps and of the decode steps */
};

/* Runs prompt (n_prompt >= 1 ids) on a fresh sequence in chunks of at most max_step_tokens, then
 * samples up to max_new tokens (params NULL = greedy), stopping at the model's EOS or BOS (not
 * passed to on_token) or when on_token asks. Returns the number of tokens generated or a negative
 * code. stats may be NULL. */
int engine_generate(struct engine *e, const int32_t *prompt, uint32_t n_prompt, uint32_t max_new,
                    const struct sample_params *params, engine_token_fn on_token, void *ud,
                    struct engine_gen_stats *stats);

#endif
