/* Push constants of the paged-attention kernels and the KV write.
 *
 * KV cache layout, per layer, one buffer for K and one for V:
 *   (n_blocks, n_head_kv, block_size, head_dim) f32
 * so the head_dim values of one position are contiguous and the positions of one block and head
 * follow each other: a block is read as one dense (block_size x head_dim) tile per head.
 * A token's view of the cache is described by tok_info[t] = (n_kv, table_offset): it attends to
 * positions 0 .. n_kv-1 (causal: n_kv = its position + 1), whose logical block b lives in
 * physical block tables[table_offset + b]. With a sliding window w it reads only the last w of
 * them, n_kv - w .. n_kv - 1: entries of the table before that may be KV_BLOCK_NONE (blocks
 * returned to the pool) and are never read. */
#ifndef KVD_PC_ATTN_H
#define KVD_PC_ATTN_H
#include "pc_common.h"

/* Scatter new K and V rows into their cache slots: slot[t] = block * block_size + offset. */
struct pc_kv_write {
  uint n_tokens;
  uint n_head_kv;
  uint head_dim;
  uint block_size;
  uint src_stride; /* floats between consecutive tokens in k_new / v_new */
  uint row_words;  /* 32-bit words of one cache row (kv_row_words()) */
  uint group;      /* q8_0 / q4_0: values per scale (kv_group()); unused otherwise */
};
PC_ASSERT_SIZE(pc_kv_write, 28)

/* Context shift: moves (src slot, dst slot) of one layer, keys of the first n_rotate rotated back
 * by delta positions (shaders/kv_shift.comp, daemon/kv/kv_shift.c). */
struct pc_kv_shift {
  uint n_moves;
  uint n_rotate;
  uint n_head_kv;
  uint head_dim;
  uint block_size;
  uint row_words;
  uint group;
  uint n_rot;  /* leading dimensions RoPE rotates */
  uint mode;   /* 0 normal (2i, 2i+1), 1 neox (i, i + n_rot/2) */
  uint delta;  /* positions the keys move back */
};
PC_ASSERT_SIZE(pc_kv_shift, 40)

/* Attention of n_tokens query tokens, each over its own paged KV range, split along the KV axis
 * into n_splits chunks of `chunk` positions (flash-decoding); with n_splits == 1 the kernel
 * writes the normalised output itself, else (m, l, o) partials that attn_merge combines. */
struct pc_attn {
  uint n_tokens;
  uint n_head;
  uint n_head_kv;
  uint head_dim;
  uint block_size;
  uint q_stride; /* floats between tokens in q and out */
  uint chunk;    /* KV positions per split (<= the CHUNK spec constant) */
  uint n_splits;
  float scale;   /* q.k multiplier: 1 / sqrt(head_dim), or the family's */
  uint window;   /* sliding window: each token reads its last `window` positions; 0 = all */
  float softcap; /* scores become softcap * tanh(s / softcap) (gemma2); 0 = none */
  uint row_words; /* 32-bit words of one cache row */
  uint group;     /* q8_0 / q4_0: values per scale */
  uint tile_heads; /* attn_tile: query heads per workgroup (a divisor of n_head / n_head_kv) */
};
PC_ASSERT_SIZE(pc_attn, 56)

/* The query-tiled kernel (attn_tile.comp) takes its tokens from tiles[i] = (first token, count):
 * `count` consecutive batch tokens of one sequence (the same table offset in tok_info), each with
 * its own n_kv. Workgroup (g, i) computes query heads g * tile_heads .. + tile_heads - 1 of tile
 * i's tokens, all reading KV head g * tile_heads / (n_head / n_head_kv). */

#endif
