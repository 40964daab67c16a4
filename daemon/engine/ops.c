#include "ops.h"

#include "kvd_error.h"
#include "pc_ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* The shaders index with 32-bit uints and grid-stride loops add a whole grid to an index, so
 * element counts stay below 2^31: far beyond any maxStorageBufferRange of floats in practice. */
#define OPS_MAX_ELEMS (1u << 31)

/* The largest power of two <= want that the device takes as a 1D workgroup, with `shared` floats
 * of shared memory per invocation. */
static uint32_t pick_wg(const struct gpu_caps *c, uint32_t want, uint32_t shared) {
  uint32_t wg = 1;
  while (wg <= want / 2)
    wg *= 2;
  while (wg > 1 && (wg > c->max_wg_invocations || wg > c->max_wg_size[0] ||
                    (uint64_t)wg * shared * sizeof(float) > c->max_shared_bytes))
    wg /= 2;
  return wg;
}

static int pipe_new(struct ops *o, const char *shader, uint32_t n_buffers, uint32_t push_size,
                    uint32_t wg, struct gpu_pipeline **ret) {
  struct gpu_pipeline_desc d = {.shader = shader,
                                .n_buffers = n_buffers,
                                .push_size = push_size,
                                .n_spec = 1,
                                .spec = {wg},
                                .local_size = {wg, 1, 1}};
  return gpu_pipeline_new(o->dev, &d, ret);
}

int ops_init(struct ops *o, struct gpu_device *dev, const struct ops_opts *opts) {
  static const struct ops_opts defaults = {0};
  const struct gpu_caps *c = gpu_device_caps(dev);
  if (!opts) opts = &defaults;
  memset(o, 0, sizeof *o);
  o->dev = dev;
  /* 256 invocations: enough loads in flight per row for a 4096-wide norm on a discrete GPU, four
   * wavefronts/warps; the limits clip it on small devices. The row kernels keep one float per
   * invocation in shared memory for the reduction. */
  o->wg_row = pick_wg(c, opts->wg_row ? opts->wg_row : 256, 1);
  o->wg_elem = pick_wg(c, opts->wg_elem ? opts->wg_elem : 256, 0);
  if ((opts->wg_row && o->wg_row != opts->wg_row) || (opts->wg_elem && o->wg_elem != opts->wg_elem))
    return KVD_EINVAL;
  uint32_t need = GPU_SG_BASIC | GPU_SG_ARITHMETIC;
  o->subgroup = !opts->portable && (c->subgroup_ops & need) == need;
  bool sg = o->subgroup;
  int rc = pipe_new(o, sg ? "rmsnorm_sg" : "rmsnorm", 3, sizeof(struct pc_rmsnorm), o->wg_row,
                    &o->rmsnorm);
  if (rc == 0)
    rc = pipe_new(o, sg ? "add_rmsnorm_sg" : "add_rmsnorm", 4, sizeof(struct pc_rmsnorm), o->wg_row,
                  &o->add_rmsnorm);
  if (rc == 0)
    rc = pipe_new(o, sg ? "softmax_sg" : "softmax", 1, sizeof(struct pc_softmax), o->wg_row,
                  &o->softmax);
  if (rc == 0) rc = pipe_new(o, "rope", 3, sizeof(struct pc_rope), o->wg_elem, &o->rope);
  if (rc == 0) rc = pipe_new(o, "swiglu", 3, sizeof(struct pc_swiglu), o->wg_elem, &o->swiglu);
  if (rc == 0) rc = pipe_new(o, "add", 2, sizeof(struct pc_add), o->wg_elem, &o->add);
  if (rc < 0) ops_destroy(o);
  return rc;
}

void ops_destroy(struct ops *o) {
  gpu_pipeline_free(o->rmsnorm);
  gpu_pipeline_free(o->add_rmsnorm);
  gpu_pipeline_free(o->rope);
  gpu_pipeline_free(o->swiglu);
  gpu_pipeline_free(o->add);
  gpu_pipeline_free(o->softmax);
  for (uint32_t i = 0; i < o->n_rope; i++)
    gpu_buffer_free(o->rope_tables[i].freq);
  memset(o, 0, sizeof *o);
}

/* Workgroups for `total` elements of a grid-stride kernel: one element per invocation up to the
 * device's workgroup-count limit, the loop covers the rest. */
