/* The element-wise and row-wise ops (daemon/model/ops.c) against the CPU reference ops
 * (ref_ops.h) on fresh random inputs: widths 1, 7, 63, 64, 172, 4097 (not multiples of any
 * workgroup size) for 1, 3 and 100 tokens, more rows than one grid dimension holds, each with
 * the portable reductions at two workgroup sizes and with the subgroup ones where the device has
 * them. f32 results agree within 1e-5 relative error; the floor under |want| for each kernel is
 * stated where it is used. The residual adds are exact (one f32 rounding on both sides). */
#include "gpu_fixture.h"
#include "kvd_error.h"
#include "ops.h"
#include "ref_ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define F32_TOL 1e-5

static const uint32_t dims[] = {1, 7, 63, 64, 172, 4097};
static const uint32_t toks[] = {1, 3, 100};
#define N_DIMS (sizeof dims / sizeof dims[0])
#define N_TOKS (sizeof toks / sizeof toks[0])

/* Workgroup-size and reduction variants every kernel runs under. */
struct variant {
  const char *name;
  struct ops_opts opts;
};
static const struct variant variants[] = {
    {"portable wg 256", {.portable = true}},
    {"portable wg 32", {.portable = true, .wg_row = 32, .wg_elem = 32}},
    {"default (subgroup where available)", {0}},
};
#define N_VARIANTS (sizeof variants / sizeof variants[0])

/* Worst errors seen per kernel, logged at the end of each test. */
static double worst_rms, worst_rope, worst_swiglu, worst_softmax;

static struct gpu_binding whole(struct gpu_buffer *b) {
  return (struct gpu_binding){b, 0, 0};
}

static int submit_wait(struct gpu_cmd *cmd) {
  int rc = gpu_cmd_submit(cmd);
  return rc < 0 ? rc : gpu_cmd_wait(cmd);
}

static void note(double *worst, double err) {
  if (!(err <= *worst)) *worst = err; /* NaN sticks */
}

static float *rand_floats(size_t n, float lo, float hi) {
  float *p = malloc(n ? n * sizeof(float) : 1);
  if (p) kt_rand_fill(p, n, lo, hi);
  return p;
}

/* A row count past maxComputeWorkGroupCount[0], so the row kernels need their 2D grid; 0 where
 * that limit is too large to exceed with a test-sized buffer. */
static uint32_t many_rows(struct gpu_device *dev) {
  uint32_t max = gpu_device_caps(dev)->max_wg_count[0];
  return max < (1u << 20) ? max + 7u : 0;
}

/* ---- rmsnorm and add_rmsnorm ---- */

