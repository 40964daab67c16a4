/* Host side of the weight-consuming kernels: variant table, launch sizes from the caps, and
 * dispatch recording with the row/token splits the binding and grid limits require. */
#include "wkern.h"

#include "kvd_error.h"
#include "pc_matmul.h"

#include <string.h>

_Static_assert(WKERN_MATVEC_TOKENS == WMAT_MAX_TOKENS, "wkern and the shaders agree on tokens");

struct wkern__type {
  enum dtype type;
  const char *name[WKERN_N_OPS]; /* matvec, matmul, embed */
  const char *matvec_sg;
  uint32_t span; /* DQ_SPAN of dequant.glsl: the mat-mul K step is a multiple of it */
};

/* f32's mat-vec and mat-mul carry a _w suffix: matvec_f32/matmul_f32 are the foundation kernels
 * with the plain (rows, cols) interface. */
static const struct wkern__type wkern__types[] = {
    {DTYPE_F32, {"matvec_f32_w", "matmul_f32_w", "embed_f32"}, "matvec_f32_w_sg", 8},
    {DTYPE_F16, {"matvec_f16", "matmul_f16", "embed_f16"}, "matvec_f16_sg", 8},
    {DTYPE_BF16, {"matvec_bf16", "matmul_bf16", "embed_bf16"}, "matvec_bf16_sg", 8},
    {DTYPE_Q8_0, {"matvec_q8_0", "matmul_q8_0", "embed_q8_0"}, "matvec_q8_0_sg", 8},
    {DTYPE_Q4_0, {"matvec_q4_0", "matmul_q4_0", "embed_q4_0"}, "matvec_q4_0_sg", 32},
    {DTYPE_Q4_1, {"matvec_q4_1", "matmul_q4_1", "embed_q4_1"}, "matvec_q4_1_sg", 32},
    {DTYPE_Q5_0, {"matvec_q5_0", "matmul_q5_0", "embed_q5_0"}, "matvec_q5_0_sg", 32},
    {DTYPE_Q5_1, {"matvec_q5_1", "matmul_q5_1", "embed_q5_1"}, "matvec_q5_1_sg", 32},
    {DTYPE_Q4_K, {"matvec_q4_k", "matmul_q4_k", "embed_q4_k"}, "matvec_q4_k_sg", 64},
    {DTYPE_Q5_K, {"matvec_q5_k", "matmul_q5_k", "embed_q5_k"}, "matvec_q5_k_sg", 64},
    {DTYPE_Q6_K, {"matvec_q6_k", "matmul_q6_k", "embed_q6_k"}, "matvec_q6_k_sg", 64},
};

static const struct wkern__type *wkern__find(enum dtype t) {
  for (size_t i = 0; i < sizeof wkern__types / sizeof wkern__types[0]; i++)
    if (wkern__types[i].type == t) return &wkern__types[i];
  return NULL;
}

bool wkern_supported(enum dtype t) {
  return wkern__find(t) != NULL;
}

const char *wkern_variant(enum dtype t, enum wkern_op op, bool subgroup) {
  const struct wkern__type *e = wkern__find(t);
  if (!e || (unsigned)op >= WKERN_N_OPS) return NULL;
  return op == WKERN_MATVEC && subgroup ? e->matvec_sg : e->name[op];
}

int wkern_weight_bytes(enum dtype t, uint64_t rows, uint64_t cols, uint64_t *ret) {
  if (!wkern_supported(t)) return KVD_E_UNSUPPORTED;
  uint64_t rb;
  int rc = dtype_row_bytes(t, cols, &rb);
  if (rc < 0) return rc;
  if (rows && rb > (UINT64_MAX - 3) / rows) return KVD_EOVERFLOW;
  *ret = (rows * rb + 3) & ~(uint64_t)3;
  return 0;
}

static uint64_t bind_max(const struct gpu_caps *c);

static bool is_pow2(uint32_t v) {
  return v && !(v & (v - 1));
}

