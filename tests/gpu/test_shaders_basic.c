/* The foundation kernels against a CPU reference on fresh random inputs, with shapes that are not
 * multiples of the workgroup or tile sizes: vector add, f32 mat-vec (portable and subgroup
 * variants), f32 tiled mat-mul. f32 results must agree within 1e-5 relative error, measured
 * against the dot product's magnitude sum(|w*x|) so cancellation cannot fake a failure. */
#include "gpu_fixture.h"
#include "kvd_error.h"
#include "pc_basic.h"
#include "shader_registry.h"
#include "test_shader_registry.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define F32_TOL 1e-5

struct bufset {
  struct gpu_buffer *b[3];
};

static int upload_new(struct gpu_device *dev, const float *data, size_t n,
                      struct gpu_buffer **ret) {
  int rc = gpu_buffer_new(dev, n * sizeof(float), GPU_MEM_DEVICE, "test input", ret);
  if (rc < 0) return rc;
  if (data) rc = gpu_buffer_upload(dev, *ret, 0, data, n * sizeof(float));
  return rc;
}

/* Runs one dispatch over three buffers (in, in, out) and downloads the output. */
static int run3(struct gpu_device *dev, const struct gpu_pipeline_desc *desc, const float *a,
                size_t na, const float *b, size_t nb, float *out, size_t nout, const void *push,
                uint32_t gx, uint32_t gy) {
  struct gpu_pipeline *pipe = NULL;
  struct gpu_cmd *cmd = NULL;
  struct gpu_buffer *bufs[3] = {0};
  int rc = gpu_pipeline_new(dev, desc, &pipe);
  if (rc == 0) rc = gpu_cmd_new(dev, &cmd);
  if (rc == 0) rc = upload_new(dev, a, na, &bufs[0]);
  if (rc == 0) rc = upload_new(dev, b, nb, &bufs[1]);
  if (rc == 0) rc = upload_new(dev, NULL, nout, &bufs[2]);
  if (rc == 0) rc = gpu_cmd_begin(cmd);
  if (rc == 0) {
    struct gpu_binding bind[3] = {{bufs[0], 0, 0}, {bufs[1], 0, 0}, {bufs[2], 0, 0}};
    rc = gpu_cmd_dispatch(cmd, pipe, bind, 3, push, desc->push_size, gx, gy, 1, NULL);
    int rc2 = gpu_cmd_submit(cmd);
    if (rc == 0) rc = rc2;
    if (rc == 0) rc = gpu_cmd_wait(cmd);
  }
  if (rc == 0) rc = gpu_buffer_download(dev, bufs[2], 0, out, nout * sizeof(float));
  for (int i = 0; i < 3; i++)
    gpu_buffer_free(bufs[i]);
  gpu_cmd_free(cmd);
  gpu_pipeline_free(pipe);
  return rc;
}

KT_TEST(vec_add_matches_cpu) {
  FIXTURE_DEVICE(dev);
  static const uint32_t sizes[] = {1, 63, 1000, 65537, 300001};
  for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
    uint32_t n = sizes[s];
    float *a = malloc(n * 4), *b = malloc(n * 4), *c = malloc(n * 4);
    KT_ASSERT(a && b && c);
    kt_rand_fill(a, n, -10, 10);
    kt_rand_fill(b, n, -10, 10);
    struct gpu_pipeline_desc d = {.shader = "vec_add",
                                  .n_buffers = 3,
                                  .push_size = sizeof(struct pc_vec_add),
                                  .n_spec = 1,
                                  .spec = {64},
                                  .local_size = {64, 1, 1}};
    struct pc_vec_add pc = {.n = n};
    /* Fewer groups than needed on purpose: the grid-stride loop must cover the rest. */
    uint32_t groups = (n + 63) / 64;
    if (groups > 1000) groups = 1000;
    int rc = run3(dev, &d, a, n, b, n, c, n, &pc, groups, 1);
    bool ok = rc == 0;
    for (uint32_t i = 0; ok && i < n; i++)
      ok = c[i] == a[i] + b[i]; /* exact in f32 */
    free(a);
    free(b);
    free(c);
    KT_ASSERT_OK(rc);
    KT_ASSERT_MSG(ok, "vec_add mismatch at n=%u", n);
  }
  FIXTURE_CHECK_VALIDATION();
}