static int elem_groups(const struct ops *o, uint64_t total, uint32_t *ret) {
  if (total >= OPS_MAX_ELEMS) return KVD_E_LIMIT;
  uint64_t g = (total + o->wg_elem - 1) / o->wg_elem;
  uint32_t max = gpu_device_caps(o->dev)->max_wg_count[0];
  *ret = g > max ? max : (uint32_t)g;
  return 0;
}

static int row_norm(struct ops *o, struct gpu_cmd *cmd, const struct gpu_pipeline *pipe,
                    const struct gpu_binding *b, uint32_t n_b, uint32_t n_tokens, uint32_t dim,
                    float eps, const char *label) {
  if (n_tokens == 0) return 0;
  if (dim == 0) return gpu_cmd_fail(cmd, KVD_EINVAL);
  if ((uint64_t)n_tokens * dim >= OPS_MAX_ELEMS) return gpu_cmd_fail(cmd, KVD_E_LIMIT);
  struct pc_rmsnorm pc = {.n_tokens = n_tokens, .dim = dim, .eps = eps};
  uint32_t gx, gy;
  gpu_grid_2d(o->dev, n_tokens, &gx, &gy);
  return gpu_cmd_dispatch(cmd, pipe, b, n_b, &pc, sizeof pc, gx, gy, 1, label);
}

int ops_rmsnorm(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, struct gpu_binding w,
                struct gpu_binding out, uint32_t n_tokens, uint32_t dim, float eps) {
  struct gpu_binding b[3] = {x, w, out};
  return row_norm(o, cmd, o->rmsnorm, b, 3, n_tokens, dim, eps, "rmsnorm");
}

int ops_add_rmsnorm(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, struct gpu_binding y,
                    struct gpu_binding w, struct gpu_binding out, uint32_t n_tokens, uint32_t dim,
                    float eps) {
  struct gpu_binding b[4] = {x, w, out, y};
  return row_norm(o, cmd, o->add_rmsnorm, b, 4, n_tokens, dim, eps, "add_rmsnorm");
}

/* ---- rope ---- */

static bool rope_cfg_valid(const struct model_rope *cfg) {
  return cfg->n_rot >= 2 && cfg->n_rot % 2 == 0 &&
         (cfg->mode == MODEL_ROPE_NORMAL || cfg->mode == MODEL_ROPE_NEOX) &&
         isfinite(cfg->freq_base) && cfg->freq_base > 0 && isfinite(cfg->freq_scale) &&
         cfg->freq_scale > 0 && isfinite(cfg->mscale) && cfg->mscale >= 0 &&
         (cfg->yarn_ext_factor <= 0 || (cfg->yarn_orig_ctx > 0 && cfg->yarn_beta_fast > 0 &&
                                        cfg->yarn_beta_slow > 0));
}

/* words[2i], words[2i + 1] = low, high 32 bits of frac(f_i / 2pi) * 2^64, where f_i is the
 * angle per position of pair i computed exactly as ref_rope does, in double. Only the fraction of
 * a turn matters because positions are integers. frac(), the scalings by 2^32 and the split into
 * words are exact in double; the truncation below 2^-64 turn is at most 2^-32 turn even at
 * position 2^32. */
static void rope_freq_words(const struct model_rope *cfg, uint32_t *words) {
  static const double two_pi = 6.283185307179586476925;
  for (uint32_t i = 0; i < cfg->n_rot / 2; i++) {
    double f = model_rope_freq(cfg, i);
    double turns = f / two_pi;
    double frac = ldexp(turns - floor(turns), 32);
    double hi = floor(frac);
    double lo = floor(ldexp(frac - hi, 32));
    words[2 * i] = (uint32_t)lo;
    words[2 * i + 1] = (uint32_t)hi;
  }
}

static const struct ops_rope_table *rope_find(const struct ops *o, const struct model_rope *cfg) {
  for (uint32_t i = 0; i < o->n_rope; i++) {
    const struct ops_rope_table *t = &o->rope_tables[i];
    const struct model_rope *c = &t->cfg;
    /* Everything model_rope_freq() reads; mscale is a push constant, not in the table. */
    if (c->n_rot == cfg->n_rot && c->freq_base == cfg->freq_base &&
        c->freq_scale == cfg->freq_scale && c->freq_factors == cfg->freq_factors &&
        c->yarn_ext_factor == cfg->yarn_ext_factor && c->yarn_beta_fast == cfg->yarn_beta_fast &&
        c->yarn_beta_slow == cfg->yarn_beta_slow && c->yarn_orig_ctx == cfg->yarn_orig_ctx)
      return t;
  }
  return NULL;
}

