/* The prefix cache: full blocks named by a chained hash of their tokens, a key table to find them,
 * and an LRU list that keeps unreferenced ones until their memory is needed.
 *
 * Block states (see struct kv_pool): free (flags 0, on the free stack), in use (refs > 0, maybe
 * keyed, maybe registered) and cached (refs 0, registered, on the LRU list). Keyed means the block
 * is full and keys[b] names its content; registered means the key table maps keys[b] to b. A keyed
 * block is not always registered: when two sequences compute the same content independently, the
 * key stays with the first and the second copy is an ordinary block that dies with its owners.
 *
 * The key table is open addressing with linear probing over block ids, at most half full (two
 * slots per block), and deletes by shifting later entries back instead of leaving tombstones, so
 * lookups stay short however long the daemon runs. The key itself is not stored in the table but
 * read from keys[id]: a table slot is 4 bytes. XXH3 output is uniform, so its low bits index the
 * table directly. */
#include "kv.h"
#include "kv_internal.h"

#include "kvd_error.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

static uint64_t prefix_key(uint64_t parent, const int32_t *tokens, uint32_t block_size) {
  /* Seeding with the parent's key chains the hashes: the key covers the whole history. */
  return XXH3_64bits_withSeed(tokens, (size_t)block_size * sizeof *tokens, parent);
}

int kv__prefix_init(struct kv_pool *pool) {
  uint32_t n = pool->n_blocks;
  /* At most half full: a power of two >= 2 n. */
  uint64_t slots = 2;
  while (slots < 2 * (uint64_t)n)
    slots *= 2;
  if (slots > SIZE_MAX / sizeof *pool->ht) return KVD_ENOMEM;
  pool->keys = malloc((size_t)n * sizeof *pool->keys);
  pool->flags = calloc(n, sizeof *pool->flags);
  pool->lru_prev = malloc((size_t)n * sizeof *pool->lru_prev);
  pool->lru_next = malloc((size_t)n * sizeof *pool->lru_next);
  pool->ht = malloc((size_t)slots * sizeof *pool->ht);
  if (!pool->keys || !pool->flags || !pool->lru_prev || !pool->lru_next || !pool->ht)
    return KVD_ENOMEM;
  /* KV_BLOCK_NONE is all ones: an empty slot. */
  memset(pool->ht, 0xff, (size_t)slots * sizeof *pool->ht);
  pool->ht_mask = (size_t)slots - 1;
  pool->lru_head = pool->lru_tail = KV_BLOCK_NONE;
  return 0;
}

void kv__prefix_destroy(struct kv_pool *pool) {
  free(pool->keys);
  free(pool->flags);
  free(pool->lru_prev);
  free(pool->lru_next);
  free(pool->ht);
}

/* ---- key table ------------------------------------------------------------------------------- */

static uint32_t ht_find(const struct kv_pool *pool, uint64_t key) {
  for (size_t i = (size_t)key & pool->ht_mask;; i = (i + 1) & pool->ht_mask) {
    uint32_t b = pool->ht[i];
    if (b == KV_BLOCK_NONE || pool->keys[b] == key) return b;
  }
}

/* keys[block] is set and not in the table (the caller looked). Never fills up: n_blocks < slots. */
static void ht_insert(struct kv_pool *pool, uint32_t block) {
  size_t i = (size_t)pool->keys[block] & pool->ht_mask;
  while (pool->ht[i] != KV_BLOCK_NONE)
    i = (i + 1) & pool->ht_mask;
  pool->ht[i] = block;
  pool->flags[block] |= KV_BLOCK_REGISTERED;
  pool->n_registered++;
}