/* One shape: rmsnorm out of place and in place, add_rmsnorm out of place and with out == x. */
static void check_rmsnorm(struct ops *o, struct gpu_cmd *cmd, uint32_t n_tok, uint32_t dim,
                          const char *vname) {
  size_t n = (size_t)n_tok * dim;
  float eps = kt_rand_range(0, 1) ? 1e-5f : 1e-6f;
  float *x = rand_floats(n, -2, 2), *y = rand_floats(n, -2, 2), *w = rand_floats(dim, -1.5f, 1.5f);
  float *want = malloc(n * 4), *sum = malloc(n * 4), *want2 = malloc(n * 4);
  KT_ASSERT(x && y && w && want && sum && want2);
  for (uint32_t t = 0; t < n_tok; t++)
    ref_rmsnorm(want + (size_t)t * dim, x + (size_t)t * dim, w, dim, eps);
  memcpy(sum, x, n * 4);
  ref_add(sum, y, n);
  for (uint32_t t = 0; t < n_tok; t++)
    ref_rmsnorm(want2 + (size_t)t * dim, sum + (size_t)t * dim, w, dim, eps);

  struct gpu_buffer *bx = fixture_upload(x, n * 4), *bx2 = fixture_upload(x, n * 4);
  struct gpu_buffer *bx3 = fixture_upload(x, n * 4), *bx4 = fixture_upload(x, n * 4);
  struct gpu_buffer *by = fixture_upload(y, n * 4), *bw = fixture_upload(w, dim * 4);
  struct gpu_buffer *bo = fixture_upload(NULL, n * 4), *bo3 = fixture_upload(NULL, n * 4);
  KT_ASSERT(bx && bx2 && bx3 && bx4 && by && bw && bo && bo3);
  int rc = gpu_cmd_begin(cmd);
  /* Four independent dispatches: no barriers needed between them. */
  if (rc == 0) rc = ops_rmsnorm(o, cmd, whole(bx), whole(bw), whole(bo), n_tok, dim, eps);
  if (rc == 0) rc = ops_rmsnorm(o, cmd, whole(bx2), whole(bw), whole(bx2), n_tok, dim, eps);
  if (rc == 0)
    rc = ops_add_rmsnorm(o, cmd, whole(bx3), whole(by), whole(bw), whole(bo3), n_tok, dim, eps);
  if (rc == 0)
    rc = ops_add_rmsnorm(o, cmd, whole(bx4), whole(by), whole(bw), whole(bx4), n_tok, dim, eps);
  int rc2 = submit_wait(cmd);
  if (rc == 0) rc = rc2;
  float *got = fixture_download(bo, n * 4), *got_in = fixture_download(bx2, n * 4);
  float *got3 = fixture_download(bo3, n * 4), *got3x = fixture_download(bx3, n * 4);
  float *got4 = fixture_download(bx4, n * 4);
  struct gpu_buffer *all[] = {bx, bx2, bx3, bx4, by, bw, bo, bo3};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
    gpu_buffer_free(all[i]);
  bool ok = rc == 0 && got && got_in && got3 && got3x && got4;
  /* Every output is a product of x, w and one per-row scale, with no cancellation, so the error
   * is relative even for tiny values: the floor only keeps a 0/0 from dividing. */
  double e1 = ok ? kt_max_rel_err(got, want, n, 1e-30) : INFINITY;
  double e2 = ok ? kt_max_rel_err(got_in, want, n, 1e-30) : INFINITY;
  double e3 = ok ? kt_max_rel_err(got3, want2, n, 1e-30) : INFINITY;
  double e4 = ok ? kt_max_rel_err(got4, want2, n, 1e-30) : INFINITY;
  bool sum_exact = ok && memcmp(got3x, sum, n * 4) == 0;
  free(x), free(y), free(w), free(want), free(sum), free(want2);
  free(got), free(got_in), free(got3), free(got3x), free(got4);
  KT_ASSERT_OK(rc);
  note(&worst_rms, e1), note(&worst_rms, e2), note(&worst_rms, e3), note(&worst_rms, e4);
  KT_ASSERT_MSG(e1 < F32_TOL && e2 < F32_TOL, "rmsnorm %s %ux%u: rel err %.3g, in place %.3g",
                vname, n_tok, dim, e1, e2);
  KT_ASSERT_MSG(e3 < F32_TOL && e4 < F32_TOL, "add_rmsnorm %s %ux%u: rel err %.3g, aliased %.3g",
                vname, n_tok, dim, e3, e4);
  KT_ASSERT_MSG(sum_exact, "add_rmsnorm %s %ux%u: residual sum written back differs", vname, n_tok,
                dim);
}

KT_TEST(rmsnorm_and_add_rmsnorm_match_cpu) {
  FIXTURE_DEVICE(dev);
  struct gpu_cmd *cmd;
  KT_ASSERT_OK(gpu_cmd_new(dev, &cmd));
  for (size_t v = 0; v < N_VARIANTS; v++) {
    struct ops o;
    KT_ASSERT_OK(ops_init(&o, dev, &variants[v].opts));
    for (size_t d = 0; d < N_DIMS; d++)
      for (size_t t = 0; t < N_TOKS; t++)
        check_rmsnorm(&o, cmd, toks[t], dims[d], variants[v].name);
    /* More rows than maxComputeWorkGroupCount[0]: the 2D grid. Only with the small workgroup,
     * which is enough to check the row indexing and keeps lavapipe's time down. */
    if (o.wg_row <= 32 && many_rows(dev))
      check_rmsnorm(&o, cmd, many_rows(dev), 3, variants[v].name);
    kt_log("%s: wg_row %u, subgroup %s", variants[v].name, o.wg_row, o.subgroup ? "yes" : "no");
    ops_destroy(&o);
  }
  gpu_cmd_free(cmd);
  kt_log("rmsnorm/add_rmsnorm: max rel err %.3g (floor 1e-30)", worst_rms);
  FIXTURE_CHECK_VALIDATION();
}

/* ---- rope ---- */

struct rope_case {
  uint32_t n_heads, head_dim, n_rot;
  float freq_base, freq_scale;
  uint32_t max_pos;
  bool factors; /* per-pair frequency divisors (Llama 3.1's rope_freqs), drawn at random */
  bool yarn;    /* YaRN over an original context of max_pos / 4, betas 32 and 1 */
  float mscale; /* attention factor on the rotated pair (LongRoPE, YaRN); 0 = 1 */
};

static struct model_rope rope_case_cfg(const struct rope_case *c, enum model_rope_mode mode);

/* One table of random divisors in [1, 8] for every case that has them: ops tell rope tables
 * apart by the factors' address, so one array keeps the table count bounded. */
static float rope_factors[128];

static const float *rope_case_factors(const struct rope_case *c) {
  if (!c->factors) return NULL;
  if (rope_factors[0] == 0.0f)
    for (size_t i = 0; i < sizeof rope_factors / sizeof rope_factors[0]; i++)
      rope_factors[i] = 1.0f + 7.0f * (float)kt_rand_range(0, 1000) / 1000.0f;
  return rope_factors;
}