int ops_rope_prepare(struct ops *o, const struct model_rope *cfg) {
  if (!rope_cfg_valid(cfg)) return KVD_EINVAL;
  if (rope_find(o, cfg)) return 0;
  if (o->n_rope == OPS_MAX_ROPE_TABLES) return KVD_ENOSPC;
  uint64_t bytes = (uint64_t)cfg->n_rot / 2 * 2 * sizeof(uint32_t);
  uint32_t *words = malloc(bytes);
  if (!words) return KVD_ENOMEM;
  rope_freq_words(cfg, words);
  struct gpu_buffer *buf = NULL;
  int rc = gpu_buffer_new(o->dev, bytes, GPU_MEM_DEVICE, "rope freq", &buf);
  if (rc == 0) rc = gpu_buffer_upload(o->dev, buf, 0, words, bytes);
  free(words);
  if (rc < 0) {
    gpu_buffer_free(buf);
    return rc;
  }
  o->rope_tables[o->n_rope++] = (struct ops_rope_table){.cfg = *cfg, .freq = buf};
  return 0;
}

struct gpu_buffer *ops_rope_freq(const struct ops *o, const struct model_rope *cfg) {
  const struct ops_rope_table *t = rope_find(o, cfg);
  return t ? t->freq : NULL;
}

int ops_rope(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, struct gpu_binding pos,
             uint32_t n_tokens, uint32_t n_heads, uint32_t head_dim, uint32_t stride,
             const struct model_rope *cfg) {
  if (n_tokens == 0) return 0;
  uint64_t row = (uint64_t)n_heads * head_dim;
  if (stride == 0) stride = (uint32_t)row;
  if (!rope_cfg_valid(cfg) || n_heads == 0 || cfg->n_rot > head_dim || stride < row)
    return gpu_cmd_fail(cmd, KVD_EINVAL);
  if ((uint64_t)(n_tokens - 1) * stride + row >= OPS_MAX_ELEMS)
    return gpu_cmd_fail(cmd, KVD_E_LIMIT);
  int rc = ops_rope_prepare(o, cfg);
  if (rc < 0) return gpu_cmd_fail(cmd, rc);
  const struct ops_rope_table *t = rope_find(o, cfg);
  struct pc_rope pc = {.n_tokens = n_tokens,
                       .n_heads = n_heads,
                       .head_dim = head_dim,
                       .n_rot = cfg->n_rot,
                       .mode = cfg->mode == MODEL_ROPE_NEOX ? 1u : 0u,
                       .stride = stride,
                       .mscale = (float)model_rope_mscale(cfg)};
  uint32_t groups;
  if ((rc = elem_groups(o, (uint64_t)n_tokens * n_heads * (cfg->n_rot / 2), &groups)) < 0)
    return gpu_cmd_fail(cmd, rc);
  struct gpu_binding b[3] = {x, pos, {t->freq, 0, 0}};
  return gpu_cmd_dispatch(cmd, o->rope, b, 3, &pc, sizeof pc, groups, 1, 1, "rope");
}

/* ---- element-wise ---- */

static int swiglu(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding gate,
                  struct gpu_binding up, struct gpu_binding out, const struct pc_swiglu *pc) {
  if (pc->n_tokens == 0) return 0;
  if (pc->n == 0) return gpu_cmd_fail(cmd, KVD_EINVAL);
  if ((uint64_t)pc->n_tokens * pc->in_stride >= OPS_MAX_ELEMS)
    return gpu_cmd_fail(cmd, KVD_E_LIMIT);
  uint32_t groups;
  int rc = elem_groups(o, (uint64_t)pc->n_tokens * pc->n, &groups);
  if (rc < 0) return gpu_cmd_fail(cmd, rc);
  struct gpu_binding b[3] = {gate, up, out};
  return gpu_cmd_dispatch(cmd, o->swiglu, b, 3, pc, sizeof *pc, groups, 1, 1, "swiglu");
}

