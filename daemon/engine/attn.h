/* Recorders for the paged-attention kernels and the KV write (shaders/attn_paged.comp,
 * attn_merge.comp, attn_tile.comp, kv_write.comp; cache layout and tok_info in shaders/common/pc_attn.h).
 * A refused shape is stored in the gpu_cmd like a refused dispatch (gpu_cmd_fail(), gpu.h). */
#ifndef KVD_MODEL_ATTN_H
#define KVD_MODEL_ATTN_H

#include "gpu.h"
#include "kv_format.h"

#include <stdint.h>

struct attn_kernels {
  enum kv_type kv_type; /* how the cache rows the kernels read and write are stored */
  struct gpu_pipeline *write;
  struct gpu_pipeline *paged;
  struct gpu_pipeline *merge;
  struct gpu_pipeline *tile; /* query-tiled prefill (attn_tile.comp) */
  struct gpu_pipeline *shift; /* context shift: rows moved, keys rotated back (kv_shift.comp) */
  uint32_t wg;     /* invocations per workgroup (a power of two) */
  uint32_t chunk;  /* KV positions a split scores at once (shared memory), not a length limit */
  uint32_t max_hd; /* largest head_dim the kernels accept */
  uint32_t tile_rows, tile_kv; /* attn_tile: query rows per workgroup, KV positions per tile */
};

/* The kernels for caches of kv_type (kv_format.h) and heads of up to head_dim values (0: the
 * paged kernels' 256); the tiled kernel's shared memory is sized for head_dim and the device. */
int attn_init(struct attn_kernels *a, struct gpu_device *dev, enum kv_type kv_type,
              uint32_t head_dim);
void attn_destroy(struct attn_kernels *a);

/* How many KV splits to use for a longest KV length of max_kv, given how many (token, head) pairs
 * already keep the device busy: 1 for batches, more for few pairs and long contexts, so one long
 * sequence still spreads over the device. */
uint32_t attn_pick_splits(const struct attn_kernels *a, uint32_t max_kv, uint32_t n_pairs);
/* The query-tiled kernel: how many query heads of a KV head's group one workgroup computes, and
 * how many consecutive tokens of one sequence a tile holds (tokens x heads <= tile_rows). */
uint32_t attn_tile_heads(const struct attn_kernels *a, uint32_t n_head, uint32_t n_head_kv);
uint32_t attn_tile_tokens(const struct attn_kernels *a, uint32_t n_head, uint32_t n_head_kv);

/* Bytes of the partials scratch buffer for a dispatch (0 when n_splits == 1). */
uint64_t attn_partial_bytes(uint32_t n_tokens, uint32_t n_head, uint32_t head_dim,
                            uint32_t n_splits);

/* K and V rows (n_tokens, n_head_kv * head_dim f32, rows src_stride floats apart) into the slots
 * slots[t] = block * block_size + offset, stored in the kernels' KV type (quantized as they go).
 * A head_dim the type cannot store is refused (KVD_E_UNSUPPORTED in the gpu_cmd). */
int attn_record_write(const struct attn_kernels *a, struct gpu_cmd *cmd, struct gpu_binding k_new,
                      struct gpu_binding v_new, struct gpu_binding k_cache,
                      struct gpu_binding v_cache, struct gpu_binding slots, uint32_t n_tokens,
                      uint32_t n_head_kv, uint32_t head_dim, uint32_t block_size,
                      uint32_t src_stride);

/* Context shift in one layer (kv.h struct kv_shift): for the moves (src, dst slot pairs, uvec2)
 * [0, n_rotate) the key row is rotated back by delta positions with the layer's RoPE frequency
 * table (ops_rope_freq()) and n_rot/mode, values copied; moves [n_rotate, n_moves) are copied. */
int attn_record_shift(const struct attn_kernels *a, struct gpu_cmd *cmd, struct gpu_binding k_cache,
                      struct gpu_binding v_cache, struct gpu_binding moves, struct gpu_binding freq,
                      uint32_t n_moves, uint32_t n_rotate, uint32_t n_head_kv, uint32_t head_dim,
                      uint32_t block_size, uint32_t n_rot, bool neox, uint32_t delta);

struct attn_shape {
  uint32_t n_tokens;
  uint32_t n_head;
  uint32_t n_head_kv;
  uint32_t head_dim;
  uint32_t block_size;
  uint32_t q_stride; /* floats between tokens in q and out */
  uint32_t n_splits; /* from attn_pick_splits() */
  uint32_t max_kv;   /* the longest tok_info n_kv in this dispatch */
  float scale;       /* q.k multiplier; 0 = 1 / sqrt(head_dim) */
  uint32_t window;   /* sliding window (0 = none): a token reads its last `window` positions */
  float softcap;     /* score soft-capping (0 = none) */
  uint32_t n_tiles;  /* > 0: the query-tiled kernel over `tiles` (pc_attn.h), no splits */
};

/* out = attention(q) over each token's paged KV. With n_tiles > 0 the tiled kernel reads
 * tiles[0 .. n_tiles) (each at most attn_tile_tokens() tokens of one sequence, covering every
 * token once); otherwise the paged kernel, with n_splits > 1 also the merge (after a barrier).
 * `partial` must hold attn_partial_bytes() bytes (ignored when n_splits == 1); `tiles` is
 * ignored when n_tiles == 0. */
int attn_record(const struct attn_kernels *a, struct gpu_cmd *cmd, const struct attn_shape *s,
                struct gpu_binding q, struct gpu_binding k_cache, struct gpu_binding v_cache,
                struct gpu_binding tok_info, struct gpu_binding tables, struct gpu_binding out,
                struct gpu_binding partial, struct gpu_binding tiles);

#endif
