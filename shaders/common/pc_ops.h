/* Push constants of the element-wise and row-wise kernels of the forward pass (rmsnorm, rope,
 * swiglu, add, softmax). Activations are f32 (n_tokens, width) row-major and dense, except where
 * a kernel has a `*_stride` (floats between the starts of consecutive tokens' rows) or offset:
 * there the engine may hand it a slice of a wider buffer (the q or k part of a fused QKV
 * projection, the halves of a fused gate/up projection) instead of copying. Where the first row
 * starts is the binding's offset. */
#ifndef KVD_PC_OPS_H
#define KVD_PC_OPS_H
#include "pc_common.h"

/* out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, one workgroup per token. With the fused
 * residual variant (add_rmsnorm) x[t] += y[t] first and the sum is written back to x. */
struct pc_rmsnorm {
  uint n_tokens;
  uint dim;
  float eps;
};
PC_ASSERT_SIZE(pc_rmsnorm, 12)

/* Rotates x (n_tokens, n_heads, head_dim) in place, rows `stride` floats apart. Pair i of token
 * t turns by pos[t] * freq_scale * freq_base^(-2i / n_rot); the angle comes from a per-pair table
 * of 64-bit fixed-point turns (see rope.comp), so freq_base and freq_scale are not here. */
struct pc_rope {
  uint n_tokens;
  uint n_heads;
  uint head_dim;
  uint n_rot;  /* even, <= head_dim: leading dimensions of each head that rotate */
  uint mode;   /* 0: NORMAL, pairs (2i, 2i+1); 1: NEOX, pairs (i, i + n_rot/2) */
  uint stride; /* floats between tokens (>= n_heads * head_dim) */
  float mscale; /* the rotated pair is multiplied by this (YaRN / LongRoPE attention factor) */
};
PC_ASSERT_SIZE(pc_rope, 28)

/* out[t][c] = act(gate[t][c]) * up[t][c] for c < n, act silu (act 0) or tanh-GELU (act 1). gate and up are read through two bindings
 * that may be the same buffer: up[t][c] is element t * in_stride + up_off + c of its binding, so
 * a fused projection whose rows are [gate | up] is (in_stride = 2n, up_off = n) and two separate
 * buffers are (in_stride = n, up_off = 0). */
struct pc_swiglu {
  uint n_tokens;
  uint n;
  uint in_stride;
  uint up_off;
  uint out_stride;
  uint act; /* 0: silu (SwiGLU), 1: gelu, tanh approximation (GeGLU) */
};
PC_ASSERT_SIZE(pc_swiglu, 24)

/* op 0: x[t][c] += y[t][c] for c < n, or with bcast != 0, x[t][c] += y[c] (a bias over all
 * tokens). op 1: x *= a. op 2: x = a tanh(x / a) (soft-capping); y is not read by ops 1 and 2. */
struct pc_add {
  uint n_tokens;
  uint n;
  uint bcast;
  uint op;
  float a;
};
PC_ASSERT_SIZE(pc_add, 20)

/* x[r] = exp(x[r] - max(x[r])) / sum(exp(x[r] - max(x[r]))) in place, one workgroup per row. */
struct pc_softmax {
  uint n_rows;
  uint n;
};
PC_ASSERT_SIZE(pc_softmax, 8)

#endif