static uint64_t mm_shared_bytes(uint32_t tm, uint32_t tn, uint32_t bk) {
  return (uint64_t)16 * (tm + tn) * (bk + 1) * sizeof(float);
}

void wkern_destroy(struct wkern *k) {
  for (int i = 0; i < WKERN_MV_PIPES; i++) {
    gpu_pipeline_free(k->matvec[i]);
    k->matvec[i] = NULL;
  }
  gpu_pipeline_free(k->matmul);
  gpu_pipeline_free(k->embed);
  k->matmul = NULL;
  k->embed = NULL;
}

int wkern_init(struct wkern *k, struct gpu_device *dev, enum dtype t,
               const struct wkern_opts *opts) {
  static const struct wkern_opts none = {0};
  if (!opts) opts = &none;
  memset(k, 0, sizeof *k);
  const struct wkern__type *e = wkern__find(t);
  if (!e) return KVD_E_UNSUPPORTED;
  const struct gpu_caps *c = gpu_device_caps(dev);
  k->dev = dev;
  k->type = t;

  /* Mat-vec: 64 invocations read a 4096-value row in 8 coalesced sweeps; the workgroup must hold
   * at least one whole subgroup for the subgroup reduction, and the tree needs a power of two. */
  bool sg_ok = (c->subgroup_ops & GPU_SG_ARITHMETIC) != 0;
  k->mv_subgroup = opts->subgroup > 0 ? sg_ok : opts->subgroup == 0 && sg_ok;
  uint32_t wg = opts->mv_wg ? opts->mv_wg : 64;
  if (!opts->mv_wg && k->mv_subgroup && c->subgroup_size > wg) wg = c->subgroup_size;
  /* Four rows per workgroup share each activation load (the cost that dominates on a CPU
   * device) and amortise the reduction; invocation v < rows * 8 writes one (row, token). */
  uint32_t nr = opts->mv_rows ? opts->mv_rows : 4;
  if (!is_pow2(wg) || wg > c->max_wg_size[0] || wg > c->max_wg_invocations ||
      nr * WMAT_MAX_TOKENS > wg ||
      (uint64_t)nr * WMAT_MAX_TOKENS * wg * sizeof(float) > c->max_shared_bytes)
    return KVD_E_LIMIT;
  k->mv_wg = wg;
  k->mv_rows = nr;

  /* Mat-mul: the largest tile whose shared memory fits; K steps of 32 values keep (4,4) tiles at
   * ~17 KiB. The K step must be a multiple of 8 and a multiple or divisor of the type's group
   * window (wmatmul.comp). */
  uint32_t bk = opts->mm_bk ? opts->mm_bk : 32;
  if (bk % 8 || (bk % e->span && e->span % bk)) return KVD_EINVAL;
  static const uint32_t tiles[][2] = {{4, 4}, {2, 2}, {1, 1}};
  k->mm_tm = opts->mm_tm;
  k->mm_tn = opts->mm_tn;
  for (size_t i = 0; !k->mm_tm && i < sizeof tiles / sizeof tiles[0]; i++) {
    if (mm_shared_bytes(tiles[i][0], tiles[i][1], bk) <= c->max_shared_bytes) {
      k->mm_tm = tiles[i][0];
      k->mm_tn = tiles[i][1];
    }
  }
  if (!k->mm_tm || !k->mm_tn || mm_shared_bytes(k->mm_tm, k->mm_tn, bk) > c->max_shared_bytes)
    return KVD_E_LIMIT;
  k->mm_bk = bk;
  k->emb_wg = opts->emb_wg ? opts->emb_wg : 64;
  k->max_binding = bind_max(c);
  if (opts->max_binding && opts->max_binding < k->max_binding) k->max_binding = opts->max_binding;

  struct gpu_pipeline_desc mv = {.shader = k->mv_subgroup ? e->matvec_sg : e->name[WKERN_MATVEC],
                                 .n_buffers = 3,
                                 .push_size = sizeof(struct pc_wmat),
                                 .n_spec = 3,
                                 .spec = {k->mv_wg, 1, k->mv_rows},
                                 .local_size = {k->mv_wg, 1, 1}};
  struct gpu_pipeline_desc mm = {.shader = e->name[WKERN_MATMUL],
                                 .n_buffers = 3,
                                 .push_size = sizeof(struct pc_wmat),
                                 .n_spec = 3,
                                 .spec = {k->mm_tm, k->mm_tn, k->mm_bk},
                                 .local_size = {16, 16, 1}};
  struct gpu_pipeline_desc em = {.shader = e->name[WKERN_EMBED],
                                 .n_buffers = 3,
                                 .push_size = sizeof(struct pc_embed),
                                 .n_spec = 1,
                                 .spec = {k->emb_wg},
                                 .local_size = {k->emb_wg, 1, 1}};
  uint32_t ops = opts->ops ? opts->ops : (1u << WKERN_N_OPS) - 1;
  int rc = 0;
  for (int i = 0; i < WKERN_MV_PIPES && rc == 0 && (ops & (1u << WKERN_MATVEC)); i++) {
    mv.spec[1] = 1u << i;
    rc = gpu_pipeline_new(dev, &mv, &k->matvec[i]);
  }
  if (rc == 0 && (ops & (1u << WKERN_MATMUL))) rc = gpu_pipeline_new(dev, &mm, &k->matmul);
  if (rc == 0 && (ops & (1u << WKERN_EMBED))) rc = gpu_pipeline_new(dev, &em, &k->embed);
  if (rc < 0) wkern_destroy(k);
  return rc;
}

