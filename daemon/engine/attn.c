#include "attn.h"

#include "kvd_error.h"
#include "pc_attn.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* Shared bytes of attn_tile.comp for tr rows, tk positions, heads of hd values. */
static uint64_t tile_shared_bytes(uint32_t tr, uint32_t tk, uint32_t hd) {
  return 4ull * ((uint64_t)(tr + tk) * (hd + 1) + (uint64_t)tr * tk + 5ull * tr);
}

int attn_init(struct attn_kernels *a, struct gpu_device *dev, enum kv_type kv_type,
              uint32_t head_dim) {
  const struct gpu_caps *c = gpu_device_caps(dev);
  memset(a, 0, sizeof *a);
  if ((unsigned)kv_type >= KV_TYPE_COUNT) return KVD_EINVAL;
  a->kv_type = kv_type;
  char write_name[32], paged_name[32], tile_name[32], shift_name[32];
  snprintf(write_name, sizeof write_name, "kv_write_%s", kv_type_name(kv_type));
  snprintf(paged_name, sizeof paged_name, "attn_paged_%s", kv_type_name(kv_type));
  snprintf(tile_name, sizeof tile_name, "attn_tile_%s", kv_type_name(kv_type));
  snprintf(shift_name, sizeof shift_name, "kv_shift_%s", kv_type_name(kv_type));
  /* 64 invocations: two wavefronts on NVIDIA, one on AMD, eight lavapipe subgroups. */
  a->wg = 64;
  while (a->wg > c->max_wg_invocations)
    a->wg /= 2;
  a->chunk = 256;
  a->max_hd = 256;
  if (head_dim > a->max_hd) return KVD_E_UNSUPPORTED;
  uint32_t tile_hd = head_dim ? head_dim : a->max_hd;
  /* 16 query rows share each K/V tile (a prompt reads its cache 1/16 as often as token by
   * token); the KV tile is the widest of 32, 16, 8 positions that fits the device's shared
   * memory with them (lavapipe's 32 KiB: 32 for heads of 128, 8 for 256). */
  a->tile_rows = 16;
  a->tile_kv = 32;
  while (a->tile_kv > 8 && tile_shared_bytes(a->tile_rows, a->tile_kv, tile_hd) > c->max_shared_bytes)
    a->tile_kv /= 2;
  while (a->tile_rows > 1 && tile_shared_bytes(a->tile_rows, a->tile_kv, tile_hd) > c->max_shared_bytes)
    a->tile_rows /= 2;
  if (tile_shared_bytes(a->tile_rows, a->tile_kv, tile_hd) > c->max_shared_bytes)
    return KVD_E_UNSUPPORTED;
  int rc = gpu_pipeline_new(dev,
                            &(struct gpu_pipeline_desc){.shader = write_name,
                                                        .n_buffers = 5,
                                                        .push_size = sizeof(struct pc_kv_write),
                                                        .n_spec = 1,
                                                        .spec = {a->wg},
                                                        .local_size = {a->wg, 1, 1}},
                            &a->write);
  if (rc == 0)
    rc = gpu_pipeline_new(dev,
                          &(struct gpu_pipeline_desc){.shader = paged_name,
                                                      .n_buffers = 7,
                                                      .push_size = sizeof(struct pc_attn),
                                                      .n_spec = 3,
                                                      .spec = {a->wg, a->chunk, a->max_hd},
                                                      .local_size = {a->wg, 1, 1}},
                          &a->paged);
  if (rc == 0)
    rc = gpu_pipeline_new(dev,
                          &(struct gpu_pipeline_desc){.shader = "attn_merge",
                                                      .n_buffers = 2,
                                                      .push_size = sizeof(struct pc_attn),
                                                      .n_spec = 1,
                                                      .spec = {a->wg},
                                                      .local_size = {a->wg, 1, 1}},
                          &a->merge);
  if (rc == 0)
    rc = gpu_pipeline_new(dev,
                          &(struct gpu_pipeline_desc){.shader = tile_name,
                                                      .n_buffers = 7,
                                                      .push_size = sizeof(struct pc_attn),
                                                      .n_spec = 4,
                                                      .spec = {a->wg, a->tile_rows, a->tile_kv,
                                                               tile_hd},
                                                      .local_size = {a->wg, 1, 1}},
                          &a->tile);
  if (rc == 0)
    rc = gpu_pipeline_new(dev,
                          &(struct gpu_pipeline_desc){.shader = shift_name,
                                                      .n_buffers = 4,
                                                      .push_size = sizeof(struct pc_kv_shift),
                                                      .n_spec = 2,
                                                      .spec = {a->wg, tile_hd},
                                                      .local_size = {a->wg, 1, 1}},
                          &a->shift);
  if (rc == 0) a->max_hd = tile_hd;
  if (rc < 0) attn_destroy(a);
  return rc;
}

