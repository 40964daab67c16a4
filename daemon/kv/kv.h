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
 *   kv_seq_plan_write(pool, seq, seq->len, &cp)     the one block that may be shared is the one
 *                                                   holding `len`; 1 = record the copy cp first
 *   ... the forward pass writes K/V at kv_seq_slot(seq, pos) for each new pos (cp.dst_block in
 *       place of cp.src_block when a copy was planned) ...
 *   kv_seq_commit_copy(pool, seq, &cp) if planned, kv_seq_commit(seq, n)
 *   (on failure: kv_seq_cancel_copy(pool, &cp) and kv_seq_truncate(pool, seq, len))
 *
 * kv_seq_step_blocks() says how many blocks those calls will take, for admission control against
 * kv_pool_available() (free plus evictable cached blocks, not just the free list).
 *
 * Prefix cache (kv_prefix.c). Every full block can be identified by its content: block i's key is
 * a hash of its block_size token ids seeded with block i - 1's key (block 0 with a fixed seed), so
 * equal keys mean an equal token history up to and including that block, and hence equal K/V. A
 * pool-wide table maps keys to blocks. A block no sequence references any more stays cached under
 * its key (its K/V are still valid) on a least-recently-used list, and is evicted only when an
 * allocation finds the free list empty. A request then runs:
 *
 *   kv_seq_new_with_prefix(pool, prompt, n, &seq, &cached)   shares the longest cached chain of
 *                                                            the prompt's leading whole blocks;
 *                                                            seq->len = cached (< n, a multiple
 *                                                            of block_size)
 *   per step as above, for prompt[cached, n) then for each generated token
 *   kv_seq_register_blocks(pool, seq, history, seq->len)   after each commit: keys the blocks the
 *                                                            step filled and makes them findable
 *   kv_seq_free(pool, seq)                                   registered blocks stay cached
 *
 * where history is every token in seq's cache so far (prompt then generated tokens). A sequence
 * that never registers behaves exactly as without the cache. The cache never changes what a
 * sequence reads: a registered block is full and, while shared, read-only (copy-on-write as for
 * forks); the first write into one a sequence holds alone (only possible after truncating into it)
 * drops its key first, since its content is about to change. Keys are 64-bit XXH3 hashes: two
 * different histories sharing a key would share K/V, a chance of about n^2 / 2^65 for n distinct
 * blocks ever registered, which a local daemon accepts. */
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

/* Per-block prefix-cache state (kv_pool.flags). */
#define KV_BLOCK_KEYED 1u      /* full, keys[b] names its content; cleared before it is rewritten */
#define KV_BLOCK_REGISTERED 2u /* keyed and the one block the key table maps keys[b] to */
#define KV_BLOCK_PERSISTED 4u  /* registered and written to the disk tier (cleared with the rest) */

/* Every block is in exactly one of three states: in use (refs > 0, in some table), cached (refs 0,
 * registered, on the LRU list) or free (refs 0, on the free stack, flags 0). */
struct kv_pool {
  uint32_t n_blocks;   /* total blocks */
  uint32_t block_size; /* tokens per block */
  uint32_t *refs;      /* (n_blocks) reference count per block; 0 = free or cached */
  uint32_t *free_ids;  /* (n_blocks) stack of free block ids; [0, n_free) are valid */
  uint32_t n_free;
  uint32_t high_water;     /* most blocks ever in use at once */
  uint64_t alloc_failures; /* requests refused for lack of blocks (counted once per request) */
  uint64_t cow_copies;     /* copy-on-write copies committed (kv_seq_commit_copy) */

  /* Prefix cache, see the top of this file and kv_prefix.c. */
  uint64_t *keys;     /* (n_blocks) chain key of a block's content, valid when KV_BLOCK_KEYED */
  uint8_t *flags;     /* (n_blocks) KV_BLOCK_* bits */
  uint32_t *lru_prev; /* (n_blocks) cached blocks, oldest first; KV_BLOCK_NONE ends the list */
  uint32_t *lru_next;
  uint32_t lru_head; /* least recently used cached block, the next one evicted */
  uint32_t lru_tail;
  uint32_t n_cached;     /* blocks on the LRU list */
  uint32_t n_registered; /* blocks in the key table, cached or in use */
  uint32_t *ht;          /* (ht_mask + 1) open-addressing key table of block ids, linear probing */
  size_t ht_mask;
  uint64_t lookups;   /* whole prompt blocks kv_seq_new_with_prefix looked for */
  uint64_t hits;      /* of those, served from the cache */
  uint64_t evictions; /* cached blocks dropped to satisfy an allocation */
  /* Mixed into every chain's first key: pools of different KV types (or anything else that makes
   * the same tokens' K/V differ) never name a block alike. 0 from kv_pool_init. */
  uint64_t key_seed;
};

