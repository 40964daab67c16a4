/* Synthetic llama-architecture models: any shape, deterministic random weights, a small
 * SentencePiece-style vocabulary. For tests and benchmarks that need a model of a given size
 * (tools/gen_model is the command-line front end).
 *
 * The file looks like one llama.cpp's converter writes: `llama.*` hyperparameters, a
 * `tokenizer.ggml.*` vocabulary (<unk>, <s>, </s>, 256 byte tokens <0x00>..<0xFF>, then
 * "▁"-prefixed word pieces, with scores and token types), tensors named token_embd.weight,
 * blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,ffn_up,ffn_down}.weight,
 * output_norm.weight and output.weight. Norms are F32; matrices (token_embd included) are in the
 * chosen type, ne[0] the input dimension. A matrix whose rows are not a whole number of the
 * type's blocks (say ffn_down with ffn = 172 under Q8_0) falls back to F16, as llama-quantize's
 * users force it to.
 *
 * Weights are a function of (seed, tensor name) only, so a tensor is the same whatever else the
 * shape is and the same seed always gives byte-identical files. */
#ifndef KVD_MODEL_SYNTH_H
#define KVD_MODEL_SYNTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"

/* Fewest tokens a vocabulary can have: <unk> <s> </s> and the 256 byte tokens. */
#define SYNTH_MIN_VOCAB 259u

struct synth_params {
  uint32_t dim;        /* llama.embedding_length */
  uint32_t n_layers;   /* llama.block_count */
  uint32_t n_heads;    /* llama.attention.head_count; dim / n_heads is the head dim (even) */
  uint32_t n_kv_heads; /* llama.attention.head_count_kv; divides n_heads */
  uint32_t ffn;        /* llama.feed_forward_length */
  uint32_t vocab;      /* at least SYNTH_MIN_VOCAB */
  uint32_t ctx;        /* llama.context_length */
  enum dtype type;     /* matrices: F32, F16, BF16, Q8_0 or Q4_0 */
  uint64_t seed;
  float rms_eps;    /* llama.attention.layer_norm_rms_epsilon */
  float rope_base;  /* llama.rope.freq_base */
  bool tied;        /* no output.weight: the classifier is token_embd */
  const char *name; /* general.name; NULL gives "kvd-synthetic" */
  const char *chat_template; /* tokenizer.chat_template; NULL writes none */
};

/* The stories260K shape (dim 64, 5 layers, 8 heads, 4 kv heads, ffn 172, vocab 512, ctx 512),
 * F32, seed 1. */
void synth_params_default(struct synth_params *p);

/* 0, or KVD_EINVAL with the reason in why (may be NULL). */
int synth_check(const struct synth_params *p, char *why, size_t why_len);

/* The type a matrix with rows of row_len values gets (p->type or the F16 fallback). */
enum dtype synth_matrix_type(const struct synth_params *p, uint64_t row_len);

int synth_write_file(const struct synth_params *p, const char *path);
/* Into a malloc'd buffer the caller frees. */
int synth_write_mem(const struct synth_params *p, void **ret_data, size_t *ret_size);

#endif