int ops_swiglu(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding gate, struct gpu_binding up,
               struct gpu_binding out, uint32_t n_tokens, uint32_t n) {
  struct pc_swiglu pc = {
      .n_tokens = n_tokens, .n = n, .in_stride = n, .up_off = 0, .out_stride = n};
  return swiglu(o, cmd, gate, up, out, &pc);
}

int ops_geglu(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding gate, struct gpu_binding up,
              struct gpu_binding out, uint32_t n_tokens, uint32_t n) {
  struct pc_swiglu pc = {
      .n_tokens = n_tokens, .n = n, .in_stride = n, .up_off = 0, .out_stride = n, .act = 1};
  return swiglu(o, cmd, gate, up, out, &pc);
}

int ops_swiglu_fused(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding gate_up,
                     struct gpu_binding out, uint32_t n_tokens, uint32_t n) {
  /* One buffer bound twice: up is found by an element offset rather than a second binding
   * offset, which would have to meet minStorageBufferOffsetAlignment. */
  if ((uint64_t)n * 2 >= OPS_MAX_ELEMS) return gpu_cmd_fail(cmd, KVD_E_LIMIT);
  struct pc_swiglu pc = {
      .n_tokens = n_tokens, .n = n, .in_stride = 2 * n, .up_off = n, .out_stride = n};
  return swiglu(o, cmd, gate_up, gate_up, out, &pc);
}

static int add_op(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, struct gpu_binding y,
                  uint32_t n_tokens, uint32_t n, bool bcast, uint32_t op, float a,
                  const char *label) {
  if (n_tokens == 0) return 0;
  if (n == 0) return gpu_cmd_fail(cmd, KVD_EINVAL);
  uint32_t groups;
  int rc = elem_groups(o, (uint64_t)n_tokens * n, &groups);
  if (rc < 0) return gpu_cmd_fail(cmd, rc);
  struct pc_add pc = {.n_tokens = n_tokens, .n = n, .bcast = bcast, .op = op, .a = a};
  struct gpu_binding b[2] = {x, y};
  return gpu_cmd_dispatch(cmd, o->add, b, 2, &pc, sizeof pc, groups, 1, 1, label);
}

int ops_add(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, struct gpu_binding y,
            uint32_t n_tokens, uint32_t n) {
  return add_op(o, cmd, x, y, n_tokens, n, false, 0, 0.0f, "add");
}

int ops_add_bias(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, struct gpu_binding bias,
                 uint32_t n_tokens, uint32_t n) {
  return add_op(o, cmd, x, bias, n_tokens, n, true, 0, 0.0f, "add_bias");
}

int ops_scale(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, uint64_t n, float s) {
  if (!isfinite(s)) return gpu_cmd_fail(cmd, KVD_EINVAL);
  if (n >= OPS_MAX_ELEMS) return gpu_cmd_fail(cmd, KVD_E_LIMIT);
  if (n == 0) return 0;
  return add_op(o, cmd, x, x, 1, (uint32_t)n, false, 1, s, "scale");
}

int ops_softcap(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, uint64_t n, float c) {
  if (!(c > 0.0f) || !isfinite(c)) return gpu_cmd_fail(cmd, KVD_EINVAL);
  if (n >= OPS_MAX_ELEMS) return gpu_cmd_fail(cmd, KVD_E_LIMIT);
  if (n == 0) return 0;
  return add_op(o, cmd, x, x, 1, (uint32_t)n, false, 2, c, "softcap");
}

int ops_softmax(struct ops *o, struct gpu_cmd *cmd, struct gpu_binding x, uint32_t n_rows,
                uint32_t n) {
  if (n_rows == 0) return 0;
  if (n == 0) return gpu_cmd_fail(cmd, KVD_EINVAL);
  if ((uint64_t)n_rows * n >= OPS_MAX_ELEMS) return gpu_cmd_fail(cmd, KVD_E_LIMIT);
  struct pc_softmax pc = {.n_rows = n_rows, .n = n};
  uint32_t gx, gy;
  gpu_grid_2d(o->dev, n_rows, &gx, &gy);
  struct gpu_binding b[1] = {x};
  return gpu_cmd_dispatch(cmd, o->softmax, b, 1, &pc, sizeof pc, gx, gy, 1, "softmax");
}