/* Counters for `status`. total = free + cached + used. */
struct kv_pool_stats {
  uint32_t block_size;
  uint32_t total;
  uint32_t free;
  uint32_t used; /* referenced by some sequence */
  uint32_t high_water;
  uint64_t alloc_failures;
  uint64_t cow_copies;
  uint32_t cached;     /* unreferenced but kept for prefix reuse; evicted before anything fails */
  uint32_t registered; /* blocks findable by key, in use or cached */
  uint64_t lookups;    /* whole prompt blocks looked up */
  uint64_t hits;       /* of those, reused from the cache (hits / lookups = prefix hit rate) */
  uint64_t evictions;
};

/* block_size 0 picks KV_BLOCK_SIZE_DEFAULT. KVD_EINVAL for n_blocks 0 or >= KV_BLOCK_NONE, or
 * n_blocks * block_size > KV_SLOTS_MAX; KVD_ENOMEM if the host arrays cannot be allocated. Every
 * block starts free. */
int kv_pool_init(struct kv_pool *pool, uint32_t n_blocks, uint32_t block_size);
/* Safe on a zeroed or half-initialised pool. Blocks still referenced are simply forgotten: the
 * device memory behind them belongs to the engine. */
void kv_pool_destroy(struct kv_pool *pool);

/* Takes one block with reference count 1, in O(1): a free one, else the least recently used
 * cached one (evicted: its key is forgotten). KVD_E_KV_EXHAUSTED when neither exists. */
int kv_pool_alloc(struct kv_pool *pool, uint32_t *ret_block);
/* Takes n blocks or none, free ones first, then evicting cached ones oldest first: on
 * KVD_E_KV_EXHAUSTED (n > kv_pool_available()) the pool is unchanged. O(n). */
int kv_pool_alloc_n(struct kv_pool *pool, uint32_t n, uint32_t *ret_blocks);
/* Blocks an allocation can take now: free plus cached. What admission control compares with. */
uint32_t kv_pool_available(const struct kv_pool *pool);
/* Adds a reference to a block in use (a second sequence sharing it). */
void kv_pool_ref(struct kv_pool *pool, uint32_t block);
/* Drops a reference, in O(1); at 0 a registered block becomes the most recently used cached
 * block, any other goes back to the free list. */
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
  /* Leading blocks already keyed (KV_BLOCK_KEYED, full within len): the running state of the
   * hash chain, kept so kv_seq_register_blocks hashes only blocks filled since its last call. The
   * key of block n_hashed - 1 is chain_key. */
  uint32_t n_hashed;
  uint64_t chain_key; /* the chain's key after block n_hashed - 1 (unused while n_hashed is 0) */
  /* Sliding-window models: leading table entries given back to the pool (kv_seq_drop_before),
   * KV_BLOCK_NONE in the table. Positions before n_dropped * block_size are never read again.
   * drop_key is the chain's key after block n_dropped - 1 once the chain has passed it. */
  uint32_t n_dropped;
  uint64_t drop_key;
  /* Tokens were dropped from the middle (kv_seq_shift_commit): blocks from the cut on hold K/V
   * no token history computes, so the sequence registers nothing more in the prefix cache. */
  bool shifted;
};

/* Which block to copy before writing (copy-on-write): in every (layer, K|V) buffer, block
 * src_block's bytes go to dst_block, which then replaces it at table entry `index`. Copying the
 * whole block (block_bytes) is always right; only its first n_tokens positions (per KV head) hold
 * this sequence's tokens, should a partial copy ever pay. */
