/* Attention kernels alone, side by side on the same cache: a prompt of P tokens of one sequence
 * through the query-tiled kernel (attn_tile) and through the paged kernel (one workgroup per
 * token and head, as prefill ran before it), and one decode token at position P through the
 * paged kernel with its KV splits, for every KV type. Prints milliseconds (GPU timestamps when
 * the device has them) and prompt tokens/s. A benchmark: it asserts nothing about speed.
 * Usage: bench_attn [P] [n_head] [n_head_kv] [head_dim] [iterations] */
#include "attn.h"
#include "bench_util.h"
#include "kv_format.h"
#include "kvd_error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { BLOCK = 16 };

struct bench {
  struct gpu_device *dev;
  struct gpu_cmd *cmd;
  uint32_t P, n_head, n_head_kv, hd;
  struct gpu_buffer *q, *out, *info, *tables, *tiles, *partial, *k, *v;
};

static struct gpu_buffer *upload(struct gpu_device *dev, const void *data, uint64_t bytes) {
  struct gpu_buffer *b = NULL;
  if (gpu_buffer_new(dev, bytes ? bytes : 4, GPU_MEM_DEVICE, "bench", &b) < 0) return NULL;
  if (data && gpu_buffer_upload(dev, b, 0, data, bytes) < 0) {
    gpu_buffer_free(b);
    return NULL;
  }
  return b;
}

/* Best of `iters` submissions of one recorded attention, in seconds. */
static double time_attn(struct bench *B, const struct attn_kernels *a, const struct attn_shape *s,
                        int iters) {
  double best = 1e30;
  for (int i = 0; i <= iters; i++) {
    double t0 = bench_now();
    int rc = gpu_cmd_begin(B->cmd);
    if (rc == 0)
      rc = attn_record(a, B->cmd, s, (struct gpu_binding){B->q, 0, 0},
                       (struct gpu_binding){B->k, 0, 0}, (struct gpu_binding){B->v, 0, 0},
                       (struct gpu_binding){B->info, 0, 0}, (struct gpu_binding){B->tables, 0, 0},
                       (struct gpu_binding){B->out, 0, 0}, (struct gpu_binding){B->partial, 0, 0},
                       (struct gpu_binding){B->tiles, 0, 0});
    int rc2 = gpu_cmd_submit(B->cmd);
    if (rc == 0) rc = rc2;
    if (rc == 0) rc = gpu_cmd_wait(B->cmd);
    if (rc < 0) {
      fprintf(stderr, "attention: %s\n", kvd_strerror(rc));
      return -1;
    }
    double t = bench_now() - t0;
    const struct gpu_timing *tm;
    uint32_t n = gpu_cmd_timings(B->cmd, &tm);
    if (n > 0) {
      uint64_t ns = 0;
      for (uint32_t j = 0; j < n; j++)
        ns += tm[j].ns;
      if (ns > 0) t = ns * 1e-9;
    }
    if (i > 0 && t < best) best = t;
  }
  return best;
}

static int bench_type(struct bench *B, enum kv_type kt, int iters) {
  uint32_t rw;
  if (kv_row_words(kt, B->hd, &rw) < 0) return 0;
  struct attn_kernels a;
  int rc = attn_init(&a, B->dev, kt, B->hd);
  if (rc < 0) return rc;
  uint32_t n_blocks = (B->P + BLOCK) / BLOCK;
  uint64_t rows = (uint64_t)n_blocks * BLOCK * B->n_head_kv;
  uint32_t *cache = malloc(rows * rw * 4);
  float *x = malloc(B->hd * sizeof *x);
  if (!cache || !x) {
    free(cache), free(x), attn_destroy(&a);
    return KVD_ENOMEM;
  }
  for (uint64_t r = 0; r < rows; r++) {
    for (uint32_t d = 0; d < B->hd; d++)
      x[d] = (float)((r * 2654435761u + d * 40503u) % 2001) / 1000.0f - 1.0f;
    kv_encode_row(kt, x, B->hd, cache + r * rw);
  }
  B->k = upload(B->dev, cache, rows * rw * 4);
  B->v = upload(B->dev, cache, rows * rw * 4);
  free(cache), free(x);
  /* The prompt's tiles for this kernel's tile size. */
  uint32_t tt = attn_tile_tokens(&a, B->n_head, B->n_head_kv), n_tiles = 0;
  uint32_t *tiles = malloc(((size_t)B->P / tt + 1) * 8);
  for (uint32_t t = 0; tiles && t < B->P; t += tt, n_tiles++) {
    tiles[2 * n_tiles] = t;
    tiles[2 * n_tiles + 1] = B->P - t < tt ? B->P - t : tt;
  }
  B->tiles = tiles ? upload(B->dev, tiles, (uint64_t)n_tiles * 8) : NULL;
  free(tiles);
  if (!B->k || !B->v || !B->tiles) rc = KVD_ENOMEM;
  struct attn_shape s = {.n_tokens = B->P,
                         .n_head = B->n_head,
                         .n_head_kv = B->n_head_kv,
                         .head_dim = B->hd,
                         .block_size = BLOCK,
                         .q_stride = B->n_head * B->hd,
                         .n_splits = 1,
                         .max_kv = B->P};
  double paged = -1, tiled = -1, decode = -1;
  if (rc == 0) paged = time_attn(B, &a, &s, iters);
  s.n_tiles = n_tiles;
  if (rc == 0) tiled = time_attn(B, &a, &s, iters);
  /* Decode: the last token alone (tok_info row P-1 holds n_kv = P), split as the engine would.
   * The paged kernel reads tok_info[0] for token 0, so bind the last row. */
  struct attn_shape d = s;
  d.n_tiles = 0;
  d.n_tokens = 1;
  d.n_splits = attn_pick_splits(&a, B->P, B->n_head);
  struct gpu_buffer *info_all = B->info;
  uint32_t last[2] = {B->P, 0};
  B->info = upload(B->dev, last, sizeof last);
  if (rc == 0 && B->info) decode = time_attn(B, &a, &d, iters);
  gpu_buffer_free(B->info);
  B->info = info_all;
  printf("| %s | %u | %.2f | %.2f | %.1fx | %.0f | %.3f (%u splits) |\n", kv_type_name(kt),
         attn_tile_tokens(&a, B->n_head, B->n_head_kv) * attn_tile_heads(&a, B->n_head, B->n_head_kv),
         paged * 1e3, tiled * 1e3, paged / tiled, B->P / tiled, decode * 1e3, d.n_splits);
  gpu_buffer_free(B->k), gpu_buffer_free(B->v), gpu_buffer_free(B->tiles);
  B->k = B->v = B->tiles = NULL;
  attn_destroy(&a);
  return rc;
}

