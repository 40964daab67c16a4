/* f32 mat-vec bandwidth: the shader (portable and subgroup variants) against a plain CPU loop on
 * the same data. A benchmark, not a test: it prints numbers for BENCHMARKS.md and asserts nothing
 * about speed. Usage: bench_matvec [rows] [cols] [iterations] */
#include "bench_util.h"
#include "gpu.h"
#include "kvd_error.h"
#include "pc_basic.h"
#include "test_shader_registry.h"

#include <stdio.h>
#include <stdlib.h>

/* The baseline: the loop a C programmer writes first, compiled with the project's flags. */
static void cpu_matvec(const float *w, const float *x, float *y, uint32_t rows, uint32_t cols) {
  for (uint32_t r = 0; r < rows; r++) {
    float acc = 0;
    const float *row = w + (size_t)r * cols;
    for (uint32_t c = 0; c < cols; c++)
      acc += row[c] * x[c];
    y[r] = acc;
  }
}

static int bench_gpu(struct gpu_device *dev, const char *shader, uint32_t wg, struct gpu_buffer *bw,
                     struct gpu_buffer *bx, struct gpu_buffer *by, uint32_t rows, uint32_t cols,
                     int iters) {
  struct gpu_pipeline *pipe;
  struct gpu_cmd *cmd;
  struct gpu_pipeline_desc d = {.shader = shader,
                                .n_buffers = 3,
                                .push_size = sizeof(struct pc_matvec),
                                .n_spec = 1,
                                .spec = {wg},
                                .local_size = {wg, 1, 1}};
  int rc = gpu_pipeline_new(dev, &d, &pipe);
  if (rc < 0) return rc;
  rc = gpu_cmd_new(dev, &cmd);
  if (rc < 0) {
    gpu_pipeline_free(pipe);
    return rc;
  }
  struct pc_matvec pc = {.rows = rows, .cols = cols};
  uint32_t gx, gy;
  gpu_grid_2d(dev, rows, &gx, &gy);
  struct gpu_binding bind[3] = {{bw, 0, 0}, {bx, 0, 0}, {by, 0, 0}};
  double best = 1e30, wall = 0;
  /* One warm-up submission, then `iters` submissions of one dispatch each. */
  for (int i = 0; i <= iters && rc == 0; i++) {
    double t0 = bench_now();
    rc = gpu_cmd_begin(cmd);
    if (rc == 0) rc = gpu_cmd_dispatch(cmd, pipe, bind, 3, &pc, sizeof pc, gx, gy, 1, shader);
    if (rc == 0) rc = gpu_cmd_submit(cmd);
    if (rc == 0) rc = gpu_cmd_wait(cmd);
    double t = bench_now() - t0;
    const struct gpu_timing *tm;
    if (rc == 0 && gpu_cmd_timings(cmd, &tm) == 1 && tm[0].ns > 0) t = tm[0].ns * 1e-9;
    if (i > 0) {
      wall += t;
      if (t < best) best = t;
    }
  }
  if (rc == 0) {
    double bytes = (double)rows * cols * 4;
    printf("  %-16s wg %-4u best %8.3f ms  %7.2f GB/s   mean %8.3f ms\n", shader, wg, best * 1e3,
           bytes / best / 1e9, wall / iters * 1e3);
  }
  gpu_cmd_free(cmd);
  gpu_pipeline_free(pipe);
  return rc;
}

int main(int argc, char **argv) {
  uint32_t rows = argc > 1 ? (uint32_t)atoi(argv[1]) : 4096;
  uint32_t cols = argc > 2 ? (uint32_t)atoi(argv[2]) : 4096;
  int iters = argc > 3 ? atoi(argv[3]) : 10;
  size_t nw = (size_t)rows * cols;
  float *w = malloc(nw * 4), *x = malloc(cols * 4), *y = malloc(rows * 4);
  if (!w || !x || !y) return 1;
  srand(1);
  for (size_t i = 0; i < nw; i++)
    w[i] = (float)rand() / (float)RAND_MAX - 0.5f;
  for (uint32_t i = 0; i < cols; i++)
    x[i] = (float)rand() / (float)RAND_MAX - 0.5f;

  printf("f32 mat-vec %u x %u (%.1f MiB of weights), %d iterations\n", rows, cols,
         (double)nw * 4 / (1 << 20), iters);
  double best = 1e30;
  for (int i = 0; i <= iters; i++) {
    double t0 = bench_now();
    cpu_matvec(w, x, y, rows, cols);
    double t = bench_now() - t0;
    if (i > 0 && t < best) best = t;
  }
  printf("  %-16s         best %8.3f ms  %7.2f GB/s   (y[0]=%g)\n", "cpu loop", best * 1e3,
         (double)nw * 4 / best / 1e9, y[0]);

  struct gpu_instance *inst;
  struct gpu_device *dev;
  int rc = bench_device_open(test_shader_spirv_find, &inst, &dev);
  if (rc < 0) {
    fprintf(stderr, "bench_matvec: %s (%s)\n", kvd_strerror(rc), gpu_error_detail());
    return 1;
  }
  const struct gpu_caps *c = gpu_device_caps(dev);
  printf("  device: %s\n", c->name);
  struct gpu_buffer *bw = NULL, *bx = NULL, *by = NULL;
  rc = gpu_buffer_new(dev, nw * 4, GPU_MEM_DEVICE, "W", &bw);
  if (rc == 0) rc = gpu_buffer_new(dev, cols * 4, GPU_MEM_DEVICE, "x", &bx);
  if (rc == 0) rc = gpu_buffer_new(dev, rows * 4, GPU_MEM_DEVICE, "y", &by);
  if (rc == 0) rc = gpu_buffer_upload(dev, bw, 0, w, nw * 4);
  if (rc == 0) rc = gpu_buffer_upload(dev, bx, 0, x, cols * 4);
  if (rc == 0) rc = bench_gpu(dev, "matvec_f32", 64, bw, bx, by, rows, cols, iters);
  if (rc == 0) rc = bench_gpu(dev, "matvec_f32", 256, bw, bx, by, rows, cols, iters);
  if (rc == 0 && (c->subgroup_ops & GPU_SG_ARITHMETIC)) {
    uint32_t wg = c->subgroup_size > 64 ? c->subgroup_size : 64;
    rc = bench_gpu(dev, "matvec_f32_sg", wg, bw, bx, by, rows, cols, iters);
  }
  if (rc < 0) fprintf(stderr, "bench_matvec: %s (%s)\n", kvd_strerror(rc), gpu_error_detail());
  gpu_buffer_free(bw);
  gpu_buffer_free(bx);
  gpu_buffer_free(by);
  gpu_device_free(dev);
  gpu_instance_free(inst);
  free(w);
  free(x);
  free(y);
  return rc < 0 ? 1 : 0;
}