struct kv_copy {
  uint32_t src_block;
  uint32_t dst_block;
  uint32_t n_tokens; /* rows of src that hold this sequence's tokens; the rest need no copy */
  uint32_t index;    /* the logical block (table entry) the copy is for */
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
 * already in the table counts; cached blocks are evicted for them if the free list is short).
 * All or nothing: KVD_E_KV_EXHAUSTED (or KVD_ENOMEM for the table)
 * leaves the sequence and the pool as they were, apart from the pool's failure counter.
 * KVD_EOVERFLOW if len + n_new_tokens overflows. */
int kv_seq_reserve(struct kv_pool *pool, struct kv_seq *seq, uint32_t n_new_tokens);
/* Marks n more tokens written. KVD_ERANGE if they exceed the reserved capacity. */
int kv_seq_commit(struct kv_seq *seq, uint32_t n);
/* Rewinds to n tokens (n <= len), unref'ing every block wholly past n, reserved ones included
 * (registered ones become cached). A block cut in the middle stays, keyed and registered if it
 * was; writing into it again goes through kv_seq_plan_write, which copies it if shared and
 * otherwise drops its key. KVD_ERANGE (nothing changed) for n past len or before the blocks
 * kv_seq_drop_before gave back: the caller recomputes from scratch. */
int kv_seq_truncate(struct kv_pool *pool, struct kv_seq *seq, uint32_t n);
/* Sliding windows: gives back every block wholly before position pos (pos <= len), which no
 * query of a model whose every layer reads at most `window` positions will read again once the
 * next query is at len >= pos + window - 1. The table keeps its length (entries become
 * KV_BLOCK_NONE, which the attention kernel never reads) so positions still map to entries.
 * Registered blocks stay cached for other sequences' prefixes. Returns the number of blocks
 * given back; KVD_ERANGE for pos past len. */
int kv_seq_drop_before(struct kv_pool *pool, struct kv_seq *seq, uint32_t pos);
/* Blocks that hold part of [0, len): the sequence's footprint in the pool. */
uint32_t kv_seq_live_blocks(const struct kv_seq *seq);

/* Restoring a sliding-window sequence from a host copy (engine_seq_import): an empty seq takes
 * n_blocks leading entries already given back (KV_BLOCK_NONE, len = n_blocks * block_size), as
 * kv_seq_drop_before would have left them. It registers nothing in the prefix cache afterwards
 * (shifted is set: its chain's keys are gone). KVD_EINVAL unless seq is empty, KVD_EOVERFLOW,
 * KVD_ENOMEM (nothing changed). */
int kv_seq_skip_dropped(struct kv_seq *seq, uint32_t n_blocks);

/* A new sequence sharing every block that holds src's committed tokens (reference counts go up,
 * nothing is copied). Blocks src reserved past len are not shared: they hold nothing yet. */
int kv_seq_fork(struct kv_pool *pool, const struct kv_seq *src, struct kv_seq **ret_dst);
/* The fork in two halves, so the part that can fail happens where failing is cheap to report:
 * kv_seq_new_reserved allocates an empty sequence whose table holds n_tokens' blocks (memory
 * only: reads nothing of the pool but its block size, so any thread may call it);
 * kv_seq_fork_into then makes it share src (src->len <= n_tokens) and cannot fail otherwise
 * (KVD_ERANGE when it was reserved for fewer tokens). A reserved sequence never forked into is
 * freed with kv_seq_free like any other. */
int kv_seq_new_reserved(const struct kv_pool *pool, uint32_t n_tokens, struct kv_seq **ret_seq);
int kv_seq_fork_into(struct kv_pool *pool, const struct kv_seq *src, struct kv_seq *dst);

