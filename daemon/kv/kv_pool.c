/* The block pool: a stack of free block ids and a reference count per block, so that allocating
 * and releasing a block are each a couple of array accesses whatever the pool size or how
 * fragmented it is. The stack is LIFO on purpose: the block freed last is reused first, which
 * keeps the working set of a busy pool small. Registered blocks (the prefix cache, kv_prefix.c)
 * skip the stack on release and wait on an LRU list, which allocation drains when the stack is
 * empty. */
#include "kv.h"
#include "kv_internal.h"

#include "kvd_error.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

int kv_pool_init(struct kv_pool *pool, uint32_t n_blocks, uint32_t block_size) {
  memset(pool, 0, sizeof *pool);
  if (block_size == 0) block_size = KV_BLOCK_SIZE_DEFAULT;
  if (n_blocks == 0 || n_blocks >= KV_BLOCK_NONE) return KVD_EINVAL;
  /* Every slot index block * block_size + offset must fit the device's uint32. */
  if ((uint64_t)n_blocks * block_size > KV_SLOTS_MAX) return KVD_EINVAL;
  pool->n_blocks = n_blocks;
  pool->refs = calloc(n_blocks, sizeof *pool->refs);
  pool->free_ids = malloc((size_t)n_blocks * sizeof *pool->free_ids);
  if (!pool->refs || !pool->free_ids || kv__prefix_init(pool) < 0) {
    kv_pool_destroy(pool);
    return KVD_ENOMEM;
  }
  /* Filled top-down so that a fresh pool hands out 0, 1, 2 ...: easy to read in a debugger and
   * the first sequences land at the start of each buffer. */
  for (uint32_t i = 0; i < n_blocks; i++)
    pool->free_ids[i] = n_blocks - 1 - i;
  pool->block_size = block_size;
  pool->n_free = n_blocks;
  return 0;
}

void kv_pool_destroy(struct kv_pool *pool) {
  free(pool->refs);
  free(pool->free_ids);
  kv__prefix_destroy(pool);
  memset(pool, 0, sizeof *pool);
}

static void pool_note_used(struct kv_pool *pool) {
  uint32_t used = pool->n_blocks - pool->n_free - pool->n_cached;
  if (used > pool->high_water) pool->high_water = used;
}

int kv_pool_alloc(struct kv_pool *pool, uint32_t *ret_block) {
  return kv_pool_alloc_n(pool, 1, ret_block);
}

int kv_pool_alloc_n(struct kv_pool *pool, uint32_t n, uint32_t *ret_blocks) {
  /* Checking the count first is what makes this all or nothing: nothing can fail after it. Free
   * blocks go first, so cached content is dropped only when nothing else is left, and then the
   * least recently used first. */
  if (n > kv_pool_available(pool)) {
    pool->alloc_failures++;
    return KVD_E_KV_EXHAUSTED;
  }
  for (uint32_t i = 0; i < n; i++) {
    uint32_t b = pool->n_free ? pool->free_ids[--pool->n_free] : kv__prefix_evict(pool);
    assert(pool->refs[b] == 0 && pool->flags[b] == 0);
    pool->refs[b] = 1;
    ret_blocks[i] = b;
  }
  pool_note_used(pool);
  return 0;
}

uint32_t kv_pool_available(const struct kv_pool *pool) {
  return pool->n_free + pool->n_cached;
}

void kv_pool_ref(struct kv_pool *pool, uint32_t block) {
  assert(block < pool->n_blocks);
  /* A free or cached block has no owner to share it with; a prefix-cache hit revives a cached
   * block in kv_seq_new_with_prefix, which also takes it off the LRU list. */
  assert(pool->refs[block] > 0);
  assert(pool->refs[block] < UINT32_MAX);
  pool->refs[block]++;
}

void kv_pool_unref(struct kv_pool *pool, uint32_t block) {
  assert(block < pool->n_blocks);
  assert(pool->refs[block] > 0);
  /* Without asserts a double unref is ignored rather than pushing a block on the stack twice,
   * which would hand it to two sequences at once. */
  if (block >= pool->n_blocks || pool->refs[block] == 0) return;
  if (--pool->refs[block] > 0) return;
  /* A registered block keeps its content and key for a later prefix hit until evicted. */
  if (kv__prefix_release(pool, block)) return;
  pool->free_ids[pool->n_free++] = block;
}

