/* Weight-consuming kernel bandwidth per weight type: mat-vec (1 and 8 tokens, portable and
 * subgroup reductions) and the tiled mat-mul on a rows x cols matrix of each type, against f32.
 * A benchmark, not a test: it prints numbers for BENCHMARKS.md and asserts nothing about speed.
 * GB/s counts the bytes of quantized weights read per call; "x f32" is the speed-up in time over
 * the f32 matrix of the same shape (what keeping weights quantized buys).
 * Usage: bench_wkern [rows] [cols] [iterations] [mm_tokens] [types, e.g. f32,q4_0,q4_K]
 * [mat-mul tile tm,tn,bk] (mm_tokens 0 skips the mat-mul) */
#include "bench_util.h"
#include "gpu.h"
#include "kvd_error.h"
#include "pc_basic.h"
#include "wkern.h"
#include "test_shader_registry.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* CPU time of every thread of the process: on a CPU device (lavapipe) the cost of a kernel that
 * other processes competing for the cores do not inflate, unlike its timestamps. */
static double cpu_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
static bool use_cpu_time;

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
  rng ^= rng >> 12;
  rng ^= rng << 25;
  rng ^= rng >> 27;
  return (uint32_t)((rng * 0x2545F4914F6CDD1Dull) >> 32);
}
static float rndf(void) {
  return (float)rnd() / 4294967296.0f - 0.5f;
}

/* Random weights: floats for plain types, random bytes with small f16 scales for blocks. */
static void fill_weights(enum dtype t, uint8_t *dst, uint32_t rows, uint32_t cols, uint64_t rb) {
  const struct dtype_info *info = dtype_get(t);
  if (info->block_elems == 1) {
    float *row = malloc(cols * sizeof(float));
    for (uint32_t r = 0; r < rows; r++) {
      for (uint32_t c = 0; c < cols; c++)
        row[c] = rndf();
      dtype_quant_row(t, row, dst + (size_t)r * rb, cols);
    }
    free(row);
    return;
  }
  size_t n = (size_t)rows * rb;
  for (size_t i = 0; i < n; i++)
    dst[i] = (uint8_t)rnd();
  size_t scale_at = t == DTYPE_Q6_K ? 208 : 0;
  bool two = t == DTYPE_Q4_1 || t == DTYPE_Q5_1 || t == DTYPE_Q4_K || t == DTYPE_Q5_K;
  for (size_t b = 0; b < n / info->block_bytes; b++) {
    uint8_t *p = dst + b * info->block_bytes + scale_at;
    for (int k = 0; k < (two ? 2 : 1); k++) {
      uint16_t h = dtype_f32_to_f16(rndf() * 0.01f);
      p[2 * k] = (uint8_t)h;
      p[2 * k + 1] = (uint8_t)(h >> 8);
    }
  }
}

/* Best GPU time (timestamps, else wall) of `iters` submissions of one recorded op. */
static double time_op(struct gpu_device *dev, const struct wkern *k, bool matmul,
                      const struct wkern_matrix *w, const struct wkern_act *x,
                      const struct wkern_act *y, uint32_t n_tokens, int iters, int *ret_rc) {
  struct gpu_cmd *cmd = NULL;
  int rc = gpu_cmd_new(dev, &cmd);
  double best = 1e30;
  for (int i = 0; i <= iters && rc == 0; i++) {
    double t0 = bench_now(), c0 = cpu_s();
    rc = gpu_cmd_begin(cmd);
    if (rc == 0)
      rc = matmul ? wkern_matmul(k, cmd, w, x, y, n_tokens, false)
                  : wkern_matvec(k, cmd, w, x, y, n_tokens, false);
    if (rc == 0) rc = gpu_cmd_submit(cmd);
    if (rc == 0) rc = gpu_cmd_wait(cmd);
    double t = bench_now() - t0;
    const struct gpu_timing *tm;
    uint32_t n = rc == 0 ? gpu_cmd_timings(cmd, &tm) : 0;
    if (use_cpu_time) {
      t = cpu_s() - c0;
    } else if (n > 0 && tm[0].ns > 0) {
      t = 0;
      for (uint32_t j = 0; j < n; j++)
        t += tm[j].ns * 1e-9;
    }
    if (i > 0 && t < best) best = t; /* the first run warms caches and pipelines */
  }
  gpu_cmd_free(cmd);
  *ret_rc = rc;
  return best;
}

/* The foundation f32 mat-vec (matvec_f32[_sg], plain (rows, cols) interface) on the same f32
 * matrix: the baseline the weight kernels' f32 variant should match. */
