/* Helpers shared by the files of daemon/kv and nobody else: the prefix cache's side of the pool's
 * allocate and release paths (kv_prefix.c). */
#ifndef KVD_KV_INTERNAL_H
#define KVD_KV_INTERNAL_H

#include "kv.h"

/* The parent key of a sequence's block 0 ("kvd_pfx0"): any constant, fixed so keys are stable.
 * Block i's key is XXH3_64bits_withSeed(its block_size int32 token ids, parent = block i-1's key);
 * the unit test recomputes chains with it. */
#define KV_PREFIX_ROOT_KEY 0x6b76645f70667830ull

/* Allocates the key table, keys, flags and LRU links for pool->n_blocks blocks. KVD_ENOMEM. */
int kv__prefix_init(struct kv_pool *pool);
void kv__prefix_destroy(struct kv_pool *pool);
/* A block's reference count just reached 0: true if it is registered and now the most recently
 * used cached block; false if it is not, and its flags were cleared for the free list. */
bool kv__prefix_release(struct kv_pool *pool, uint32_t block);
/* Unregisters the least recently used cached block and returns it, refcount 0 and flags 0, on no
 * list. The caller has checked pool->n_cached > 0. */
uint32_t kv__prefix_evict(struct kv_pool *pool);
/* The content of a block held by one sequence is about to change: drops its key. */
void kv__prefix_forget(struct kv_pool *pool, uint32_t block);

#endif