/* Copy-on-write in two phases, for a step that can still fail after it is planned (the engine's
 * forward pass: the copies and the writes run on the device, after host-side work that may fail):
 *
 *   kv_seq_plan_write(pool, seq, pos, &cp)   before writing pos: 1 if pos's block is shared
 *                                            (reference count > 1): a fresh block is taken
 *                                            (reference count 1, in no table) and cp says what to
 *                                            copy into it; seq's table is NOT changed. The step
 *                                            then writes pos's block's tokens into cp.dst_block
 *                                            (the table mirror and slots it uploads say so).
 *   kv_seq_commit_copy(pool, seq, &cp)       the step ran: table[cp.index] = cp.dst_block and
 *                                            seq's reference to cp.src_block is dropped
 *   kv_seq_cancel_copy(pool, &cp)            the step failed: cp.dst_block goes back to the pool
 *                                            and seq's table is exactly as before the plan
 *
 * so a failure between plan and commit never leaves a never-filled block in a table. plan
 * returns 0 when the block is already this sequence's alone (nothing to copy, *ret_copy
 * untouched); if that block was keyed its key is dropped (unregistered) right away, as its
 * content is about to change. KVD_ERANGE if pos is past the reserved capacity;
 * KVD_E_KV_EXHAUSTED (nothing changed) if no block is available. Every copy planned for a step
 * is committed or cancelled before the next plan on the same sequence.
 *
 * Why registered blocks are never written in place: only blocks full within len are keyed, and
 * the engine writes at positions >= len, so it calls this for len's block, which is partial or
 * new, hence never keyed, unless the sequence was truncated into a keyed block. Then a shared one
 * is copied here like any shared block, and one held alone is unkeyed before the write. */
int kv_seq_plan_write(struct kv_pool *pool, struct kv_seq *seq, uint32_t pos,
                      struct kv_copy *ret_copy);
void kv_seq_commit_copy(struct kv_pool *pool, struct kv_seq *seq, const struct kv_copy *cp);
void kv_seq_cancel_copy(struct kv_pool *pool, const struct kv_copy *cp);
/* Plan and commit at once, for a caller with nothing that can fail between the copy and the
 * write (the table points at the fresh block on return): same results as kv_seq_plan_write. */
int kv_seq_prepare_write(struct kv_pool *pool, struct kv_seq *seq, uint32_t pos,
                         struct kv_copy *ret_copy);
/* Blocks that reserve(n_new_tokens) + plan_write(len) would take right now; the step fits
 * if the sum over a batch is at most kv_pool_available(). */
uint32_t kv_seq_step_blocks(const struct kv_pool *pool, const struct kv_seq *seq,
                            uint32_t n_new_tokens);

/* (seq, pos) -> (physical block, row in block). KVD_ERANGE past the reserved capacity. */
int kv_seq_slot(const struct kv_seq *seq, uint32_t pos, struct kv_slot *ret_slot);

/* ---- prefix cache ---------------------------------------------------------------------------- */

/* A new sequence on `pool` whose table starts with the longest chain of cached blocks matching
 * tokens' leading whole blocks, each shared (referenced, taken off the LRU list if idle) rather
 * than recomputed; *ret_cached = its len, the tokens already in the cache. The match never covers
 * all n_tokens: at most n_tokens - 1 tokens rounded down to whole blocks, so the last prompt token
 * is always computed and yields logits. Counts lookups and hits. The shared blocks are read-only;
 * writing resumes at len, in a block of its own. KVD_ENOMEM (nothing changed) on host OOM. */
int kv_seq_new_with_prefix(struct kv_pool *pool, const int32_t *tokens, uint32_t n_tokens,
                           struct kv_seq **ret_seq, uint32_t *ret_cached);
/* The chain one block further (the disk tier looks blocks up past the pool's hits): the key of
 * block_size ids after a block keyed parent; kv_prefix_root() is block 0's parent. And where a
 * sequence's chain stands: the key of its last hashed block, or the root. */
uint64_t kv_prefix_next(const struct kv_pool *pool, uint64_t parent, const int32_t *tokens);
uint64_t kv_prefix_root(const struct kv_pool *pool);
uint64_t kv_seq_chain_key(const struct kv_pool *pool, const struct kv_seq *seq);
/* The first registered block at or after `from` not marked KV_BLOCK_PERSISTED, or KV_BLOCK_NONE:
 * what the disk tier has not seen yet. */
uint32_t kv_pool_next_unpersisted(const struct kv_pool *pool, uint32_t from);
/* Cached blocks in eviction order: the least recently used first (after KV_BLOCK_NONE), then
 * each one's successor; KV_BLOCK_NONE at the end. */
uint32_t kv_pool_lru_next(const struct kv_pool *pool, uint32_t after);

/* Keys every block of seq that is full within tokens[0, n_tokens) and not keyed yet, extending
 * the chain, and registers each under its key unless another block already holds that key (equal
 * content computed twice: that copy stays unregistered and is freed normally). tokens is the
 * sequence's whole history, the ids whose K/V are at positions [0, n_tokens); n_tokens <= len,
 * normally len right after kv_seq_commit. O(new blocks). Returns the number of blocks registered,
 * KVD_EINVAL if n_tokens > len. */
