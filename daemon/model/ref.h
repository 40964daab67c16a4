/* The CPU reference forward pass: token ids in, logits out, one token at a time.
 *
 * It is slow and plain on purpose (see ref_ops.h): the numbers the GPU path and the tests are
 * checked against. Activations and the KV cache are float32; every weight is dequantized exactly
 * to float32, by default once at load. */
#ifndef KVD_MODEL_REF_H
#define KVD_MODEL_REF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "arch.h"
#include "gguf.h"
#include "kv_format.h"

struct model_ref;

struct model_ref_opts {
  /* Positions the KV cache holds (memory grows linearly with it); 0 means the model's
   * context_length. Larger than context_length is refused. */
  uint32_t n_ctx;
  /* Dequantize each matrix row on every use instead of once at load. Memory stays near the
   * file's size instead of 4 bytes per weight, at the price of dequantizing the model per token.
   * The results are bit-identical either way. */
  bool stream_weights;
  /* Each position's K and V rows are rounded through this KV type (kv_format.h) as they are
   * cached, as the engine stores them; the zero value, f32, keeps them exact. */
  enum kv_type kv_type;
};

/* Binds and checks the model in f (see arch.h) and allocates its buffers. f must outlive the
 * reference. opts may be NULL for the defaults. Returns 0, the errors of model_weights_new(),
 * KVD_E_CONTEXT for an n_ctx above the model's, or KVD_ENOMEM; err says why. */
int model_ref_new(const struct gguf_file *f, const struct model_ref_opts *opts,
                  struct model_ref **ret, struct model_error *err);
void model_ref_free(struct model_ref *r); /* NULL is a no-op */

const struct model_hparams *model_ref_hparams(const struct model_ref *r);
const struct model_weights *model_ref_weights(const struct model_ref *r);
uint32_t model_ref_n_ctx(const struct model_ref *r);

/* Runs token at position pos and writes n_vocab logits. pos may be at most the number of
 * positions already in the cache: equal appends, smaller rewinds (later positions are dropped).
 * Returns 0, KVD_EINVAL for a token outside the vocabulary or a pos past the cache, KVD_E_CONTEXT
 * when pos >= n_ctx. */
int model_ref_forward(struct model_ref *r, uint32_t token, uint32_t pos, float *logits);

/* Context shift, as the engine does it (engine_seq_shift): the cached positions
 * [keep, keep + n_drop) are dropped, the later ones move down by n_drop, and their keys are
 * rotated back by n_drop positions with each layer's RoPE (in double, then rounded through the
 * KV type again, as the device re-encodes them). KVD_EINVAL unless keep + n_drop <= the
 * positions cached. */
int model_ref_shift(struct model_ref *r, uint32_t keep, uint32_t n_drop);
/* Positions cached so far (the next forward's pos when appending). */
uint32_t model_ref_n_past(const struct model_ref *r);

/* Empties the KV cache: the next forward starts at position 0. */
void model_ref_reset(struct model_ref *r);

/* Called with the logits (n_vocab) computed at position pos, the ones a token is chosen from. */
typedef void (*model_ref_logits_fn)(void *ud, uint32_t pos, const float *logits, size_t n_vocab);

/* Greedy decoding from an empty cache: runs the n_prompt >= 1 prompt ids, then repeatedly appends
 * the argmax token (the lowest id on ties) to out_ids and runs it, until max_new tokens are out,
 * the model emits its EOS or BOS id (not written; llama2.c stops on BOS, llama.cpp on EOS), or the
 * context is full. on_logits, if not NULL, sees the logits behind every generated token. Returns
 * the number of ids written, KVD_E_CONTEXT if the prompt does not fit, or a forward error. */
int model_ref_greedy(struct model_ref *r, const uint32_t *prompt, size_t n_prompt, size_t max_new,
                     uint32_t *out_ids, model_ref_logits_fn on_logits, void *ud);

#endif