/* ---- binding ranges ---------------------------------------------------------------------- */

static uint64_t bind_align(const struct gpu_caps *c) {
  return c->min_storage_align > 4 ? c->min_storage_align : 4;
}

/* The most bytes a binding may cover after the worst-case alignment slack and the rounding of
 * its end to a word. */
static uint64_t bind_max(const struct gpu_caps *c) {
  uint64_t slack = bind_align(c) - 1 + 3;
  return c->max_storage_range > slack ? c->max_storage_range - slack : 0;
}

/* Binds bytes [start, start + bytes) of buf: at start rounded down to the offset alignment, to
 * the end rounded up to a word; *ret_skip = the bytes between the binding and start. */
static int bind_range(const struct gpu_caps *c, struct gpu_buffer *buf, uint64_t start,
                      uint64_t bytes, struct gpu_binding *ret, uint32_t *ret_skip) {
  uint64_t a = bind_align(c);
  uint64_t off = start / a * a, skip = start - off;
  uint64_t range = (skip + bytes + 3) & ~(uint64_t)3;
  uint64_t size = gpu_buffer_size(buf);
  if (off > size || range > size - off) return KVD_ERANGE;
  if (range > c->max_storage_range) return KVD_E_LIMIT;
  *ret = (struct gpu_binding){buf, off, range};
  *ret_skip = (uint32_t)skip;
  return 0;
}

static uint64_t min_u64(uint64_t a, uint64_t b) {
  return a < b ? a : b;
}

/* Checks a mat-vec/mat-mul shape; returns the weight row bytes. */
static int check_shape(const struct wkern *k, const struct wkern_matrix *w,
                       const struct wkern_act *x, const struct wkern_act *y, uint64_t *ret_rb) {
  if (!w->buf || !x->buf || !y->buf || w->rows == 0 || w->cols == 0 || x->stride < w->cols ||
      y->stride < w->rows || x->offset % 4 || y->offset % 4 ||
      (k->type == DTYPE_F32 && w->offset % 4))
    return KVD_EINVAL;
  return dtype_row_bytes(k->type, w->cols, ret_rb);
}

/* Records `op` (matvec or matmul) over token chunks of at most tok_cap tokens and row chunks of
 * at most row_cap rows, each within the binding range. */