int kv_seq_register_blocks(struct kv_pool *pool, struct kv_seq *seq, const int32_t *tokens,
                           uint32_t n_tokens);

/* ---- past the context (kv_shift.c) ---------------------------------------------------------- */

/* What a sequence does when its next tokens would pass the model's context. */
enum kv_overflow {
  KV_OVERFLOW_ERROR = 0, /* the wall: a prompt over the context is refused, generation ends */
  KV_OVERFLOW_SHIFT,     /* keep the first `keep` tokens, drop the older half of the rest */
  KV_OVERFLOW_WINDOW,    /* StreamingLLM: `keep` attention sinks plus the most recent tokens */
};
/* "error", "shift", "window"; and back (KVD_EINVAL for anything else). */
const char *kv_overflow_name(enum kv_overflow p);
int kv_overflow_parse(const char *name, enum kv_overflow *ret);

/* Which tokens go: keep the first `keep`, drop the next n_drop (a multiple of the block size, so
 * blocks go back whole). */
struct kv_overflow_cut {
  uint32_t keep;
  uint32_t n_drop; /* 0: nothing to do, the tokens fit */
};

/* The one definition of the policies, which the scheduler and the tests' CPU reference both
 * follow: a sequence of len tokens about to take n_new more in an n_ctx context. Fits: n_drop 0.
 * Else, for shift, n_drop is the larger of what makes room and half of the tokens after `keep`,
 * for window just what makes room, both rounded up to whole blocks; keep is capped at
 * n_ctx - 2 * block_size (a keep near the context would leave nothing to drop) and at len.
 * KVD_E_CONTEXT under KV_OVERFLOW_ERROR, or when dropping everything after keep is not enough
 * (n_new > n_ctx - keep: the caller takes fewer tokens at once). */
int kv_overflow_plan(enum kv_overflow policy, uint32_t len, uint32_t n_new, uint32_t n_ctx,
                     uint32_t keep, uint32_t block_size, struct kv_overflow_cut *ret);

/* One row's move: the token at slot src (kv_slot_index) goes to slot dst; src == dst in place. */
struct kv_move {
  uint32_t src, dst;
};

/* A planned shift: the new table and the rows the device rewrites, in every layer:
 *   moves[0, n_rotate)        keys rotated back by n_drop positions (values copied as they are)
 *   moves[n_rotate, n_moves)  the kept rows of a partial block, copied unchanged
 * Destination rows of distinct moves are distinct and no move reads another's destination. */
struct kv_shift {
  uint32_t keep, n_drop;
  uint32_t *table; /* the table after the shift, n_blocks entries */
  uint32_t n_blocks;
  uint32_t *fresh;    /* (n_fresh) blocks taken for moved blocks other sequences share, and for
                         registered ones while free blocks last (the prefix cache keeps them) */
  uint32_t *fresh_at; /* the new table entries they are */
  uint32_t n_fresh;
  struct kv_move *moves;
  uint32_t n_rotate, n_moves;
};

/* Dropping tokens [keep, keep + n_drop) of seq, in two phases like copy-on-write: plan takes the
 * fresh blocks and builds the moves (nothing of seq changes); after the device ran them, commit
 * installs the table (len -= n_drop; dropped blocks go back to the pool or, registered, to the
 * prefix cache; blocks rewritten in place lose their keys; seq->shifted is set), or cancel gives
 * the fresh blocks back. n_drop must be a positive multiple of the block size with
 * keep + n_drop <= len, and keep 0 once a sliding window gave blocks back: KVD_EINVAL.
 * KVD_E_KV_EXHAUSTED (nothing changed) when the fresh blocks are not available, KVD_ENOMEM. */
int kv_seq_shift_plan(struct kv_pool *pool, const struct kv_seq *seq, uint32_t keep,
                      uint32_t n_drop, struct kv_shift *ret);
void kv_seq_shift_commit(struct kv_pool *pool, struct kv_seq *seq, struct kv_shift *sh);
void kv_seq_shift_cancel(struct kv_pool *pool, struct kv_shift *sh);

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
