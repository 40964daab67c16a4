/* Recorders for the element-wise and row-wise kernels of the forward pass (shaders/rmsnorm.comp,
 * rope.comp, swiglu.comp, add.comp, softmax.comp; push constants in shaders/common/pc_ops.h).
 *
 * Each ops_* call records one dispatch into a gpu_cmd, grid included, and nothing else: the
 * engine puts gpu_cmd_barrier() between dependent ops. Activations are f32 (n_tokens, width)
 * row-major and dense unless a stride says otherwise; n_tokens is 1 for decode and anything for
 * prefill. A call with n_tokens (or n_rows) == 0 records nothing and returns 0. Shapes the
 * kernels cannot take are KVD_EINVAL; limits the device cannot take come back from
 * gpu_cmd_dispatch() (KVD_E_LIMIT, KVD_ERANGE) before anything reaches the device. Every refusal
 * is stored in the gpu_cmd (gpu_cmd_fail(), see gpu.h): the recording's submit fails with it. */
#ifndef KVD_MODEL_OPS_H
#define KVD_MODEL_OPS_H

#include "arch.h"
#include "gpu.h"

#include <stdbool.h>
#include <stdint.h>

#define OPS_MAX_ROPE_TABLES 16

/* RoPE settings are the model's own (arch.h struct model_rope): one definition of the angles for
 * the CPU reference and the frequency tables here. */

/* Per-pair rotation speeds for one (n_rot, freq_base, freq_scale): (n_rot / 2) pairs of uint32
 * (low, high) words, the fractional part of freq_scale * freq_base^(-2i / n_rot) / (2 pi) as a
 * 64-bit fixed-point number of turns per position (why: shaders/rope.comp). */
struct ops_rope_table {
  struct model_rope cfg; /* what the table was built for (told apart by value) */
  struct gpu_buffer *freq;
};

struct ops_opts {
  bool portable;    /* shared-memory reductions even where subgroup arithmetic exists (tests) */
  uint32_t wg_row;  /* invocations per row for rmsnorm/softmax: 0 = from the caps, else a power
                       of two within them */
  uint32_t wg_elem; /* invocations per workgroup of the element-wise kernels: 0 = from the caps */
};

struct ops {
  struct gpu_device *dev;
  struct gpu_pipeline *rmsnorm;     /* x (n_tokens, dim), w (dim), out (n_tokens, dim) */
  struct gpu_pipeline *add_rmsnorm; /* the same, plus y (n_tokens, dim) added into x first */
  struct gpu_pipeline *rope;        /* x, pos (n_tokens) uint, freq table */
  struct gpu_pipeline *swiglu;      /* gate, up, out */
  struct gpu_pipeline *add;         /* x, y */
  struct gpu_pipeline *softmax;     /* x (n_rows, n) */
  uint32_t wg_row;                  /* a power of two: the shared-memory tree needs one */
  uint32_t wg_elem;
  bool subgroup; /* rmsnorm and softmax reduce with subgroup arithmetic */
  uint32_t n_rope;
  struct ops_rope_table rope_tables[OPS_MAX_ROPE_TABLES];
};

/* Creates the pipelines, picking workgroup sizes and the reduction variant from the device's
 * caps. opts may be NULL. Returns 0 or a negative kvd code (o is then empty). */
int ops_init(struct ops *o, struct gpu_device *dev, const struct ops_opts *opts);
/* Frees the pipelines and RoPE tables; no recording that uses them may still be in flight. */
void ops_destroy(struct ops *o);

/* out = x / sqrt(mean(x^2) + eps) * w per token: x and out (n_tokens, dim), w (dim).
 * out may be the same memory as x (in place). */
int ops_rmsnorm(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, struct gpu_binding w,
                struct gpu_binding out, uint32_t n_tokens, uint32_t dim, float eps);

/* The residual add and the next norm in one dispatch: x += y, then out = rmsnorm(x) * w. x is
 * updated in memory; out may be the same memory as x, never as y. */
int ops_add_rmsnorm(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, struct gpu_binding y,
                    struct gpu_binding w, struct gpu_binding out, uint32_t n_tokens, uint32_t dim,
                    float eps);

/* Uploads the frequency table for cfg's (n_rot, freq_base, freq_scale) unless o has it already:
 * a synchronous transfer, so call it when loading a model. ops_rope() would otherwise do it on
 * first use, blocking in the middle of a recording. KVD_ENOSPC past OPS_MAX_ROPE_TABLES
 * settings, KVD_EINVAL for a setting that is not finite and positive. */
int ops_rope_prepare(struct ops *o, const struct model_rope *cfg);
/* The frequency table of cfg (made by ops_rope_prepare), NULL if it was never prepared: the
 * context shift rotates stored keys with it. */
struct gpu_buffer *ops_rope_freq(const struct ops *o, const struct model_rope *cfg);

/* Rotates x (n_tokens, n_heads, head_dim) in place: pair i of token t turns by
 * pos[t] * model_rope_freq(cfg, i) and is scaled by model_rope_mscale(cfg), like ref_rope_ext(). pos is (n_tokens) uint32.
 * Token rows lie `stride` floats apart (0 = dense, n_heads * head_dim), so the q or k part of a
 * fused QKV output is rotated where it lies: bind x at its first row. */
int ops_rope(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, struct gpu_binding pos,
             uint32_t n_tokens, uint32_t n_heads, uint32_t head_dim, uint32_t stride,
             const struct model_rope *cfg);

/* out = silu(gate) * up, all (n_tokens, n) in separate bindings. out may be gate's or up's
 * memory (in place). */
int ops_swiglu(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding gate, struct gpu_binding up,
               struct gpu_binding out, uint32_t n_tokens, uint32_t n);

/* out = gelu(gate) * up (GELU's tanh approximation, gemma's GeGLU; ref_geglu()), bindings as
 * ops_swiglu. */
int ops_geglu(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding gate, struct gpu_binding up,
              struct gpu_binding out, uint32_t n_tokens, uint32_t n);

/* The same for a fused gate/up projection whose rows are [gate (n) | up (n)]: gate_up is
 * (n_tokens, 2n), out (n_tokens, n) and must not overlap it. Saves the engine splitting the
 * projection's output. */
int ops_swiglu_fused(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding gate_up,
                     struct gpu_binding out, uint32_t n_tokens, uint32_t n);

/* x += y, both (n_tokens, n): the residual connection. */
int ops_add(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, struct gpu_binding y,
            uint32_t n_tokens, uint32_t n);

/* x[t] += bias for every token: x (n_tokens, n), bias (n) (qwen2's q/k/v biases). */
int ops_add_bias(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, struct gpu_binding bias,
                 uint32_t n_tokens, uint32_t n);

/* x *= s over n floats (gemma's embedding scale). */
int ops_scale(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, uint64_t n, float s);

/* x = c tanh(x / c) over n floats (logit soft-capping, ref_softcap()); c > 0. */
int ops_softcap(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, uint64_t n, float c);

/* Softmax of every row of x (n_rows, n) in place, max-subtracted, so any finite logits are safe
 * and -inf entries (masks) become 0; a row of only -inf is NaN, as in ref_softmax(). */
int ops_softmax(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, uint32_t n_rows,
                uint32_t n);

#endif