/* Error of a rotation, per element, relative to the length of the pair it belongs to: a rotation
 * keeps that length, and an element of a pair can be near zero while its error is set by the
 * pair. Dimensions past n_rot must come back bit-identical. */
static double rope_err(const float *got, const float *want, const float *in, uint32_t n_tok,
                       uint32_t n_heads, uint32_t hd, uint32_t n_rot, enum model_rope_mode mode,
                       bool *untouched_ok) {
  double worst = 0;
  uint32_t half = n_rot / 2;
  *untouched_ok = true;
  for (size_t r = 0; r < (size_t)n_tok * n_heads; r++) {
    const float *g = got + r * hd, *w = want + r * hd, *x = in + r * hd;
    for (uint32_t i = 0; i < half; i++) {
      uint32_t i0 = mode == MODEL_ROPE_NEOX ? i : 2 * i;
      uint32_t i1 = mode == MODEL_ROPE_NEOX ? i + half : 2 * i + 1;
      double len = hypot(x[i0], x[i1]);
      if (len < 1e-30) len = 1e-30;
      double e = fmax(fabs((double)g[i0] - w[i0]), fabs((double)g[i1] - w[i1])) / len;
      if (!(e <= worst)) worst = e;
    }
    for (uint32_t d = n_rot; d < hd; d++)
      *untouched_ok = *untouched_ok && g[d] == x[d];
  }
  return worst;
}

static struct model_rope rope_case_cfg(const struct rope_case *c, enum model_rope_mode mode) {
  struct model_rope r = {.n_rot = c->n_rot,
                         .mode = mode,
                         .freq_base = c->freq_base,
                         .freq_scale = c->freq_scale,
                         .freq_factors = rope_case_factors(c),
                         .mscale = c->mscale};
  if (c->yarn) {
    r.yarn_ext_factor = 1.0f;
    r.yarn_beta_fast = 32.0f;
    r.yarn_beta_slow = 1.0f;
    r.yarn_orig_ctx = c->max_pos / 4;
  }
  return r;
}

static void check_rope(struct ops *o, struct gpu_cmd *cmd, const struct rope_case *c,
                       enum model_rope_mode mode, uint32_t n_tok, const char *vname) {
  size_t n = (size_t)n_tok * c->n_heads * c->head_dim;
  float *x = rand_floats(n, -1, 1), *want = malloc(n * 4);
  uint32_t *pos = malloc(n_tok * 4);
  KT_ASSERT(x && want && pos);
  for (uint32_t t = 0; t < n_tok; t++)
    pos[t] = kt_rand_range(0, c->max_pos);
  pos[0] = c->max_pos; /* the largest angle always appears */
  if (n_tok > 1) pos[1] = 0;
  memcpy(want, x, n * 4);
  struct model_rope cfg = rope_case_cfg(c, mode);
  ref_rope_ext(want, n_tok, c->n_heads, c->head_dim, pos, &cfg);
  struct gpu_buffer *bx = fixture_upload(x, n * 4), *bp = fixture_upload(pos, n_tok * 4);
  KT_ASSERT(bx && bp);
  int rc = ops_rope_prepare(o, &cfg);
  if (rc == 0) rc = gpu_cmd_begin(cmd);
  if (rc == 0) {
    rc = ops_rope(o, cmd, whole(bx), whole(bp), n_tok, c->n_heads, c->head_dim, 0, &cfg);
    int rc2 = submit_wait(cmd);
    if (rc == 0) rc = rc2;
  }
  float *got = rc == 0 ? fixture_download(bx, n * 4) : NULL;
  bool untouched = false;
  double err =
      got ? rope_err(got, want, x, n_tok, c->n_heads, c->head_dim, c->n_rot, mode, &untouched)
          : INFINITY;
  gpu_buffer_free(bx);
  gpu_buffer_free(bp);
  free(x), free(want), free(pos), free(got);
  KT_ASSERT_OK(rc);
  note(&worst_rope, err);
  KT_ASSERT_MSG(err < F32_TOL,
                "rope %s %s heads %u hd %u n_rot %u base %g scale %g tokens %u "
                "pos<=%u: rel err %.3g",
                vname, model_rope_mode_name(mode), c->n_heads, c->head_dim, c->n_rot, c->freq_base,
                c->freq_scale, n_tok, c->max_pos, err);
  KT_ASSERT_MSG(untouched, "rope %s: dimensions past n_rot changed", vname);
}