static double matvec_err(const float *w, const float *x, const float *y, uint32_t rows,
                         uint32_t cols) {
  double worst = 0;
  for (uint32_t r = 0; r < rows; r++) {
    double want = 0, mag = 0;
    for (uint32_t c = 0; c < cols; c++) {
      want += (double)w[(size_t)r * cols + c] * x[c];
      mag += fabs((double)w[(size_t)r * cols + c] * x[c]);
    }
    double e = fabs(y[r] - want) / (mag > 1e-30 ? mag : 1e-30);
    if (!(e <= worst)) worst = e; /* NaN propagates */
  }
  return worst;
}

static void check_matvec(struct gpu_device *dev, const char *shader, uint32_t wg) {
  static const uint32_t shapes[][2] = {{1, 1},      {7, 33},     {64, 64},
                                       {129, 1000}, {511, 4097}, {3000, 70}};
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
    uint32_t rows = shapes[s][0], cols = shapes[s][1];
    float *w = malloc((size_t)rows * cols * 4), *x = malloc(cols * 4), *y = malloc(rows * 4);
    KT_ASSERT(w && x && y);
    kt_rand_fill(w, (size_t)rows * cols, -1, 1);
    kt_rand_fill(x, cols, -1, 1);
    struct gpu_pipeline_desc d = {.shader = shader,
                                  .n_buffers = 3,
                                  .push_size = sizeof(struct pc_matvec),
                                  .n_spec = 1,
                                  .spec = {wg},
                                  .local_size = {wg, 1, 1}};
    struct pc_matvec pc = {.rows = rows, .cols = cols};
    uint32_t gx, gy;
    gpu_grid_2d(dev, rows, &gx, &gy);
    int rc = run3(dev, &d, w, (size_t)rows * cols, x, cols, y, rows, &pc, gx, gy);
    double err = rc == 0 ? matvec_err(w, x, y, rows, cols) : INFINITY;
    free(w);
    free(x);
    free(y);
    KT_ASSERT_OK(rc);
    KT_ASSERT_MSG(err < F32_TOL, "%s wg=%u %ux%u: rel err %.3g", shader, wg, rows, cols, err);
  }
}