static void ht_remove(struct kv_pool *pool, uint32_t block) {
  size_t mask = pool->ht_mask, i = (size_t)pool->keys[block] & mask;
  while (pool->ht[i] != block) {
    assert(pool->ht[i] != KV_BLOCK_NONE);
    i = (i + 1) & mask;
  }
  /* Backward-shift deletion: move up every later entry of the run whose home slot is not in
   * (i, j], i.e. that a probe from its home would no longer reach across the hole at i. */
  for (size_t j = (i + 1) & mask; pool->ht[j] != KV_BLOCK_NONE; j = (j + 1) & mask) {
    size_t home = (size_t)pool->keys[pool->ht[j]] & mask;
    if (((j - home) & mask) >= ((j - i) & mask)) {
      pool->ht[i] = pool->ht[j];
      i = j;
    }
  }
  pool->ht[i] = KV_BLOCK_NONE;
  pool->flags[block] &= (uint8_t)~KV_BLOCK_REGISTERED;
  pool->n_registered--;
}

/* ---- LRU list -------------------------------------------------------------------------------- */

static void lru_push_tail(struct kv_pool *pool, uint32_t b) {
  pool->lru_prev[b] = pool->lru_tail;
  pool->lru_next[b] = KV_BLOCK_NONE;
  if (pool->lru_tail != KV_BLOCK_NONE)
    pool->lru_next[pool->lru_tail] = b;
  else
    pool->lru_head = b;
  pool->lru_tail = b;
  pool->n_cached++;
}

static void lru_remove(struct kv_pool *pool, uint32_t b) {
  uint32_t p = pool->lru_prev[b], n = pool->lru_next[b];
  if (p != KV_BLOCK_NONE)
    pool->lru_next[p] = n;
  else
    pool->lru_head = n;
  if (n != KV_BLOCK_NONE)
    pool->lru_prev[n] = p;
  else
    pool->lru_tail = p;
  pool->n_cached--;
}

bool kv__prefix_release(struct kv_pool *pool, uint32_t block) {
  if (pool->flags[block] & KV_BLOCK_REGISTERED) {
    /* A sequence releases its blocks last first, so a chain's tail is older on the list than its
     * head and is evicted first: what stays cached is still a usable prefix. */
    lru_push_tail(pool, block);
    return true;
  }
  pool->flags[block] = 0;
  return false;
}

uint32_t kv__prefix_evict(struct kv_pool *pool) {
  uint32_t b = pool->lru_head;
  assert(b != KV_BLOCK_NONE && pool->refs[b] == 0);
  lru_remove(pool, b);
  ht_remove(pool, b);
  pool->flags[b] = 0;
  pool->evictions++;
  return b;
}

void kv__prefix_forget(struct kv_pool *pool, uint32_t block) {
  assert(pool->refs[block] == 1);
  if (pool->flags[block] & KV_BLOCK_REGISTERED) ht_remove(pool, block);
  pool->flags[block] = 0;
}

/* ---- sequences ------------------------------------------------------------------------------- */

int kv_seq_new_with_prefix(struct kv_pool *pool, const int32_t *tokens, uint32_t n_tokens,
                           struct kv_seq **ret_seq, uint32_t *ret_cached) {
  uint32_t bs = pool->block_size;
  /* Leave the last prompt token to compute: its logits are what the request samples from. */
  uint32_t max_blocks = n_tokens ? (n_tokens - 1) / bs : 0;
  struct kv_seq *seq;
  int rc = kv_seq_new(pool, &seq);
  if (rc < 0) return rc;
  /* The table is sized before any block is touched, so a failure changes nothing. The prompt
   * needs these entries anyway. */
  if (max_blocks) {
    seq->table = malloc((size_t)max_blocks * sizeof *seq->table);
    if (!seq->table) {
      kv_seq_free(pool, seq);
      return KVD_ENOMEM;
    }
    seq->cap_blocks = max_blocks;
  }
  uint64_t key = (KV_PREFIX_ROOT_KEY ^ pool->key_seed);
  uint32_t n = 0;
  for (; n < max_blocks; n++) {
    key = prefix_key(key, tokens + (size_t)n * bs, bs);
    uint32_t b = ht_find(pool, key);
    if (b == KV_BLOCK_NONE) break;
    if (pool->refs[b] == 0) lru_remove(pool, b); /* revived: cached -> in use */
    assert(pool->refs[b] < UINT32_MAX);
    pool->refs[b]++;
    seq->table[n] = b;
  }
  seq->n_blocks = n;
  seq->n_hashed = n;
  if (n > 0) seq->chain_key = pool->keys[seq->table[n - 1]];
  seq->len = n * bs;
  pool->lookups += max_blocks;
  pool->hits += n;
  uint32_t used = pool->n_blocks - pool->n_free - pool->n_cached;
  if (used > pool->high_water) pool->high_water = used;
  *ret_seq = seq;
  *ret_cached = seq->len;
  return 0;
}

