/* The CPU reference operators, one function per op of the forward pass.
 *
 * They are the oracle the GPU kernels are tested against, so they favour being obviously right
 * over being fast: float32 in and out, float64 wherever error accumulates (dot products, norms,
 * softmax sums), no threads, no allocation. Vectors are dense float arrays; shapes are given in the
 * comments outermost-first, C order. */
#ifndef KVD_MODEL_REF_OPS_H
#define KVD_MODEL_REF_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "arch.h"
#include "dtype.h"

/* out (n) = x / sqrt(mean(x^2) + eps) * w. out may alias x. */
void ref_rmsnorm(float *out, const float *x, const float *w, size_t n, float eps);

/* out (n_out) = w x, with w (n_out, n_in) f32 row-major [out][in] and x (n_in). out must not
 * alias x. */
void ref_matvec_f32(float *out, const float *w, const float *x, size_t n_out, size_t n_in);

/* The same for a weight matrix in any dequantizable dtype: w is n_out rows of
 * dtype_row_bytes(type, n_in) bytes, each dequantized into row (n_in floats of scratch) before
 * its dot product, so the result equals dequantizing the whole matrix first and calling
 * ref_matvec_f32. 0, or the negative code of dtype_row_bytes / dtype_dequant_row. */
int ref_matvec(float *out, enum dtype type, const void *w, const float *x, size_t n_out,
               size_t n_in, float *row);

/* Rotates x (n_tokens, n_heads, head_dim) in place: in every head the first n_rot dimensions are
 * paired (adjacent for MODEL_ROPE_NORMAL, halves for MODEL_ROPE_NEOX) and pair i of token t turns
 * by pos[t] * freq_scale * freq_base^(-2i / n_rot), divided by factors[i] when factors is not
 * NULL (Llama 3.1's rope_freqs). Dimensions past n_rot are left alone. n_rot is even and at most
 * head_dim. */
void ref_rope(float *x, size_t n_tokens, size_t n_heads, size_t head_dim, size_t n_rot,
              const uint32_t *pos, enum model_rope_mode mode, float freq_base, float freq_scale,
              const float *factors);

/* The same for any RoPE (arch.h struct model_rope): pair i of token t turns by
 * pos[t] * model_rope_freq(r, i), and the rotated pair is multiplied by model_rope_mscale(r). */
void ref_rope_ext(float *x, size_t n_tokens, size_t n_heads, size_t head_dim, const uint32_t *pos,
                  const struct model_rope *r);

/* x (n) = exp(x - max) / sum(exp(x - max)), in place; n >= 1. */
void ref_softmax(float *x, size_t n);

/* out (n) = silu(gate) * up, silu(g) = g / (1 + exp(-g)). out may alias gate or up. */
void ref_swiglu(float *out, const float *gate, const float *up, size_t n);

/* out (n) = gelu(gate) * up with GELU's tanh approximation,
 * gelu(g) = g/2 (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) (gemma's GeGLU). Aliasing as swiglu. */
void ref_geglu(float *out, const float *gate, const float *up, size_t n);

/* x (n) = c tanh(x / c): logit soft-capping (gemma2); c > 0. */
void ref_softcap(float *x, size_t n, float c);

/* x (n) += y (n): the residual connection. */
void ref_add(float *x, const float *y, size_t n);

/* Causal attention of one query token over the n_kv positions of a contiguous KV cache.
 * q (n_head, head_dim); k and v (n_kv, n_head_kv, head_dim), position-major as written one token
 * at a time; out (n_head, head_dim). Query head h reads kv head h / (n_head / n_head_kv) (grouped
 * query attention), with scores scaled by 1/sqrt(head_dim). scores is n_kv floats of scratch.
 * n_head is a multiple of n_head_kv and n_kv >= 1. */
void ref_attention_one(float *out, const float *q, const float *k, const float *v, size_t n_kv,
                       size_t n_head, size_t n_head_kv, size_t head_dim, float *scores);

/* The switches one layer's attention may have on top of that. */
struct ref_attn_opts {
  float scale;   /* scores are q.k * scale; 0 = 1/sqrt(head_dim) */
  float softcap; /* scores become softcap * tanh(s / softcap) before the softmax; 0 = none */
  size_t window; /* only the last `window` of the n_kv positions are read; 0 = all */
};
void ref_attention_ext(float *out, const float *q, const float *k, const float *v, size_t n_kv,
                       size_t n_head, size_t n_head_kv, size_t head_dim, float *scores,
                       const struct ref_attn_opts *opts);

#endif