void attn_destroy(struct attn_kernels *a) {
  gpu_pipeline_free(a->write);
  gpu_pipeline_free(a->paged);
  gpu_pipeline_free(a->merge);
  gpu_pipeline_free(a->tile);
  gpu_pipeline_free(a->shift);
  memset(a, 0, sizeof *a);
}

uint32_t attn_pick_splits(const struct attn_kernels *a, uint32_t max_kv, uint32_t n_pairs) {
  /* Any split covers any number of positions (online softmax over chunks), so splitting is only
   * for parallelism: with few (token, head) pairs and a long context, cut the KV axis until ~64
   * workgroups run, but never below 32 positions per split, where the merge costs more than it
   * saves. Prefill batches have pairs enough and get one split (no partials memory). */
  uint32_t want = 1;
  while (n_pairs * want < 64 && max_kv / (want * 2) >= 32)
    want *= 2;
  return want;
}

uint32_t attn_tile_heads(const struct attn_kernels *a, uint32_t n_head, uint32_t n_head_kv) {
  /* The whole group when it fits (GQA: one K/V tile serves every head that reads it), else the
   * largest divisor of the group that does. */
  uint32_t g = n_head_kv ? n_head / n_head_kv : 1, th = g < a->tile_rows ? g : a->tile_rows;
  while (th > 1 && g % th)
    th--;
  return th ? th : 1;
}

uint32_t attn_tile_tokens(const struct attn_kernels *a, uint32_t n_head, uint32_t n_head_kv) {
  return a->tile_rows / attn_tile_heads(a, n_head, n_head_kv);
}

uint64_t attn_partial_bytes(uint32_t n_tokens, uint32_t n_head, uint32_t head_dim,
                            uint32_t n_splits) {
  if (n_splits <= 1) return 0;
  return (uint64_t)n_tokens * n_head * n_splits * (head_dim + 2) * sizeof(float);
}

int attn_record_write(const struct attn_kernels *a, struct gpu_cmd *cmd, struct gpu_binding k_new,
                      struct gpu_binding v_new, struct gpu_binding k_cache,
                      struct gpu_binding v_cache, struct gpu_binding slots, uint32_t n_tokens,
                      uint32_t n_head_kv, uint32_t head_dim, uint32_t block_size,
                      uint32_t src_stride) {
  uint32_t row_words;
  int rc = kv_row_words(a->kv_type, head_dim, &row_words);
  if (rc < 0) return gpu_cmd_fail(cmd, rc);
  struct pc_kv_write pc = {.n_tokens = n_tokens,
                           .n_head_kv = n_head_kv,
                           .head_dim = head_dim,
                           .block_size = block_size,
                           .src_stride = src_stride,
                           .row_words = row_words,
                           .group = kv_group(head_dim)};
  /* Invocations: one per value, per f16 pair, or per scale word (two quantization groups). */
  uint64_t per_row = a->kv_type == KV_F32   ? head_dim
                     : a->kv_type == KV_F16 ? head_dim / 2
                                            : (head_dim / kv_group(head_dim) + 1) / 2;
  uint64_t total = (uint64_t)n_tokens * n_head_kv * per_row;
  uint64_t groups = (total + a->wg - 1) / a->wg;
  if (groups > 65535) groups = 65535; /* grid-stride covers the rest */
  struct gpu_binding b[5] = {k_new, v_new, k_cache, v_cache, slots};
  return gpu_cmd_dispatch(cmd, a->write, b, 5, &pc, sizeof pc, (uint32_t)(groups ? groups : 1), 1,
                          1, "kv_write");
}