uint32_t kv_pool_refcount(const struct kv_pool *pool, uint32_t block) {
  return block < pool->n_blocks ? pool->refs[block] : 0;
}

void kv_pool_stats(const struct kv_pool *pool, struct kv_pool_stats *ret_stats) {
  ret_stats->block_size = pool->block_size;
  ret_stats->total = pool->n_blocks;
  ret_stats->free = pool->n_free;
  ret_stats->used = pool->n_blocks - pool->n_free - pool->n_cached;
  ret_stats->high_water = pool->high_water;
  ret_stats->alloc_failures = pool->alloc_failures;
  ret_stats->cow_copies = pool->cow_copies;
  ret_stats->cached = pool->n_cached;
  ret_stats->registered = pool->n_registered;
  ret_stats->lookups = pool->lookups;
  ret_stats->hits = pool->hits;
  ret_stats->evictions = pool->evictions;
}

int kv_plan_pool(const struct kv_geometry *geom, uint64_t budget_bytes, uint64_t max_binding_bytes,
                 uint64_t buffer_align, struct kv_plan *ret_plan) {
  uint64_t block_size = geom->block_size ? geom->block_size : KV_BLOCK_SIZE_DEFAULT;
  if (geom->n_layer == 0 || geom->token_bytes == 0) return KVD_EINVAL;
  if (buffer_align == 0) buffer_align = 1;
  if (buffer_align & (buffer_align - 1)) return KVD_EINVAL;

  uint64_t n_buffers = 2 * (uint64_t)geom->n_layer;
  if (n_buffers > UINT32_MAX) return KVD_EINVAL;
  if (geom->token_bytes > UINT64_MAX / block_size) return KVD_EOVERFLOW;
  uint64_t block_bytes = block_size * geom->token_bytes;
  /* One block id costs a block in every buffer. */
  if (block_bytes > UINT64_MAX / n_buffers) return KVD_EOVERFLOW;
  uint64_t id_bytes = block_bytes * n_buffers;

  /* Each buffer may start up to align - 1 bytes past where the previous one ended. */
  if (buffer_align - 1 > UINT64_MAX / n_buffers) return KVD_EOVERFLOW;
  uint64_t padding = n_buffers * (buffer_align - 1);
  uint64_t usable = budget_bytes > padding ? budget_bytes - padding : 0;

  uint64_t by_budget = usable / id_bytes;
  uint64_t by_binding = max_binding_bytes ? max_binding_bytes / block_bytes : UINT64_MAX;
  if (by_binding == 0) return KVD_E_LIMIT;
  if (by_budget == 0) return KVD_E_KV_EXHAUSTED;

  uint64_t n = by_budget < by_binding ? by_budget : by_binding;
  /* Block ids are uint32 with KV_BLOCK_NONE reserved, and slot indices are uint32 too. */
  if (n >= KV_BLOCK_NONE) n = KV_BLOCK_NONE - 1;
  if (n > KV_SLOTS_MAX / block_size) n = KV_SLOTS_MAX / block_size;

  ret_plan->n_blocks = (uint32_t)n;
  ret_plan->n_buffers = (uint32_t)n_buffers;
  ret_plan->block_bytes = block_bytes;
  ret_plan->buffer_bytes = n * block_bytes;
  ret_plan->total_bytes = n * id_bytes;
  ret_plan->binding_limited = by_binding < by_budget;
  return 0;
}

uint64_t kv_budget_fraction(uint64_t free_bytes, double fraction) {
  if (!(fraction > 0.0)) return 0; /* NaN too */
  if (fraction >= 1.0) return free_bytes;
  /* long double keeps the product exact enough for byte counts past 2^53. */
  long double b = (long double)free_bytes * (long double)fraction;
  if (b >= (long double)free_bytes) return free_bytes;
  return (uint64_t)b;
}