uint64_t kv_prefix_next(const struct kv_pool *pool, uint64_t parent, const int32_t *tokens) {
  return prefix_key(parent, tokens, pool->block_size);
}

uint64_t kv_prefix_root(const struct kv_pool *pool) {
  return KV_PREFIX_ROOT_KEY ^ pool->key_seed;
}

uint64_t kv_seq_chain_key(const struct kv_pool *pool, const struct kv_seq *seq) {
  return seq->n_hashed ? seq->chain_key : kv_prefix_root(pool);
}

uint32_t kv_pool_next_unpersisted(const struct kv_pool *pool, uint32_t from) {
  for (uint32_t b = from; b < pool->n_blocks; b++)
    if ((pool->flags[b] & (KV_BLOCK_REGISTERED | KV_BLOCK_PERSISTED)) == KV_BLOCK_REGISTERED)
      return b;
  return KV_BLOCK_NONE;
}

uint32_t kv_pool_lru_next(const struct kv_pool *pool, uint32_t after) {
  return after == KV_BLOCK_NONE ? pool->lru_head : pool->lru_next[after];
}

int kv_seq_register_blocks(struct kv_pool *pool, struct kv_seq *seq, const int32_t *tokens,
                           uint32_t n_tokens) {
  assert(pool->block_size == seq->block_size);
  if (n_tokens > seq->len) return KVD_EINVAL;
  if (seq->shifted) return 0; /* its later blocks hold keys no history computes (kv_shift.c) */
  uint32_t bs = seq->block_size, full = n_tokens / bs;
  assert(full <= seq->n_blocks);
  int added = 0;
  uint32_t i = seq->n_hashed;
  uint64_t parent = i ? seq->chain_key : (KV_PREFIX_ROOT_KEY ^ pool->key_seed);
  for (; i < full; i++) {
    uint64_t key = prefix_key(parent, tokens + (size_t)i * bs, bs);
    if (i < seq->n_dropped) {
      /* Given back before it was hashed (a sliding window): nothing to key, but the chain
       * goes on through it, and its key at the boundary is kept for rewinds. */
      if (i == seq->n_dropped - 1) seq->drop_key = key;
      parent = key;
      continue;
    }
    uint32_t b = seq->table[i];
    if (pool->flags[b] & KV_BLOCK_KEYED) {
      /* Shared with a fork or prefix user that keyed it first: the same history gives the same
       * key. A different one means this sequence rewrote an earlier block in its own copy, so
       * this block's content (computed after the original) is not what this history would give:
       * the chain cannot go on, as no key names this sequence's later blocks truthfully. */
      if (pool->keys[b] != key) break;
      parent = key;
      continue;
    }
    pool->keys[b] = key;
    pool->flags[b] |= KV_BLOCK_KEYED;
    /* One entry per key: a duplicate of a registered block stays an ordinary block. */
    if (ht_find(pool, key) == KV_BLOCK_NONE) {
      ht_insert(pool, b);
      if (added < INT32_MAX) added++;
    }
    parent = key;
  }
  seq->n_hashed = i;
  seq->chain_key = parent;
  return added;
}