static double time_foundation(struct gpu_device *dev, bool sg, struct gpu_buffer *bw,
                              struct gpu_buffer *bx, struct gpu_buffer *by, uint32_t rows,
                              uint32_t cols, int iters, int *ret_rc) {
  const struct gpu_caps *c = gpu_device_caps(dev);
  uint32_t wg = sg && c->subgroup_size > 64 ? c->subgroup_size : 64;
  struct gpu_pipeline_desc d = {.shader = sg ? "matvec_f32_sg" : "matvec_f32",
                                .n_buffers = 3,
                                .push_size = sizeof(struct pc_matvec),
                                .n_spec = 1,
                                .spec = {wg},
                                .local_size = {wg, 1, 1}};
  struct gpu_pipeline *pipe = NULL;
  struct gpu_cmd *cmd = NULL;
  int rc = gpu_pipeline_new(dev, &d, &pipe);
  if (rc == 0) rc = gpu_cmd_new(dev, &cmd);
  struct pc_matvec pc = {.rows = rows, .cols = cols};
  uint32_t gx, gy;
  gpu_grid_2d(dev, rows, &gx, &gy);
  struct gpu_binding bind[3] = {{bw, 0, 0}, {bx, 0, 0}, {by, 0, 0}};
  double best = 1e30;
  for (int i = 0; i <= iters && rc == 0; i++) {
    double t0 = bench_now(), c0 = cpu_s();
    rc = gpu_cmd_begin(cmd);
    if (rc == 0) rc = gpu_cmd_dispatch(cmd, pipe, bind, 3, &pc, sizeof pc, gx, gy, 1, d.shader);
    if (rc == 0) rc = gpu_cmd_submit(cmd);
    if (rc == 0) rc = gpu_cmd_wait(cmd);
    double t = bench_now() - t0;
    const struct gpu_timing *tm;
    if (use_cpu_time)
      t = cpu_s() - c0;
    else if (rc == 0 && gpu_cmd_timings(cmd, &tm) == 1 && tm[0].ns > 0)
      t = tm[0].ns * 1e-9;
    if (i > 0 && t < best) best = t;
  }
  gpu_cmd_free(cmd);
  gpu_pipeline_free(pipe);
  *ret_rc = rc;
  return best;
}