static int record_mul(const struct wkern *k, struct gpu_cmd *cmd, enum wkern_op op,
                      const struct wkern_matrix *w, const struct wkern_act *x,
                      const struct wkern_act *y, uint32_t n_tokens, bool accumulate) {
  uint64_t rb;
  int rc = check_shape(k, w, x, y, &rb);
  if (rc < 0) return gpu_cmd_fail(cmd, rc);
  if (op == WKERN_MATVEC ? !k->matvec[0] : !k->matmul)
    return gpu_cmd_fail(cmd, KVD_EINVAL); /* not created */
  if (n_tokens == 0) return 0;
  const struct gpu_caps *c = gpu_device_caps(k->dev);
  uint64_t maxb = k->max_binding;
  uint64_t widest = x->stride > y->stride ? x->stride : y->stride;
  uint64_t tok_cap = maxb / (widest * sizeof(float));
  uint64_t row_cap = maxb / rb;
  if (op == WKERN_MATVEC) {
    tok_cap = min_u64(tok_cap, WMAT_MAX_TOKENS);
  } else {
    tok_cap = min_u64(tok_cap, (uint64_t)c->max_wg_count[1] * 16 * k->mm_tm);
    row_cap = min_u64(row_cap, (uint64_t)c->max_wg_count[0] * 16 * k->mm_tn);
  }
  if (tok_cap == 0 || row_cap == 0) return gpu_cmd_fail(cmd, KVD_E_LIMIT);

  for (uint32_t t0 = 0; t0 < n_tokens; t0 += (uint32_t)tok_cap) {
    uint32_t nt = (uint32_t)min_u64(tok_cap, n_tokens - t0);
    for (uint32_t r0 = 0; r0 < w->rows; r0 += (uint32_t)row_cap) {
      uint32_t nr = (uint32_t)min_u64(row_cap, w->rows - r0);
      struct gpu_binding b[3];
      uint32_t skip[3];
      rc = bind_range(c, w->buf, w->offset + r0 * rb, nr * rb, &b[0], &skip[0]);
      if (rc == 0)
        rc = bind_range(c, x->buf, x->offset + (uint64_t)t0 * x->stride * 4,
                        ((uint64_t)(nt - 1) * x->stride + w->cols) * 4, &b[1], &skip[1]);
      if (rc == 0)
        rc = bind_range(c, y->buf, y->offset + ((uint64_t)t0 * y->stride + r0) * 4,
                        ((uint64_t)(nt - 1) * y->stride + nr) * 4, &b[2], &skip[2]);
      if (rc < 0) return gpu_cmd_fail(cmd, rc);
      struct pc_wmat pc = {
          .rows = nr,
          .cols = w->cols,
          .n_tokens = nt,
          .w_off = skip[0],
          .x_off = skip[1] / 4,
          .x_stride = x->stride,
          .y_off = skip[2] / 4,
          .y_stride = y->stride,
          .flags = accumulate ? WMAT_ACCUMULATE : 0,
      };
      uint32_t gx, gy;
      if (op == WKERN_MATVEC) {
        gpu_grid_2d(k->dev, (nr + k->mv_rows - 1) / k->mv_rows, &gx, &gy);
      } else {
        gx = (nr + 16 * k->mm_tn - 1) / (16 * k->mm_tn);
        gy = (nt + 16 * k->mm_tm - 1) / (16 * k->mm_tm);
      }
      const struct gpu_pipeline *pipe = k->matmul;
      if (op == WKERN_MATVEC) {
        int i = 0; /* the pipeline for the next power of two of tokens */
        while ((1u << i) < nt)
          i++;
        pipe = k->matvec[i];
      }
      const char *label = wkern_variant(k->type, op, op == WKERN_MATVEC && k->mv_subgroup);
      rc = gpu_cmd_dispatch(cmd, pipe, b, 3, &pc, sizeof pc, gx, gy, 1, label);
      if (rc < 0) return gpu_cmd_fail(cmd, rc);
    }
  }
  return 0;
}

