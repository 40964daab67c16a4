/* The paged KV cache: a pool of fixed-size blocks and the per-sequence block tables over it.
 *
 * Keys and values of past tokens live in blocks (pages) of `block_size` tokens carved from a few
 * large device buffers. A sequence addresses its tokens through a block table (logical block i ->
 * physical block id), so its cache need not be contiguous, grows one block at a time as tokens are
 * produced, and shares whole blocks with sequences that have a common prefix (reference counts,
 * copy-on-write). Running out of blocks is KVD_E_KV_EXHAUSTED and leaves every table as it was.
 *
 * This module is pure bookkeeping over block ids: no Vulkan, no device memory. The engine owns the
 * buffers, records the block copies copy-on-write asks for and uploads the table mirror (below)
 * once per step. Like every table the scheduler touches, it is used from the loop thread only.
 *
 * Per step, for a sequence about to write n tokens at positions [len, len + n):
 *
 *   kv_seq_reserve(pool, seq, n)                    blocks for the new tokens, all or nothing
 *   kv_seq_prepare_write(pool, seq, seq->len, &cp)  the one block that may be shared is the one
 *                                                   holding `len`; 1 = record the copy cp first
 *   ... the forward pass writes K/V at kv_seq_slot(seq, pos) for each new pos ...
 *   kv_seq_commit(seq, n)
 *
 * kv_seq_step_blocks() says how many free blocks those calls will take, for admission control. */
#ifndef KVD_KV_H
#define KVD_KV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define KV_BLOCK_SIZE_DEFAULT 16u
/* Never a valid block id: the pool refuses n_blocks >= KV_BLOCK_NONE. */
#define KV_BLOCK_NONE UINT32_MAX
/* Most token slots a pool may have: slot indices are uint32 on the device. */
#define KV_SLOTS_MAX ((uint64_t)UINT32_MAX + 1)

/* ---- block pool ---------------------------------------------------------------------------- */

struct kv_pool {
  uint32_t n_blocks;   /* total blocks */
  uint32_t block_size; /* tokens per block */
  uint32_t *refs;      /* (n_blocks) reference count per block; 0 = on the free list */
  uint32_t *free_ids;  /* (n_blocks) stack of free block ids; [0, n_free) are valid */
  uint32_t n_free;
  uint32_t high_water;     /* most blocks ever in use at once */
  uint64_t alloc_failures; /* requests refused for lack of blocks (counted once per request) */
  uint64_t cow_copies;     /* blocks copied by kv_seq_prepare_write */
};

/* Counters for `status`. used = total - free. */
struct kv_pool_stats {
  uint32_t block_size;
  uint32_t total;
  uint32_t free;
  uint32_t used;
  uint32_t high_water;
  uint64_t alloc_failures;
  uint64_t cow_copies;
};

/* block_size 0 picks KV_BLOCK_SIZE_DEFAULT. KVD_EINVAL for n_blocks 0 or >= KV_BLOCK_NONE, or
 * n_blocks * block_size > KV_SLOTS_MAX; KVD_ENOMEM if the host arrays cannot be allocated. Every
 * block starts free. */
int kv_pool_init(struct kv_pool *pool, uint32_t n_blocks, uint32_t block_size);
/* Safe on a zeroed or half-initialised pool. Blocks still referenced are simply forgotten: the
 * device memory behind them belongs to the engine. */
void kv_pool_destroy(struct kv_pool *pool);

/* Takes one free block with reference count 1, in O(1). KVD_E_KV_EXHAUSTED when none is free. */
int kv_pool_alloc(struct kv_pool *pool, uint32_t *ret_block);
/* Takes n blocks or none: on KVD_E_KV_EXHAUSTED the pool is unchanged. O(n). */
int kv_pool_alloc_n(struct kv_pool *pool, uint32_t n, uint32_t *ret_blocks);
/* Adds a reference to a block in use (a second sequence sharing it). */
void kv_pool_ref(struct kv_pool *pool, uint32_t block);
/* Drops a reference; at 0 the block goes back to the free list in O(1). */
void kv_pool_unref(struct kv_pool *pool, uint32_t block);
uint32_t kv_pool_refcount(const struct kv_pool *pool, uint32_t block);
void kv_pool_stats(const struct kv_pool *pool, struct kv_pool_stats *ret_stats);

