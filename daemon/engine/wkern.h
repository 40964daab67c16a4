/* Weight-consuming GPU kernels by weight type: the host side of matvec_<type>, matmul_<type> and
 * embed_<type> (shaders/wmatvec.comp, wmatmul.comp, wembed.comp, shaders/common/dequant.glsl).
 *
 * Weights stay in device memory as the raw GGUF tensor bytes, row-major [out][in], and are
 * dequantized inside the shaders. A struct wkern holds the pipelines for one type with sizes
 * chosen from the device caps; wkern_matvec/matmul/mul/embed record the dispatches for a whole
 * matrix into a command buffer, splitting it into row ranges (and activations into token ranges)
 * wherever a binding would exceed maxStorageBufferRange or a grid maxComputeWorkGroupCount, and
 * binding each range at an aligned offset with the remainder pushed (pc_matmul.h). The caller
 * records barriers between dependent steps as usual. A refused shape is stored in the gpu_cmd
 * like a refused dispatch (gpu_cmd_fail(), see gpu.h): the recording's submit fails with it. */
#ifndef KVD_MODEL_WKERN_H
#define KVD_MODEL_WKERN_H

#include <stdbool.h>
#include <stdint.h>

#include "dtype.h"
#include "gpu.h"

enum wkern_op {
  WKERN_MATVEC, /* decode: y (+)= W x for up to WKERN_MATVEC_TOKENS tokens per dispatch */
  WKERN_MATMUL, /* prefill: Y (+)= X W^T, tiled through shared memory */
  WKERN_EMBED,  /* out[t] = row ids[t] */
  WKERN_N_OPS
};

/* Tokens one mat-vec dispatch serves (WMAT_MAX_TOKENS); wkern_mul() switches to the tiled
 * mat-mul above this. */
#define WKERN_MATVEC_TOKENS 8u
#define WKERN_MV_PIPES 4 /* mat-vec pipelines per type: 1, 2, 4, 8 tokens */

/* Whether the shaders handle type t: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K,
 * Q6_K. */
bool wkern_supported(enum dtype t);
/* The embedded variant name for (t, op), the subgroup-reduction mat-vec when `subgroup`; NULL
 * when t is unsupported. */
const char *wkern_variant(enum dtype t, enum wkern_op op, bool subgroup);

/* Bytes to allocate for (and upload into) a buffer that holds a (rows, cols) matrix of type t
 * starting at byte 0: the raw row bytes rounded up to a multiple of 4, because the shaders read
 * 32-bit words and the word holding the last bytes must lie inside the buffer. A matrix at byte
 * offset o of a bigger buffer needs that buffer to reach o + this. KVD_EINVAL when cols is not a
 * whole number of blocks, KVD_E_UNSUPPORTED for other types. */
int wkern_weight_bytes(enum dtype t, uint64_t rows, uint64_t cols, uint64_t *ret);

/* The pipelines and launch sizes for one weight type on one device. */
struct wkern {
  struct gpu_device *dev;
  enum dtype type;
  /* matvec[i] is specialised for 2^i tokens (1, 2, 4, 8): on devices that run uniform branches
   * masked (CPU devices) a per-token branch would cost every slot its work */
  struct gpu_pipeline *matvec[WKERN_MV_PIPES];
  struct gpu_pipeline *matmul, *embed;
  bool mv_subgroup;      /* mat-vec reduces with subgroupAdd (caps.subgroup_ops arithmetic) */
  uint32_t mv_wg;        /* mat-vec workgroup size (a power of two) */
  uint32_t mv_rows;      /* mat-vec rows per workgroup */
  uint32_t mm_tm, mm_tn; /* mat-mul tile: (16*tm tokens) x (16*tn rows) */
  uint32_t mm_bk;        /* mat-mul K step (a multiple of the type's group window) */
  uint32_t emb_wg;       /* embedding workgroup size */
  uint64_t max_binding;  /* bytes one binding may cover: maxStorageBufferRange less slack */
};