int main(int argc, char **argv) {
  struct bench B = {0};
  B.P = argc > 1 ? (uint32_t)atoi(argv[1]) : 512;
  B.n_head = argc > 2 ? (uint32_t)atoi(argv[2]) : 8;
  B.n_head_kv = argc > 3 ? (uint32_t)atoi(argv[3]) : 2;
  B.hd = argc > 4 ? (uint32_t)atoi(argv[4]) : 64;
  int iters = argc > 5 ? atoi(argv[5]) : 3;
  if (B.P < 1 || B.P > 65535 || B.n_head_kv < 1 || B.n_head % B.n_head_kv || B.hd < 2 ||
      B.hd > 256 || iters < 1) {
    fprintf(stderr, "usage: bench_attn [P 1..65535] [n_head] [n_head_kv] [head_dim 2..256] "
                    "[iterations]\n");
    return 2;
  }
  struct gpu_instance *inst;
  if (bench_device_open(NULL, &inst, &B.dev) < 0 || gpu_cmd_new(B.dev, &B.cmd) < 0) {
    fprintf(stderr, "no device: %s\n", gpu_error_detail());
    return 1;
  }
  uint32_t n_blocks = (B.P + BLOCK) / BLOCK, qd = B.n_head * B.hd;
  uint32_t *info = malloc((size_t)B.P * 8), *tables = malloc((size_t)n_blocks * 4);
  float *q = malloc((size_t)B.P * qd * 4);
  if (!info || !tables || !q) return 1;
  for (uint32_t t = 0; t < B.P; t++)
    info[2 * t] = t + 1, info[2 * t + 1] = 0;
  for (uint32_t b = 0; b < n_blocks; b++) /* the physical order is not the logical one */
    tables[b] = n_blocks - 1 - b;
  for (size_t i = 0; i < (size_t)B.P * qd; i++)
    q[i] = (float)(i % 977) / 977.0f - 0.5f;
  B.q = upload(B.dev, q, (uint64_t)B.P * qd * 4);
  B.out = upload(B.dev, NULL, (uint64_t)B.P * qd * 4);
  B.info = upload(B.dev, info, (uint64_t)B.P * 8);
  B.tables = upload(B.dev, tables, (uint64_t)n_blocks * 4);
  B.partial = upload(B.dev, NULL, attn_partial_bytes(1, B.n_head, B.hd, 64) + 4);
  free(info), free(tables), free(q);
  printf("attention, a %u-token prompt of one sequence, heads %u/%u of %u, block %u, device %s\n",
         B.P, B.n_head, B.n_head_kv, B.hd, BLOCK, gpu_device_caps(B.dev)->name);
  printf("| KV | rows per tile | prefill paged ms | prefill tiled ms | speed-up | tiled prompt "
         "tok/s | decode @%u ms |\n|---|---|---|---|---|---|---|\n",
         B.P);
  int rc = B.q && B.out && B.info && B.tables && B.partial ? 0 : KVD_ENOMEM;
  for (int t = 0; rc == 0 && t < KV_TYPE_COUNT; t++)
    rc = bench_type(&B, (enum kv_type)t, iters);
  if (rc < 0) fprintf(stderr, "bench_attn: %s\n", kvd_strerror(rc));
  struct gpu_buffer *all[] = {B.q, B.out, B.info, B.tables, B.partial};
  for (int i = 0; i < 5; i++)
    gpu_buffer_free(all[i]);
  gpu_cmd_free(B.cmd);
  gpu_device_free(B.dev);
  gpu_instance_free(inst);
  return rc < 0;
}