/* ---- sizing ---------------------------------------------------------------------------------- */

/* How the engine lays the pool out in device memory (the layout shaders/common/pc_attn.h reads):
 * one storage buffer per (layer, K|V), i.e. 2 * n_layer buffers, each holding every block of
 * that layer's keys (or values):
 *
 *   K[layer], V[layer]: (n_blocks, n_kv_heads, block_size, head_dim) elements
 *
 * so block b of any buffer is the byte range [b * block_bytes, (b + 1) * block_bytes), with
 *   token_bytes = n_kv_heads * head_dim * element size   (one token's keys in one layer)
 *   block_bytes = block_size * token_bytes
 * and one block id addresses the same tokens in all 2 * n_layer buffers. A buffer per (layer, K|V)
 * rather than one for everything keeps each binding small: a binding may not exceed
 * maxStorageBufferRange (often 4 GiB, as little as 128 MiB on some drivers), and since every
 * buffer holds all n_blocks blocks, that cap bounds n_blocks however much memory is free.
 * Slot indices (block * block_size + offset) are uint32 on the device, so n_blocks * block_size
 * stays below 2^32 too. */
struct kv_geometry {
  uint32_t n_layer;
  uint32_t block_size;  /* tokens per block; 0 = KV_BLOCK_SIZE_DEFAULT */
  uint64_t token_bytes; /* n_kv_heads * head_dim * element size: one token, one layer, K or V */
};

struct kv_plan {
  uint32_t n_blocks;     /* blocks that fit; the value for kv_pool_init */
  uint32_t n_buffers;    /* 2 * n_layer */
  uint64_t block_bytes;  /* one block in one buffer */
  uint64_t buffer_bytes; /* n_blocks * block_bytes: the size of each buffer */
  uint64_t total_bytes;  /* n_buffers * buffer_bytes */
  bool binding_limited;  /* max_binding_bytes, not the budget, set n_blocks */
};

/* The number of blocks that fit in `budget_bytes` of device memory laid out as above, each buffer
 * also at most `max_binding_bytes` (0 = no cap) and starting at a multiple of `buffer_align` (0 or
 * a power of two; the worst-case padding is taken off the budget first). KVD_EINVAL for a bad
 * geometry, KVD_EOVERFLOW if the sizes overflow, KVD_E_LIMIT if one block exceeds the binding cap,
 * KVD_E_KV_EXHAUSTED if the budget does not hold one block in every buffer. */
int kv_plan_pool(const struct kv_geometry *geom, uint64_t budget_bytes, uint64_t max_binding_bytes,
                 uint64_t buffer_align, struct kv_plan *ret_plan);
/* floor(free_bytes * fraction) for a budget given as a share of reported free memory; fraction is
 * clamped to [0, 1]. */
uint64_t kv_budget_fraction(uint64_t free_bytes, double fraction);

/* ---- sequences ------------------------------------------------------------------------------- */

/* One sequence's view of the cache. Tokens [0, len) are written and valid; the table may hold
 * blocks past them that kv_seq_reserve added for tokens being written this step. */
struct kv_seq {
  uint32_t len;        /* committed tokens */
  uint32_t n_blocks;   /* table entries in use; n_blocks * block_size = capacity in tokens */
  uint32_t cap_blocks; /* table entries allocated */
  uint32_t block_size; /* the pool's, copied so commit and slot lookups need no pool */
  uint32_t *table;     /* (cap_blocks) logical block -> physical block id */
};

/* Which block to copy before writing (copy-on-write): in every (layer, K|V) buffer, block
 * src_block's bytes go to dst_block. Copying the whole block (block_bytes) is always right; only
 * its first n_tokens positions (per KV head) hold this sequence's tokens, should a partial copy
 * ever pay. */
struct kv_copy {
  uint32_t src_block;
  uint32_t dst_block;
  uint32_t n_tokens; /* rows of src that hold this sequence's tokens; the rest need no copy */
};

/* Where one token's K/V lives: position `offset` of block `block`; the kv_write shader takes it
 * as the slot index block * block_size + offset. */
struct kv_slot {
  uint32_t block;
  uint32_t offset;
};

/* The slot index the kv_write shader takes: block * block_size + offset. */
static inline uint32_t kv_slot_index(struct kv_slot slot, uint32_t block_size) {
  return slot.block * block_size + slot.offset;
}