KT_TEST(matvec_f32_portable_matches_cpu) {
  FIXTURE_DEVICE(dev);
  check_matvec(dev, "matvec_f32", 64);
  check_matvec(dev, "matvec_f32", 32);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(matvec_f32_subgroup_matches_cpu) {
  FIXTURE_DEVICE(dev);
  const struct gpu_caps *c = gpu_device_caps(dev);
  if (!(c->subgroup_ops & GPU_SG_ARITHMETIC)) {
    kt_log("no subgroup arithmetic: the portable variant is the one in use");
    return;
  }
  /* The workgroup must be a whole number of subgroups for the per-subgroup partial sums. */
  uint32_t wg = c->subgroup_size > 64 ? c->subgroup_size : 64;
  check_matvec(dev, "matvec_f32_sg", wg);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(matmul_f32_matches_cpu) {
  FIXTURE_DEVICE(dev);
  static const uint32_t shapes[][3] = {{1, 1, 1},    {5, 7, 3},      {32, 32, 16},
                                       {33, 65, 17}, {100, 37, 250}, {17, 300, 129}};
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
    uint32_t m = shapes[s][0], n = shapes[s][1], k = shapes[s][2];
    float *x = malloc((size_t)m * k * 4), *w = malloc((size_t)n * k * 4),
          *y = malloc((size_t)m * n * 4);
    KT_ASSERT(x && w && y);
    kt_rand_fill(x, (size_t)m * k, -1, 1);
    kt_rand_fill(w, (size_t)n * k, -1, 1);
    struct gpu_pipeline_desc d = {.shader = "matmul_f32",
                                  .n_buffers = 3,
                                  .push_size = sizeof(struct pc_matmul),
                                  .n_spec = 3,
                                  .spec = {2, 2, 16},
                                  .local_size = {16, 16, 1}};
    struct pc_matmul pc = {.m = m, .n = n, .k = k};
    int rc = run3(dev, &d, w, (size_t)n * k, x, (size_t)m * k, y, (size_t)m * n, &pc, (n + 31) / 32,
                  (m + 31) / 32);
    double worst = 0;
    for (uint32_t i = 0; rc == 0 && i < m; i++) {
      for (uint32_t j = 0; j < n; j++) {
        double want = 0, mag = 0;
        for (uint32_t kk = 0; kk < k; kk++) {
          double p = (double)x[(size_t)i * k + kk] * w[(size_t)j * k + kk];
          want += p;
          mag += fabs(p);
        }
        double e = fabs(y[(size_t)i * n + j] - want) / (mag > 1e-30 ? mag : 1e-30);
        if (!(e <= worst)) worst = e;
      }
    }
    free(x);
    free(w);
    free(y);
    KT_ASSERT_OK(rc);
    KT_ASSERT_MSG(worst < F32_TOL, "matmul %ux%ux%u: rel err %.3g", m, n, k, worst);
  }
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(dispatch_limits_are_checked_before_the_device_sees_them) {
  FIXTURE_DEVICE(dev);
  const struct gpu_caps *c = gpu_device_caps(dev);
  struct gpu_pipeline_desc d = {.shader = "vec_add",
                                .n_buffers = 3,
                                .push_size = sizeof(struct pc_vec_add),
                                .n_spec = 1,
                                .spec = {64},
                                .local_size = {64, 1, 1}};
  struct gpu_pipeline *pipe;
  KT_ASSERT_OK(gpu_pipeline_new(dev, &d, &pipe));
  struct gpu_cmd *cmd;
  KT_ASSERT_OK(gpu_cmd_new(dev, &cmd));
  struct gpu_buffer *b;
  KT_ASSERT_OK(gpu_buffer_new(dev, 4096, GPU_MEM_DEVICE, "b", &b));
  struct gpu_binding bind[3] = {{b, 0, 0}, {b, 0, 0}, {b, 0, 0}};
  struct pc_vec_add pc = {.n = 16};
  /* A refused dispatch poisons the recording: submitting it is that error, not a partial step. */
  KT_ASSERT_OK(gpu_cmd_begin(cmd));
  KT_CHECK_EQ(gpu_cmd_dispatch(cmd, pipe, bind, 3, &pc, 4, c->max_wg_count[0] + 1u, 1, 1, NULL),
              KVD_E_LIMIT);
  KT_CHECK_EQ(gpu_cmd_submit(cmd), KVD_E_LIMIT);
  KT_ASSERT_OK(gpu_cmd_begin(cmd));
  KT_CHECK_EQ(gpu_cmd_dispatch(cmd, pipe, bind, 2, &pc, 4, 1, 1, 1, NULL), KVD_EINVAL);
  KT_CHECK_EQ(gpu_cmd_submit(cmd), KVD_EINVAL);
  struct gpu_binding bad[3] = {{b, 0, 0}, {b, 0, 8192}, {b, 0, 0}};
  KT_ASSERT_OK(gpu_cmd_begin(cmd));
  KT_CHECK_EQ(gpu_cmd_dispatch(cmd, pipe, bad, 3, &pc, 4, 1, 1, 1, NULL), KVD_ERANGE);
  KT_CHECK_EQ(gpu_cmd_submit(cmd), KVD_ERANGE);
  KT_ASSERT_OK(gpu_cmd_begin(cmd));
  KT_CHECK_EQ(gpu_cmd_copy(cmd, b, 4000, b, 0, 100), KVD_ERANGE);
  KT_CHECK_EQ(gpu_cmd_submit(cmd), KVD_ERANGE);
  KT_ASSERT_OK(gpu_cmd_begin(cmd));
  KT_CHECK_EQ(gpu_cmd_fill(cmd, b, 2, 8, 0), KVD_EINVAL);
  KT_CHECK_EQ(gpu_cmd_submit(cmd), KVD_EINVAL);
  /* Outside a recording nothing records, and the next begin starts clean. */
  KT_CHECK_EQ(gpu_cmd_dispatch(cmd, pipe, bind, 3, &pc, 4, 1, 1, 1, NULL), KVD_EINVAL);
  KT_CHECK_EQ(gpu_cmd_submit(cmd), KVD_EINVAL);
  struct gpu_pipeline *none;
  KT_CHECK_EQ(gpu_pipeline_new(dev, &(struct gpu_pipeline_desc){.shader = "no_such_shader"}, &none),
              KVD_ENOENT);
  struct gpu_pipeline_desc huge = d;
  huge.spec[0] = c->max_wg_invocations + 1;
  huge.local_size[0] = c->max_wg_invocations + 1;
  KT_CHECK_EQ(gpu_pipeline_new(dev, &huge, &none), KVD_E_LIMIT);
  gpu_buffer_free(b);
  gpu_cmd_free(cmd);
  gpu_pipeline_free(pipe);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(many_dispatches_in_one_submission_with_barriers) {
  FIXTURE_DEVICE(dev);
  /* x_{i+1} = x_i + b, 600 times in one command buffer: needs a barrier between each dispatch
   * and more descriptor sets than one pool holds. */
  enum { N = 1000, STEPS = 600 };
  float *x = malloc(N * 4), *b = malloc(N * 4), *out = malloc(N * 4);
  KT_ASSERT(x && b && out);
  for (int i = 0; i < N; i++) {
    x[i] = (float)i;
    b[i] = 1.0f;
  }
  struct gpu_pipeline_desc d = {.shader = "vec_add",
                                .n_buffers = 3,
                                .push_size = sizeof(struct pc_vec_add),
                                .n_spec = 1,
                                .spec = {64},
                                .local_size = {64, 1, 1}};
  struct gpu_pipeline *pipe;
  struct gpu_cmd *cmd;
  struct gpu_buffer *bx[2], *bb;
  KT_ASSERT_OK(gpu_pipeline_new(dev, &d, &pipe));
  KT_ASSERT_OK(gpu_cmd_new(dev, &cmd));
  KT_ASSERT_OK(upload_new(dev, x, N, &bx[0]));
  KT_ASSERT_OK(upload_new(dev, NULL, N, &bx[1]));
  KT_ASSERT_OK(upload_new(dev, b, N, &bb));
  KT_ASSERT_OK(gpu_cmd_begin(cmd));
  struct pc_vec_add pc = {.n = N};
  for (int s = 0; s < STEPS; s++) {
    struct gpu_binding bind[3] = {{bx[s % 2], 0, 0}, {bb, 0, 0}, {bx[(s + 1) % 2], 0, 0}};
    KT_ASSERT_OK(gpu_cmd_dispatch(cmd, pipe, bind, 3, &pc, 4, (N + 63) / 64, 1, 1, "step"));
    gpu_cmd_barrier(cmd);
  }
  KT_ASSERT_OK(gpu_cmd_submit(cmd));
  KT_ASSERT_OK(gpu_cmd_wait(cmd));
  KT_ASSERT_OK(gpu_buffer_download(dev, bx[STEPS % 2], 0, out, N * 4));
  bool ok = true;
  for (int i = 0; i < N; i++)
    ok = ok && out[i] == (float)(i + STEPS);
  KT_CHECK(ok);
  const struct gpu_timing *t;
  uint32_t nt = gpu_cmd_timings(cmd, &t);
  if (gpu_device_caps(dev)->timestamps) {
    KT_CHECK_EQ(nt, STEPS);
    KT_CHECK(nt == 0 || strcmp(t[0].label, "step") == 0);
  }
  gpu_buffer_free(bx[0]);
  gpu_buffer_free(bx[1]);
  gpu_buffer_free(bb);
  gpu_cmd_free(cmd);
  gpu_pipeline_free(pipe);
  free(x);
  free(b);
  free(out);
  FIXTURE_CHECK_VALIDATION();
}

/* Errors stick in the gpu_cmd (gpu.h): after the first refusal every record call is a no-op that
 * returns that first error, the submit returns it and runs nothing, and the next begin starts a
 * clean recording that runs normally. */
KT_TEST(recording_errors_are_sticky) {
  FIXTURE_DEVICE(dev);
  enum { N = 256 };
  float x[N], one[N], out[N];
  for (int i = 0; i < N; i++) {
    x[i] = (float)i;
    one[i] = 1.0f;
  }
  struct gpu_pipeline_desc d = {.shader = "vec_add",
                                .n_buffers = 3,
                                .push_size = sizeof(struct pc_vec_add),
                                .n_spec = 1,
                                .spec = {64},
                                .local_size = {64, 1, 1}};
  struct gpu_pipeline *pipe;
  struct gpu_cmd *cmd;
  struct gpu_buffer *bx, *bb, *by;
  KT_ASSERT_OK(gpu_pipeline_new(dev, &d, &pipe));
  KT_ASSERT_OK(gpu_cmd_new(dev, &cmd));
  KT_ASSERT_OK(upload_new(dev, x, N, &bx));
  KT_ASSERT_OK(upload_new(dev, one, N, &bb));
  KT_ASSERT_OK(upload_new(dev, x, N, &by)); /* y starts as a copy of x */
  struct gpu_binding bind[3] = {{bx, 0, 0}, {bb, 0, 0}, {by, 0, 0}};
  struct pc_vec_add pc = {.n = N};

  KT_ASSERT_OK(gpu_cmd_begin(cmd));
  KT_CHECK_EQ(gpu_cmd_error(cmd), 0);
  KT_CHECK_EQ(gpu_cmd_dispatch(cmd, pipe, bind, 2, &pc, 4, 1, 1, 1, "bad"), KVD_EINVAL);
  KT_CHECK_EQ(gpu_cmd_error(cmd), KVD_EINVAL);
  /* A valid dispatch, a barrier, a fill and a different refusal: all no-ops, all the first error.
   */
  KT_CHECK_EQ(gpu_cmd_dispatch(cmd, pipe, bind, 3, &pc, 4, N / 64, 1, 1, "good"), KVD_EINVAL);
  gpu_cmd_barrier(cmd);
  KT_CHECK_EQ(gpu_cmd_fill(cmd, by, 0, N * 4, 0), KVD_EINVAL);
  KT_CHECK_EQ(gpu_cmd_copy(cmd, bx, 0, by, 0, 1u << 20), KVD_EINVAL);
  KT_CHECK_EQ(gpu_cmd_fail(cmd, KVD_E_LIMIT), KVD_EINVAL);
  KT_CHECK_EQ(gpu_cmd_fail(cmd, 0), 0);
  KT_CHECK_EQ(gpu_cmd_submit(cmd), KVD_EINVAL);
  KT_CHECK_EQ(gpu_cmd_wait(cmd), KVD_EINVAL); /* nothing was submitted */
  KT_ASSERT_OK(gpu_buffer_download(dev, by, 0, out, sizeof out));
  bool untouched = true;
  for (int i = 0; i < N; i++)
    untouched = untouched && out[i] == x[i];
  KT_CHECK_MSG(untouched, "a record call after the first error reached the device");

  /* gpu_cmd_fail poisons a recording the same way (recorders that refuse before dispatching). */
  KT_ASSERT_OK(gpu_cmd_begin(cmd));
  KT_CHECK_EQ(gpu_cmd_fail(cmd, KVD_E_LIMIT), KVD_E_LIMIT);
  KT_CHECK_EQ(gpu_cmd_dispatch(cmd, pipe, bind, 3, &pc, 4, N / 64, 1, 1, "good"), KVD_E_LIMIT);
  KT_CHECK_EQ(gpu_cmd_submit(cmd), KVD_E_LIMIT);

  /* A clean recording after a failed one runs. */
  KT_ASSERT_OK(gpu_cmd_begin(cmd));
  KT_CHECK_EQ(gpu_cmd_error(cmd), 0);
  KT_ASSERT_OK(gpu_cmd_dispatch(cmd, pipe, bind, 3, &pc, 4, N / 64, 1, 1, "good"));
  KT_ASSERT_OK(gpu_cmd_submit(cmd));
  KT_ASSERT_OK(gpu_cmd_wait(cmd));
  KT_ASSERT_OK(gpu_buffer_download(dev, by, 0, out, sizeof out));
  bool added = true;
  for (int i = 0; i < N; i++)
    added = added && out[i] == x[i] + 1.0f;
  KT_CHECK(added);
  gpu_buffer_free(bx);
  gpu_buffer_free(bb);
  gpu_buffer_free(by);
  gpu_cmd_free(cmd);
  gpu_pipeline_free(pipe);
  FIXTURE_CHECK_VALIDATION();
}

/* The foundation kernels are test-only: they live in kvd_test_shaders, not in the daemon's
 * registry (tests/unit/test_daemon_shaders.py checks the kvd binary itself). */
KT_TEST(test_only_shaders_are_not_in_the_daemon_registry) {
  KT_CHECK(test_shader_spirv_count >= 4);
  for (size_t i = 0; i < test_shader_spirv_count; i++) {
    const struct shader_spirv *t = test_shader_spirv_at(i);
    KT_ASSERT(t && t->code && t->size);
    KT_CHECK_MSG(shader_spirv_find(t->name) == NULL, "%s is in the daemon's registry", t->name);
  }
  KT_CHECK(test_shader_spirv_find("vec_add") != NULL);
  KT_CHECK(test_shader_spirv_find("rmsnorm") == NULL);
  KT_CHECK(shader_spirv_find("rmsnorm") != NULL);
}