int wkern_matvec(const struct wkern *k, struct gpu_cmd *cmd, const struct wkern_matrix *w,
                 const struct wkern_act *x, const struct wkern_act *y, uint32_t n_tokens,
                 bool accumulate) {
  return record_mul(k, cmd, WKERN_MATVEC, w, x, y, n_tokens, accumulate);
}

int wkern_matmul(const struct wkern *k, struct gpu_cmd *cmd, const struct wkern_matrix *w,
                 const struct wkern_act *x, const struct wkern_act *y, uint32_t n_tokens,
                 bool accumulate) {
  return record_mul(k, cmd, WKERN_MATMUL, w, x, y, n_tokens, accumulate);
}

int wkern_mul(const struct wkern *k, struct gpu_cmd *cmd, const struct wkern_matrix *w,
              const struct wkern_act *x, const struct wkern_act *y, uint32_t n_tokens,
              bool accumulate) {
  enum wkern_op op = n_tokens <= WKERN_MATVEC_TOKENS ? WKERN_MATVEC : WKERN_MATMUL;
  return record_mul(k, cmd, op, w, x, y, n_tokens, accumulate);
}

int wkern_embed(const struct wkern *k, struct gpu_cmd *cmd, const struct wkern_matrix *table,
                struct gpu_buffer *ids, uint64_t ids_offset, uint32_t n_tokens,
                const struct wkern_act *out) {
  uint64_t rb;
  if (!k->embed || !table->buf || !ids || !out->buf || table->rows == 0 || table->cols == 0 ||
      out->stride < table->cols || ids_offset % 4 || out->offset % 4 ||
      (k->type == DTYPE_F32 && table->offset % 4))
    return gpu_cmd_fail(cmd, KVD_EINVAL);
  int rc = dtype_row_bytes(k->type, table->cols, &rb);
  if (rc < 0) return gpu_cmd_fail(cmd, rc);
  if (n_tokens == 0) return 0;
  const struct gpu_caps *c = gpu_device_caps(k->dev);
  uint64_t maxb = k->max_binding;
  uint64_t tok_cap = maxb / ((uint64_t)out->stride * sizeof(float));
  uint64_t row_cap = maxb / rb;
  if (tok_cap == 0 || row_cap == 0) return gpu_cmd_fail(cmd, KVD_E_LIMIT);

  for (uint32_t t0 = 0; t0 < n_tokens; t0 += (uint32_t)tok_cap) {
    uint32_t nt = (uint32_t)min_u64(tok_cap, n_tokens - t0);
    for (uint32_t r0 = 0; r0 < table->rows; r0 += (uint32_t)row_cap) {
      uint32_t nr = (uint32_t)min_u64(row_cap, table->rows - r0);
      struct gpu_binding b[3];
      uint32_t skip[3];
      rc = bind_range(c, table->buf, table->offset + r0 * rb, nr * rb, &b[0], &skip[0]);
      if (rc == 0)
        rc = bind_range(c, ids, ids_offset + (uint64_t)t0 * 4, (uint64_t)nt * 4, &b[1], &skip[1]);
      if (rc == 0)
        rc = bind_range(c, out->buf, out->offset + (uint64_t)t0 * out->stride * 4,
                        ((uint64_t)(nt - 1) * out->stride + table->cols) * 4, &b[2], &skip[2]);
      if (rc < 0) return gpu_cmd_fail(cmd, rc);
      struct pc_embed pc = {
          .n_tokens = nt,
          .dim = table->cols,
          .w_off = skip[0],
          .row0 = r0,
          .n_rows = nr,
          .ids_off = skip[1] / 4,
          .out_off = skip[2] / 4,
          .out_stride = out->stride,
      };
      uint32_t gx, gy;
      gpu_grid_2d(k->dev, nt, &gx, &gy);
      rc = gpu_cmd_dispatch(cmd, k->embed, b, 3, &pc, sizeof pc, gx, gy, 1,
                            wkern_variant(k->type, WKERN_EMBED, false));
      if (rc < 0) return gpu_cmd_fail(cmd, rc);
    }
  }
  return 0;
}