int attn_record_shift(const struct attn_kernels *a, struct gpu_cmd *cmd, struct gpu_binding k_cache,
                      struct gpu_binding v_cache, struct gpu_binding moves, struct gpu_binding freq,
                      uint32_t n_moves, uint32_t n_rotate, uint32_t n_head_kv, uint32_t head_dim,
                      uint32_t block_size, uint32_t n_rot, bool neox, uint32_t delta) {
  if (n_moves == 0) return 0;
  if (head_dim == 0 || head_dim > a->max_hd || n_rot > head_dim || n_rot % 2 || n_head_kv == 0 ||
      n_head_kv > 65535 || n_rotate > n_moves)
    return gpu_cmd_fail(cmd, KVD_EINVAL);
  uint32_t row_words;
  int rc = kv_row_words(a->kv_type, head_dim, &row_words);
  if (rc < 0) return gpu_cmd_fail(cmd, rc);
  struct pc_kv_shift pc = {.n_moves = n_moves,
                           .n_rotate = n_rotate,
                           .n_head_kv = n_head_kv,
                           .head_dim = head_dim,
                           .block_size = block_size,
                           .row_words = row_words,
                           .group = kv_group(head_dim),
                           .n_rot = n_rot,
                           .mode = neox ? 1u : 0u,
                           .delta = delta};
  struct gpu_binding b[4] = {k_cache, v_cache, moves, freq};
  return gpu_cmd_dispatch(cmd, a->shift, b, 4, &pc, sizeof pc, n_moves < 65535 ? n_moves : 65535,
                          n_head_kv, 1, "kv_shift");
}

int attn_record(const struct attn_kernels *a, struct gpu_cmd *cmd, const struct attn_shape *s,
                struct gpu_binding q, struct gpu_binding k_cache, struct gpu_binding v_cache,
                struct gpu_binding tok_info, struct gpu_binding tables, struct gpu_binding out,
                struct gpu_binding partial, struct gpu_binding tiles) {
  if (s->head_dim > a->max_hd || s->head_dim == 0 || s->n_head_kv == 0 ||
      s->n_head % s->n_head_kv || s->n_splits == 0)
    return gpu_cmd_fail(cmd, KVD_EINVAL);
  uint32_t row_words;
  int rc = kv_row_words(a->kv_type, s->head_dim, &row_words);
  if (rc < 0) return gpu_cmd_fail(cmd, rc);
  /* With a window no token reads more than `window` positions: the splits share those. */
  uint32_t span = s->window && s->max_kv > s->window ? s->window : s->max_kv;
  uint32_t chunk = (span + s->n_splits - 1) / s->n_splits;
  struct pc_attn pc = {
      .n_tokens = s->n_tokens,
      .n_head = s->n_head,
      .n_head_kv = s->n_head_kv,
      .head_dim = s->head_dim,
      .block_size = s->block_size,
      .q_stride = s->q_stride,
      .chunk = chunk ? chunk : 1,
      .n_splits = s->n_splits,
      .scale = s->scale > 0.0f ? s->scale : 1.0f / sqrtf((float)s->head_dim),
      .window = s->window,
      .softcap = s->softcap > 0.0f ? s->softcap : 0.0f,
      .row_words = row_words,
      .group = kv_group(s->head_dim),
      .tile_heads = attn_tile_heads(a, s->n_head, s->n_head_kv),
  };
  if (s->n_tiles > 0) {
    struct gpu_binding b[7] = {q, k_cache, v_cache, tok_info, tables, out, tiles};
    return gpu_cmd_dispatch(cmd, a->tile, b, 7, &pc, sizeof pc, s->n_head / pc.tile_heads,
                            s->n_tiles, 1, "attn_tile");
  }
  /* Without splits the partials binding is unused but must still be a valid buffer. */
  struct gpu_binding b[7] = {
      q, k_cache, v_cache, tok_info, tables, out, s->n_splits > 1 ? partial : out};
  rc = gpu_cmd_dispatch(cmd, a->paged, b, 7, &pc, sizeof pc, s->n_head, s->n_tokens, s->n_splits,
                        "attn_paged");
  if (rc < 0 || s->n_splits == 1) return gpu_cmd_fail(cmd, rc);
  gpu_cmd_barrier(cmd);
  struct gpu_binding m[2] = {partial, out};
  return gpu_cmd_dispatch(cmd, a->merge, m, 2, &pc, sizeof pc, s->n_head, s->n_tokens, 1,
                          "attn_merge");
}