/* An empty sequence (no blocks) on `pool`. KVD_ENOMEM on host OOM. */
int kv_seq_new(const struct kv_pool *pool, struct kv_seq **ret_seq);
/* Unrefs every block and frees the sequence; NULL is a no-op. This is what a client going away
 * calls: its blocks are free (or still held only by the sequences sharing them) on return. */
void kv_seq_free(struct kv_pool *pool, struct kv_seq *seq);

/* Makes room for n_new_tokens after len, appending only the blocks those tokens need (capacity
 * already in the table counts). All or nothing: KVD_E_KV_EXHAUSTED (or KVD_ENOMEM for the table)
 * leaves the sequence and the pool as they were, apart from the pool's failure counter.
 * KVD_EOVERFLOW if len + n_new_tokens overflows. */
int kv_seq_reserve(struct kv_pool *pool, struct kv_seq *seq, uint32_t n_new_tokens);
/* Marks n more tokens written. KVD_ERANGE if they exceed the reserved capacity. */
int kv_seq_commit(struct kv_seq *seq, uint32_t n);
/* Rewinds to n tokens (n <= len), unref'ing every block wholly past n, reserved ones included. A
 * block cut in the middle stays; writing into it again goes through kv_seq_prepare_write. */
int kv_seq_truncate(struct kv_pool *pool, struct kv_seq *seq, uint32_t n);
/* A new sequence sharing every block that holds src's committed tokens (reference counts go up,
 * nothing is copied). Blocks src reserved past len are not shared: they hold nothing yet. */
int kv_seq_fork(struct kv_pool *pool, const struct kv_seq *src, struct kv_seq **ret_dst);

/* Before writing position pos: if the block holding it is shared (reference count > 1), takes a
 * fresh block, puts it in the table in its place, drops this sequence's reference to the old one
 * and returns 1 with *ret_copy saying what the engine must copy first. Returns 0 when the block
 * is already this sequence's alone (nothing to copy, *ret_copy untouched). KVD_ERANGE if pos is
 * past the reserved capacity; KVD_E_KV_EXHAUSTED (nothing changed) if no block is free. */
int kv_seq_prepare_write(struct kv_pool *pool, struct kv_seq *seq, uint32_t pos,
                         struct kv_copy *ret_copy);
/* Free blocks that reserve(n_new_tokens) + prepare_write(len) would take right now. */
uint32_t kv_seq_step_blocks(const struct kv_pool *pool, const struct kv_seq *seq,
                            uint32_t n_new_tokens);

/* (seq, pos) -> (physical block, row in block). KVD_ERANGE past the reserved capacity. */
int kv_seq_slot(const struct kv_seq *seq, uint32_t pos, struct kv_slot *ret_slot);

/* ---- device mirror -------------------------------------------------------------------------- */

/* Writes the block tables of a batch into one host array for a single upload per step.
 *
 * Layout: packed. dst is a uint32 array of physical block ids holding seqs[0]'s whole table,
 * then seqs[1]'s, and so on, with no padding; ret_offsets[i] is the index in dst of seqs[i]'s
 * first entry (n_seqs entries). Every block in a table goes in, reserved ones included, since
 * this step writes into them. The attention shader (shaders/attn_paged.comp) takes per query token
 * t a pair tok_info[t] = (n_kv, table_offset), with table_offset = ret_offsets[i] for the token's
 * sequence i, and finds the block of KV position pos at
 *
 *   tables[table_offset + pos / block_size]
 *
 * Because the offset comes with the token anyway, packing costs the shader nothing over a padded
 * (n_seqs, max_blocks) array, needs no maximum fixed in advance and uploads only real entries.
 * A forked sequence's table is written again, not shared: a few bytes per block.
 *
 * Returns the number of entries written (kv_mirror_entries()), KVD_ENOSPC if dst_len is smaller
 * (nothing written) or KVD_EOVERFLOW if it would not fit an int. */
int kv_mirror_write(const struct kv_seq *const *seqs, uint32_t n_seqs, uint32_t *dst,
                    size_t dst_len, uint32_t *ret_offsets);
/* Entries kv_mirror_write needs for this batch: the sum of the table lengths. */
size_t kv_mirror_entries(const struct kv_seq *const *seqs, uint32_t n_seqs);

#endif