int main(int argc, char **argv) {
  uint32_t rows = argc > 1 ? (uint32_t)atoi(argv[1]) : 4096;
  uint32_t cols = argc > 2 ? (uint32_t)atoi(argv[2]) : 4096;
  int iters = argc > 3 ? atoi(argv[3]) : 5;
  uint32_t mm_tokens = argc > 4 ? (uint32_t)atoi(argv[4]) : 64;
  const char *only = argc > 5 ? argv[5] : NULL;
  struct wkern_opts mm_opts = {0};
  if (argc > 6 &&
      sscanf(argv[6], "%u,%u,%u", &mm_opts.mm_tm, &mm_opts.mm_tn, &mm_opts.mm_bk) != 3) {
    fprintf(stderr, "bench_wkern: tile is tm,tn,bk\n");
    return 1;
  }
  if (cols % 256 || rows == 0 || iters < 1) {
    fprintf(stderr, "bench_wkern: cols must be a multiple of 256\n");
    return 1;
  }
  struct gpu_instance *inst;
  struct gpu_device *dev;
  int rc = bench_device_open(test_shader_spirv_find, &inst, &dev);
  if (rc < 0) {
    fprintf(stderr, "bench_wkern: %s (%s)\n", kvd_strerror(rc), gpu_error_detail());
    return 1;
  }
  const struct gpu_caps *c = gpu_device_caps(dev);
  use_cpu_time = c->type == GPU_TYPE_CPU;
  bool sg = (c->subgroup_ops & GPU_SG_ARITHMETIC) != 0;
  printf("weight kernels, %u x %u matrix, best of %d; device: %s; times: %s\n", rows, cols, iters,
         c->name, use_cpu_time ? "process CPU time (a CPU device)" : "GPU timestamps");
  printf("%-6s %9s | %-22s | %-22s | %-22s | %s\n", "type", "MiB", "matvec 1 tok (portable)",
         sg ? "matvec 1 tok (subgroup)" : "-", "matvec 8 tok", "matmul");

  static const enum dtype types[] = {DTYPE_F32,  DTYPE_F16,  DTYPE_BF16, DTYPE_Q8_0,
                                     DTYPE_Q4_0, DTYPE_Q4_1, DTYPE_Q5_0, DTYPE_Q5_1,
                                     DTYPE_Q4_K, DTYPE_Q5_K, DTYPE_Q6_K};
  uint32_t max_tok = mm_tokens > 8 ? mm_tokens : 8;
  struct gpu_buffer *bx = NULL, *by = NULL;
  rc = gpu_buffer_new(dev, (uint64_t)max_tok * cols * 4, GPU_MEM_DEVICE, "x", &bx);
  if (rc == 0) rc = gpu_buffer_new(dev, (uint64_t)max_tok * rows * 4, GPU_MEM_DEVICE, "y", &by);
  float *xh = malloc((size_t)max_tok * cols * 4);
  for (size_t i = 0; xh && i < (size_t)max_tok * cols; i++)
    xh[i] = rndf();
  if (rc == 0)
    rc = xh ? gpu_buffer_upload(dev, bx, 0, xh, (uint64_t)max_tok * cols * 4) : KVD_ENOMEM;
  free(xh);
  double f32_t[4] = {0};
  for (size_t ti = 0; rc == 0 && ti < sizeof types / sizeof types[0]; ti++) {
    enum dtype t = types[ti];
    /* f32 always runs: it is the baseline of the "x f32" columns */
    if (only && t != DTYPE_F32 && !strstr(only, dtype_name(t))) continue;
    uint64_t rb, bytes;
    rc = dtype_row_bytes(t, cols, &rb);
    if (rc == 0) rc = wkern_weight_bytes(t, rows, cols, &bytes);
    if (rc < 0) break;
    if (bytes > c->max_storage_range) {
      printf("%-6s skipped: %.1f MiB > maxStorageBufferRange\n", dtype_name(t),
             (double)bytes / (1 << 20));
      continue;
    }
    uint8_t *wh = malloc(bytes);
    if (!wh) {
      rc = KVD_ENOMEM;
      break;
    }
    memset(wh, 0, bytes);
    fill_weights(t, wh, rows, cols, rb);
    struct gpu_buffer *bw = NULL;
    rc = gpu_buffer_new(dev, bytes, GPU_MEM_DEVICE, "W", &bw);
    if (rc == 0) rc = gpu_buffer_upload(dev, bw, 0, wh, bytes);
    free(wh);
    struct wkern kp = {0}, ks = {0};
    struct wkern_opts op = mm_opts, os = mm_opts;
    op.subgroup = -1;
    os.subgroup = 1;
    if (rc == 0) rc = wkern_init(&kp, dev, t, &op);
    if (rc == 0 && sg) rc = wkern_init(&ks, dev, t, &os);
    struct wkern_matrix w = {bw, 0, rows, cols};
    struct wkern_act x = {bx, 0, cols}, y = {by, 0, rows};
    double tm[4] = {0};
    if (rc == 0) tm[0] = time_op(dev, &kp, false, &w, &x, &y, 1, iters, &rc);
    if (rc == 0 && sg) tm[1] = time_op(dev, &ks, false, &w, &x, &y, 1, iters, &rc);
    const struct wkern *kb = sg ? &ks : &kp;
    if (rc == 0) tm[2] = time_op(dev, kb, false, &w, &x, &y, 8, iters, &rc);
    if (rc == 0 && mm_tokens)
      tm[3] = time_op(dev, kb, true, &w, &x, &y, mm_tokens, iters > 2 ? 2 : iters, &rc);
    if (rc == 0 && t == DTYPE_F32) {
      double fp = time_foundation(dev, false, bw, bx, by, rows, cols, iters, &rc);
      double fs =
          rc == 0 && sg ? time_foundation(dev, true, bw, bx, by, rows, cols, iters, &rc) : 0;
      if (rc == 0) {
        printf("%-6s %9.1f | %6.2f ms %5.2f GB/s       | ", "f32*", (double)bytes / (1 << 20),
               fp * 1e3, (double)bytes / fp / 1e9);
        if (fs > 0) printf("%6.2f ms %5.2f GB/s", fs * 1e3, (double)bytes / fs / 1e9);
        printf("  (* foundation matvec_f32%s)\n", fs > 0 ? " / matvec_f32_sg" : "");
      }
    }
    if (rc == 0) {
      if (t == DTYPE_F32) memcpy(f32_t, tm, sizeof tm);
      printf("%-6s %9.1f", dtype_name(t), (double)bytes / (1 << 20));
      for (int i = 0; i < 3; i++) {
        if (tm[i] <= 0) {
          printf(" | %-22s", "-");
          continue;
        }
        printf(" | %6.2f ms %5.2f GB/s %4.1fx", tm[i] * 1e3, (double)bytes / tm[i] / 1e9,
               f32_t[i] / tm[i]);
      }
      double flops = 2.0 * rows * cols * mm_tokens;
      if (!mm_tokens)
        printf("\n");
      else
        printf(" | %u tok %7.1f ms %6.1f GFLOP/s %4.1fx (tile %ux%u, bk %u)\n", mm_tokens,
               tm[3] * 1e3, flops / tm[3] / 1e9, f32_t[3] / tm[3], 16 * kb->mm_tm, 16 * kb->mm_tn,
               kb->mm_bk);
    }
    wkern_destroy(&kp);
    wkern_destroy(&ks);
    gpu_buffer_free(bw);
  }
  if (rc < 0) fprintf(stderr, "bench_wkern: %s (%s)\n", kvd_strerror(rc), gpu_error_detail());
  gpu_buffer_free(bx);
  gpu_buffer_free(by);
  gpu_device_free(dev);
  gpu_instance_free(inst);
  return rc < 0 ? 1 : 0;
}