KT_TEST(rope_both_modes_matches_cpu) {
  FIXTURE_DEVICE(dev);
  static const struct rope_case cases[] = {
      {4, 64, 64, 10000.0f, 1.0f, 4096, false, false, 0},      /* llama */
      {3, 64, 32, 10000.0f, 1.0f, 4096, false, false, 0},      /* partial rotation */
      {2, 128, 128, 1000000.0f, 1.0f, 4096, false, false, 0},  /* qwen2's base */
      {5, 7, 6, 10000.0f, 0.25f, 4096, false, false, 0},       /* odd head_dim, linear scaling */
      {8, 8, 8, 10000.0f, 1.0f, 4096, false, false, 0},        /* stories260K */
      {1, 96, 64, 500000.0f, 0.5f, 1u << 20, false, false, 0}, /* far past any test context */
      {4, 64, 64, 500000.0f, 1.0f, 131072, true, false, 0},    /* llama 3.1: rope_freqs divisors */
      {4, 64, 64, 1000000.0f, 0.25f, 32768, false, true, 0},   /* qwen2.5 YaRN x4 */
      {2, 96, 64, 10000.0f, 1.0f, 131072, true, false, 1.19f}, /* phi3 LongRoPE */
  };
  struct gpu_cmd *cmd;
  KT_ASSERT_OK(gpu_cmd_new(dev, &cmd));
  for (size_t v = 0; v < N_VARIANTS; v++) {
    struct ops o;
    KT_ASSERT_OK(ops_init(&o, dev, &variants[v].opts));
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
      for (int m = 0; m < 2; m++)
        for (size_t t = 0; t < N_TOKS; t++)
          check_rope(&o, cmd, &cases[i], m ? MODEL_ROPE_NEOX : MODEL_ROPE_NORMAL, toks[t],
                     variants[v].name);
    ops_destroy(&o);
  }
  gpu_cmd_free(cmd);
  kt_log("rope: max err %.3g relative to the pair's length", worst_rope);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(rope_rotates_k_in_place_inside_a_fused_qkv_buffer) {
  FIXTURE_DEVICE(dev);
  /* Rows [q (NQ heads) | k (NK heads) | v (NK heads)]: rope k where it lies, through a binding
   * offset and the row stride; q and v must stay bit-identical. */
  enum { T = 9, NQ = 4, NK = 2, HD = 64 };
  const uint32_t stride = (NQ + 2 * NK) * HD;
  size_t n = (size_t)T * stride;
  uint64_t k_off = (uint64_t)NQ * HD * 4;
  if (k_off % gpu_device_caps(dev)->min_storage_align)
    KT_SKIP("minStorageBufferOffsetAlignment %llu > %llu",
            (unsigned long long)gpu_device_caps(dev)->min_storage_align, (unsigned long long)k_off);
  float *x = rand_floats(n, -1, 1), *k = malloc((size_t)T * NK * HD * 4);
  uint32_t pos[T];
  KT_ASSERT(x && k);
  for (uint32_t t = 0; t < T; t++) {
    pos[t] = kt_rand_range(0, 4096);
    memcpy(k + (size_t)t * NK * HD, x + (size_t)t * stride + NQ * HD, NK * HD * 4);
  }
  ref_rope(k, T, NK, HD, HD, pos, MODEL_ROPE_NEOX, 1e6f, 1.0f, NULL);
  struct ops o;
  KT_ASSERT_OK(ops_init(&o, dev, NULL));
  struct gpu_buffer *bx = fixture_upload(x, n * 4), *bp = fixture_upload(pos, sizeof pos);
  struct gpu_cmd *cmd;
  KT_ASSERT(bx && bp);
  KT_ASSERT_OK(gpu_cmd_new(dev, &cmd));
  KT_ASSERT_OK(gpu_cmd_begin(cmd));
  struct model_rope cfg = {
      .n_rot = HD, .mode = MODEL_ROPE_NEOX, .freq_base = 1e6f, .freq_scale = 1.0f};
  KT_ASSERT_OK(
      ops_rope(&o, cmd, (struct gpu_binding){bx, k_off, 0}, whole(bp), T, NK, HD, stride, &cfg));
  KT_ASSERT_OK(submit_wait(cmd));
  float *got = fixture_download(bx, n * 4);
  KT_ASSERT(got);
  double worst = 0;
  bool others_same = true;
  for (uint32_t t = 0; t < T; t++) {
    const float *row = got + (size_t)t * stride, *in = x + (size_t)t * stride;
    for (uint32_t d = 0; d < stride; d++) {
      if (d >= NQ * HD && d < (NQ + NK) * HD) {
        double e = fabs(row[d] - k[(size_t)t * NK * HD + d - NQ * HD]);
        if (!(e <= worst)) worst = e;
      } else {
        others_same = others_same && row[d] == in[d];
      }
    }
  }
  free(x), free(k), free(got);
  gpu_buffer_free(bx);
  gpu_buffer_free(bp);
  gpu_cmd_free(cmd);
  ops_destroy(&o);
  /* Inputs in [-1, 1]: pairs are at most sqrt(2) long, so 1e-5 absolute is ~1e-5 relative. */
  KT_CHECK(worst < F32_TOL);
  KT_CHECK(others_same);
  kt_log("fused qkv rope: max abs err %.3g", worst);
  FIXTURE_CHECK_VALIDATION();
}

/* ---- swiglu ---- */

static void check_swiglu(struct ops *o, struct gpu_cmd *cmd, uint32_t n_tok, uint32_t dim,
                         const char *vname) {
  size_t n = (size_t)n_tok * dim;
  /* Gate values far enough out that exp(-g) spans e^-12 .. e^12. */
  float *g = rand_floats(n, -12, 12), *u = rand_floats(n, -2, 2);
  float *gu = malloc(2 * n * 4), *want = malloc(n * 4);
  KT_ASSERT(g && u && gu && want);
  ref_swiglu(want, g, u, n);
  for (uint32_t t = 0; t < n_tok; t++) { /* fused rows [gate | up] */
    memcpy(gu + (size_t)t * 2 * dim, g + (size_t)t * dim, dim * 4);
    memcpy(gu + (size_t)t * 2 * dim + dim, u + (size_t)t * dim, dim * 4);
  }
  struct gpu_buffer *bg = fixture_upload(g, n * 4), *bu = fixture_upload(u, n * 4);
  struct gpu_buffer *bg2 = fixture_upload(g, n * 4), *bgu = fixture_upload(gu, 2 * n * 4);
  struct gpu_buffer *bo = fixture_upload(NULL, n * 4), *bo2 = fixture_upload(NULL, n * 4);
  KT_ASSERT(bg && bu && bg2 && bgu && bo && bo2);
  int rc = gpu_cmd_begin(cmd);
  if (rc == 0) rc = ops_swiglu(o, cmd, whole(bg), whole(bu), whole(bo), n_tok, dim);
  if (rc == 0) rc = ops_swiglu(o, cmd, whole(bg2), whole(bu), whole(bg2), n_tok, dim);
  if (rc == 0) rc = ops_swiglu_fused(o, cmd, whole(bgu), whole(bo2), n_tok, dim);
  int rc2 = submit_wait(cmd);
  if (rc == 0) rc = rc2;
  float *got = fixture_download(bo, n * 4), *got_in = fixture_download(bg2, n * 4);
  float *got_f = fixture_download(bo2, n * 4);
  struct gpu_buffer *all[] = {bg, bu, bg2, bgu, bo, bo2};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
    gpu_buffer_free(all[i]);
  bool ok = rc == 0 && got && got_in && got_f;
  /* silu(g) * u is a product of accurately computed factors; the floor 1e-30 only keeps a 0/0
   * from dividing (the smallest |silu(g)| here is ~7e-5). */
  double e1 = ok ? kt_max_rel_err(got, want, n, 1e-30) : INFINITY;
  double e2 = ok ? kt_max_rel_err(got_in, want, n, 1e-30) : INFINITY;
  double e3 = ok ? kt_max_rel_err(got_f, want, n, 1e-30) : INFINITY;
  free(g), free(u), free(gu), free(want), free(got), free(got_in), free(got_f);
  KT_ASSERT_OK(rc);
  note(&worst_swiglu, e1), note(&worst_swiglu, e2), note(&worst_swiglu, e3);
  KT_ASSERT_MSG(e1 < F32_TOL && e2 < F32_TOL && e3 < F32_TOL,
                "swiglu %s %ux%u: rel err %.3g, in place %.3g, fused %.3g", vname, n_tok, dim, e1,
                e2, e3);
}

/* gemma's GeGLU: gelu(g) * u with GELU's tanh approximation, over gates from -12 (where gelu is
 * ~0 and the tanh argument large) through 0 (the polynomial branch) to 12. */
static void check_geglu(struct ops *o, struct gpu_cmd *cmd, uint32_t n_tok, uint32_t dim,
                        const char *vname) {
  size_t n = (size_t)n_tok * dim;
  float *g = rand_floats(n, -12, 12), *u = rand_floats(n, -2, 2), *want = malloc(n * 4);
  KT_ASSERT(g && u && want);
  ref_geglu(want, g, u, n);
  struct gpu_buffer *bg = fixture_upload(g, n * 4), *bu = fixture_upload(u, n * 4);
  struct gpu_buffer *bo = fixture_upload(NULL, n * 4);
  KT_ASSERT(bg && bu && bo);
  int rc = gpu_cmd_begin(cmd);
  if (rc == 0) rc = ops_geglu(o, cmd, whole(bg), whole(bu), whole(bo), n_tok, dim);
  int rc2 = submit_wait(cmd);
  if (rc == 0) rc = rc2;
  float *got = rc == 0 ? fixture_download(bo, n * 4) : NULL;
  /* Absolute error against max(|u|, 1e-3): gelu(g) is ~1e-30 for g near -12, where only an
   * absolute bound means anything; elsewhere this is the relative error. */
  double worst = got ? 0 : INFINITY;
  for (size_t i = 0; got && i < n; i++) {
    double scale = fmax(fabs((double)g[i] * u[i]), 1e-3);
    double e = fabs((double)got[i] - want[i]) / scale;
    if (!(e <= worst)) worst = e;
  }
  gpu_buffer_free(bg), gpu_buffer_free(bu), gpu_buffer_free(bo);
  free(g), free(u), free(want), free(got);
  KT_ASSERT_OK(rc);
  note(&worst_swiglu, worst);
  KT_ASSERT_MSG(worst < F32_TOL, "geglu %s %ux%u: err %.3g", vname, n_tok, dim, worst);
}

KT_TEST(swiglu_separate_in_place_and_fused_match_cpu) {
  FIXTURE_DEVICE(dev);
  struct gpu_cmd *cmd;
  KT_ASSERT_OK(gpu_cmd_new(dev, &cmd));
  for (size_t v = 0; v < N_VARIANTS; v++) {
    struct ops o;
    KT_ASSERT_OK(ops_init(&o, dev, &variants[v].opts));
    for (size_t d = 0; d < N_DIMS; d++)
      for (size_t t = 0; t < N_TOKS; t++)
        check_swiglu(&o, cmd, toks[t], dims[d], variants[v].name),
            check_geglu(&o, cmd, toks[t], dims[d], variants[v].name);
    ops_destroy(&o);
  }
  gpu_cmd_free(cmd);
  kt_log("swiglu: max rel err %.3g (floor 1e-30)", worst_swiglu);
  FIXTURE_CHECK_VALIDATION();
}

/* ---- add ---- */

static void check_add(struct ops *o, struct gpu_cmd *cmd, uint32_t n_tok, uint32_t dim,
                      const char *vname) {
  size_t n = (size_t)n_tok * dim;
  float *x = rand_floats(n, -10, 10), *y = rand_floats(n, -10, 10), *b = rand_floats(dim, -1, 1);
  float *want = malloc(n * 4), *want_b = malloc(n * 4);
  KT_ASSERT(x && y && b && want && want_b);
  memcpy(want, x, n * 4);
  ref_add(want, y, n);
  memcpy(want_b, x, n * 4);
  for (uint32_t t = 0; t < n_tok; t++)
    ref_add(want_b + (size_t)t * dim, b, dim);
  struct gpu_buffer *bx = fixture_upload(x, n * 4), *bx2 = fixture_upload(x, n * 4);
  struct gpu_buffer *by = fixture_upload(y, n * 4), *bb = fixture_upload(b, dim * 4);
  KT_ASSERT(bx && bx2 && by && bb);
  int rc = gpu_cmd_begin(cmd);
  if (rc == 0) rc = ops_add(o, cmd, whole(bx), whole(by), n_tok, dim);
  if (rc == 0) rc = ops_add_bias(o, cmd, whole(bx2), whole(bb), n_tok, dim);
  int rc2 = submit_wait(cmd);
  if (rc == 0) rc = rc2;
  float *got = fixture_download(bx, n * 4), *got_b = fixture_download(bx2, n * 4);
  bool same = rc == 0 && got && memcmp(got, want, n * 4) == 0;
  bool same_b = rc == 0 && got_b && memcmp(got_b, want_b, n * 4) == 0;
  gpu_buffer_free(bx), gpu_buffer_free(bx2), gpu_buffer_free(by), gpu_buffer_free(bb);
  free(x), free(y), free(b), free(want), free(want_b), free(got), free(got_b);
  KT_ASSERT_OK(rc);
  KT_ASSERT_MSG(same, "add %s %ux%u differs from the CPU sum", vname, n_tok, dim);
  KT_ASSERT_MSG(same_b, "add_bias %s %ux%u differs from the CPU sum", vname, n_tok, dim);
}

/* gemma's embedding scale and gemma2's logit soft-capping, over values spanning both branches of
 * the shaders' tanh (|x / c| below and above 0.5) and far into saturation. */
KT_TEST(scale_and_softcap_match_cpu) {
  FIXTURE_DEVICE(dev);
  struct ops o;
  KT_ASSERT_OK(ops_init(&o, dev, NULL));
  struct gpu_cmd *cmd;
  KT_ASSERT_OK(gpu_cmd_new(dev, &cmd));
  const size_t n = 70001; /* not a multiple of any workgroup size */
  float *x = rand_floats(n, -300, 300), *ws = malloc(n * 4), *wc = malloc(n * 4);
  KT_ASSERT(x && ws && wc);
  for (size_t i = 0; i < n / 2; i++)
    x[i] /= 100.0f; /* half of them in the polynomial branch */
  for (size_t i = 0; i < n; i++)
    ws[i] = x[i] * 11.3137085f;
  memcpy(wc, x, n * 4);
  ref_softcap(wc, n, 30.0f);
  struct gpu_buffer *bs = fixture_upload(x, n * 4), *bc = fixture_upload(x, n * 4);
  KT_ASSERT(bs && bc);
  KT_ASSERT_OK(gpu_cmd_begin(cmd));
  KT_ASSERT_OK(ops_scale(&o, cmd, whole(bs), n, 11.3137085f));
  KT_ASSERT_OK(ops_softcap(&o, cmd, whole(bc), n, 30.0f));
  KT_ASSERT_OK(submit_wait(cmd));
  float *gs = fixture_download(bs, n * 4), *gc = fixture_download(bc, n * 4);
  KT_ASSERT(gs && gc);
  double es = kt_max_rel_err(gs, ws, n, 1e-30), ec = kt_max_rel_err(gc, wc, n, 1e-30);
  kt_log("scale: max rel err %.3g; softcap: max rel err %.3g", es, ec);
  KT_CHECK(es < 1e-6);
  KT_CHECK(ec < F32_TOL);
  /* A cap that is not positive is refused. */
  KT_ASSERT_OK(gpu_cmd_begin(cmd));
  KT_CHECK_EQ(ops_softcap(&o, cmd, whole(bc), n, 0.0f), KVD_EINVAL);
  KT_CHECK_EQ(submit_wait(cmd), KVD_EINVAL);
  gpu_buffer_free(bs), gpu_buffer_free(bc);
  free(x), free(ws), free(wc), free(gs), free(gc);
  gpu_cmd_free(cmd);
  ops_destroy(&o);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(add_and_broadcast_bias_are_exact) {
  FIXTURE_DEVICE(dev);
  struct gpu_cmd *cmd;
  KT_ASSERT_OK(gpu_cmd_new(dev, &cmd));
  for (size_t v = 0; v < 2; v++) { /* no reduction: the two workgroup sizes suffice */
    struct ops o;
    KT_ASSERT_OK(ops_init(&o, dev, &variants[v].opts));
    for (size_t d = 0; d < N_DIMS; d++)
      for (size_t t = 0; t < N_TOKS; t++)
        check_add(&o, cmd, toks[t], dims[d], variants[v].name);
    ops_destroy(&o);
  }
  gpu_cmd_free(cmd);
  FIXTURE_CHECK_VALIDATION();
}

/* ---- softmax ---- */

static void check_softmax(struct ops *o, struct gpu_cmd *cmd, uint32_t rows, uint32_t n,
                          float offset, bool masked, const char *vname) {
  size_t total = (size_t)rows * n;
  float *x = rand_floats(total, offset - 10, offset + 10), *want = malloc(total * 4);
  KT_ASSERT(x && want);
  if (masked) /* causal-mask style -inf entries, never a whole row */
    for (size_t i = 0; i < total; i++)
      if (i % n != 0 && kt_rand_range(0, 3) == 0) x[i] = -INFINITY;
  memcpy(want, x, total * 4);
  for (uint32_t r = 0; r < rows; r++)
    ref_softmax(want + (size_t)r * n, n);
  struct gpu_buffer *bx = fixture_upload(x, total * 4);
  KT_ASSERT(bx);
  int rc = gpu_cmd_begin(cmd);
  if (rc == 0) rc = ops_softmax(o, cmd, whole(bx), rows, n);
  int rc2 = submit_wait(cmd);
  if (rc == 0) rc = rc2;
  float *got = rc == 0 ? fixture_download(bx, total * 4) : NULL;
  /* Inputs span 20 around the row maximum, so the smallest probability is ~2e-9 / n: no
   * denormals, and every output is exp() times one per-row factor. Floor 1e-30 (0/0 only). */
  double err = got ? kt_max_rel_err(got, want, total, 1e-30) : INFINITY;
  gpu_buffer_free(bx);
  free(x), free(want), free(got);
  KT_ASSERT_OK(rc);
  note(&worst_softmax, err);
  KT_ASSERT_MSG(err < F32_TOL, "softmax %s %ux%u offset %g%s: rel err %.3g", vname, rows, n, offset,
                masked ? " masked" : "", err);
}

KT_TEST(softmax_rows_match_cpu) {
  FIXTURE_DEVICE(dev);
  struct gpu_cmd *cmd;
  KT_ASSERT_OK(gpu_cmd_new(dev, &cmd));
  for (size_t v = 0; v < N_VARIANTS; v++) {
    struct ops o;
    KT_ASSERT_OK(ops_init(&o, dev, &variants[v].opts));
    for (size_t d = 0; d < N_DIMS; d++)
      for (size_t t = 0; t < N_TOKS; t++)
        check_softmax(&o, cmd, toks[t], dims[d], 0.0f, false, variants[v].name);
    /* Logits far from 0 would overflow exp() without the max subtraction. */
    check_softmax(&o, cmd, 3, 4097, 1000.0f, false, variants[v].name);
    check_softmax(&o, cmd, 5, 172, -500.0f, true, variants[v].name);
    if (o.wg_row <= 32 && many_rows(dev))
      check_softmax(&o, cmd, many_rows(dev), 2, 0.0f, false, variants[v].name);
    ops_destroy(&o);
  }
  gpu_cmd_free(cmd);
  kt_log("softmax: max rel err %.3g (floor 1e-30)", worst_softmax);
  FIXTURE_CHECK_VALIDATION();
}

/* ---- argument checks ---- */

/* Records `call` alone in a fresh recording: it must be refused with `want`, and since the
 * refusal is stored in the gpu_cmd (errors are sticky, gpu.h), so must the submission. */
#define CHECK_REFUSED(cmd, call, want)                                                             \
  do {                                                                                             \
    KT_ASSERT_OK(gpu_cmd_begin(cmd));                                                              \
    KT_CHECK_EQ((call), (want));                                                                   \
    KT_CHECK_EQ(gpu_cmd_submit(cmd), (want));                                                      \
  } while (0)

KT_TEST(bad_shapes_are_refused_and_empty_batches_record_nothing) {
  FIXTURE_DEVICE(dev);
  struct ops o;
  KT_ASSERT_OK(ops_init(&o, dev, NULL));
  struct gpu_buffer *b = fixture_upload(NULL, 4096);
  struct gpu_cmd *cmd;
  KT_ASSERT(b);
  KT_ASSERT_OK(gpu_cmd_new(dev, &cmd));
  struct model_rope odd = {
      .n_rot = 7, .mode = MODEL_ROPE_NORMAL, .freq_base = 1e4f, .freq_scale = 1.0f};
  struct model_rope wide = {
      .n_rot = 66, .mode = MODEL_ROPE_NORMAL, .freq_base = 1e4f, .freq_scale = 1.0f};
  struct model_rope ok8 = {
      .n_rot = 8, .mode = MODEL_ROPE_NEOX, .freq_base = 1e4f, .freq_scale = 1.0f};
  struct model_rope base0 = {
      .n_rot = 8, .mode = MODEL_ROPE_NEOX, .freq_base = 0.0f, .freq_scale = 1.0f};
  CHECK_REFUSED(cmd, ops_rope(&o, cmd, whole(b), whole(b), 1, 2, 8, 0, &odd), KVD_EINVAL);
  CHECK_REFUSED(cmd, ops_rope(&o, cmd, whole(b), whole(b), 1, 1, 64, 0, &wide), KVD_EINVAL);
  CHECK_REFUSED(cmd, ops_rope(&o, cmd, whole(b), whole(b), 1, 1, 8, 0, &base0), KVD_EINVAL);
  CHECK_REFUSED(cmd, ops_rope(&o, cmd, whole(b), whole(b), 2, 2, 8, 15, &ok8),
                KVD_EINVAL); /* stride */
  CHECK_REFUSED(cmd, ops_rmsnorm(&o, cmd, whole(b), whole(b), whole(b), 1, 0, 1e-5f), KVD_EINVAL);
  CHECK_REFUSED(cmd, ops_softmax(&o, cmd, whole(b), 1, 0), KVD_EINVAL);
  CHECK_REFUSED(cmd, ops_add(&o, cmd, whole(b), whole(b), 1u << 16, 1u << 16), KVD_E_LIMIT);
  /* The first refusal sticks: later calls, good or bad, return it and record nothing. */
  KT_ASSERT_OK(gpu_cmd_begin(cmd));
  KT_CHECK_EQ(ops_softmax(&o, cmd, whole(b), 1, 0), KVD_EINVAL);
  KT_CHECK_EQ(ops_add(&o, cmd, whole(b), whole(b), 1u << 16, 1u << 16), KVD_EINVAL);
  KT_CHECK_EQ(ops_softmax(&o, cmd, whole(b), 1, 64), KVD_EINVAL);
  KT_CHECK_EQ(gpu_cmd_error(cmd), KVD_EINVAL);
  KT_CHECK_EQ(gpu_cmd_submit(cmd), KVD_EINVAL);
  /* Nothing to do is not an error and records no dispatch; the next begin starts clean. */
  KT_ASSERT_OK(gpu_cmd_begin(cmd));
  KT_CHECK_EQ(ops_rmsnorm(&o, cmd, whole(b), whole(b), whole(b), 0, 64, 1e-5f), 0);
  KT_CHECK_EQ(ops_swiglu(&o, cmd, whole(b), whole(b), whole(b), 0, 64), 0);
  KT_CHECK_EQ(ops_softmax(&o, cmd, whole(b), 0, 64), 0);
  KT_CHECK_EQ(submit_wait(cmd), 0);
  KT_CHECK_EQ(ops_init(&(struct ops){0}, dev, &(struct ops_opts){.wg_row = 48}), KVD_EINVAL);
  gpu_buffer_free(b);
  gpu_cmd_free(cmd);
  ops_destroy(&o);
  FIXTURE_CHECK_VALIDATION();
}