/* Launch sizes are chosen from the caps unless overridden (tests and benchmarks try others):
 * zero fields mean "choose". */
struct wkern_opts {
  uint32_t ops;     /* kernels to create: bits 1u << enum wkern_op; 0 = all three */
  int subgroup;     /* 0 choose, 1 force the subgroup mat-vec (if the caps allow), -1 portable */
  uint32_t mv_wg;   /* power of two */
  uint32_t mv_rows; /* rows per mat-vec workgroup, at most mv_wg / 8 */
  uint32_t mm_tm, mm_tn, mm_bk;
  uint32_t emb_wg;
  uint64_t max_binding; /* tests: split at this many bytes per binding, below the device limit */
};

/* Creates the pipelines for type t (all three kernels, or those in opts->ops: a matrix that is
 * only an embedding table needs no mat-vec; recording a kernel that was not created is
 * KVD_EINVAL). On failure nothing is held (wkern_destroy is safe on a zeroed struct).
 * KVD_E_UNSUPPORTED for types without kernels; KVD_E_LIMIT when no tile fits the device's shared
 * memory or workgroup limits; opts may be NULL. */
int wkern_init(struct wkern *k, struct gpu_device *dev, enum dtype t,
               const struct wkern_opts *opts);
void wkern_destroy(struct wkern *k);

/* A (rows, cols) weight matrix of the wkern's type: row r is dtype_row_bytes(type, cols) bytes
 * at byte offset + r * row_bytes of buf. Any byte offset works (F32: a multiple of 4, so its
 * values are whole words); buf must extend at least to the next multiple of 4 bytes past the
 * last row (wkern_weight_bytes). */
struct wkern_matrix {
  struct gpu_buffer *buf;
  uint64_t offset;
  uint32_t rows, cols;
};

/* f32 activations: token t is `stride` floats after token t-1, token 0 at byte `offset` (a
 * multiple of 4) of buf. */
struct wkern_act {
  struct gpu_buffer *buf;
  uint64_t offset;
  uint32_t stride;
};

/* y[t][r] = sum_c W[r][c] x[t][c] (or += with accumulate, which fuses the residual add) for
 * t < n_tokens, r < w->rows: x holds w->cols values per token, y w->rows. x and y must not
 * overlap. Records one dispatch per WKERN_MATVEC_TOKENS tokens and row range. 0, or KVD_EINVAL
 * (bad shape), KVD_ERANGE (a buffer too small for the shape), KVD_E_LIMIT, or gpu_cmd_dispatch's
 * code. */
int wkern_matvec(const struct wkern *k, struct gpu_cmd *cmd, const struct wkern_matrix *w,
                 const struct wkern_act *x, const struct wkern_act *y, uint32_t n_tokens,
                 bool accumulate);
/* The same through the tiled mat-mul, for many tokens. */
int wkern_matmul(const struct wkern *k, struct gpu_cmd *cmd, const struct wkern_matrix *w,
                 const struct wkern_act *x, const struct wkern_act *y, uint32_t n_tokens,
                 bool accumulate);
/* wkern_matvec for n_tokens <= WKERN_MATVEC_TOKENS, else wkern_matmul. */
int wkern_mul(const struct wkern *k, struct gpu_cmd *cmd, const struct wkern_matrix *w,
              const struct wkern_act *x, const struct wkern_act *y, uint32_t n_tokens,
              bool accumulate);

/* out[t][0..table->cols) = dequantized row ids[t] of table (n_vocab = table->rows rows), for
 * t < n_tokens; ids is n_tokens uint32 at byte ids_offset (a multiple of 4) of `ids`. Ids >= rows
 * are the caller's to refuse: their output rows are left untouched. */
int wkern_embed(const struct wkern *k, struct gpu_cmd *cmd, const struct wkern_matrix *table,
                struct gpu_buffer *ids, uint64_t ids_offset, uint32_t n_tokens,
                const struct wkern_act *out);

#endif
