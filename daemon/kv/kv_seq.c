/* Block tables: each sequence maps its logical blocks to physical ones in the pool. Blocks are
 * appended only when tokens need them and released whole, so a sequence's cache costs at most one
 * partly filled block more than its tokens. Sharing is by reference count; the first write into a
 * shared block swaps in a private copy (copy-on-write), which the engine performs on the device. */
#include "kv.h"
#include "kv_internal.h"

#include "kvd_error.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

/* ceil(tokens / block_size) without the tokens + block_size - 1 overflow. */
static uint32_t seq_blocks_for(uint32_t tokens, uint32_t block_size) {
  return tokens / block_size + (tokens % block_size != 0);
}

static uint64_t seq_capacity(const struct kv_seq *seq) {
  return (uint64_t)seq->n_blocks * seq->block_size;
}

/* Grows the table's allocation (not its length) to hold n entries. */
static int seq_grow(struct kv_seq *seq, uint32_t n) {
  if (n <= seq->cap_blocks) return 0;
  uint64_t cap = seq->cap_blocks ? seq->cap_blocks : 8;
  while (cap < n)
    cap *= 2;
  if (cap > UINT32_MAX) cap = UINT32_MAX;
  uint32_t *t = realloc(seq->table, (size_t)cap * sizeof *t);
  if (!t) return KVD_ENOMEM;
  seq->table = t;
  seq->cap_blocks = (uint32_t)cap;
  return 0;
}

/* Drops table entries [keep, n_blocks), last first: the LIFO free list then hands the lowest of
 * them out first again, so a sequence that shrinks and regrows tends to get its blocks back. */
static void seq_release_from(struct kv_pool *pool, struct kv_seq *seq, uint32_t keep) {
  for (uint32_t i = seq->n_blocks; i > keep; i--)
    if (seq->table[i - 1] != KV_BLOCK_NONE) kv_pool_unref(pool, seq->table[i - 1]);
  seq->n_blocks = keep;
  if (seq->n_dropped > keep) seq->n_dropped = keep;
}

int kv_seq_new(const struct kv_pool *pool, struct kv_seq **ret_seq) {
  assert(pool->block_size > 0);
  struct kv_seq *seq = calloc(1, sizeof *seq);
  if (!seq) return KVD_ENOMEM;
  seq->block_size = pool->block_size;
  *ret_seq = seq;
  return 0;
}

void kv_seq_free(struct kv_pool *pool, struct kv_seq *seq) {
  if (!seq) return;
  seq_release_from(pool, seq, 0);
  free(seq->table);
  free(seq);
}

int kv_seq_reserve(struct kv_pool *pool, struct kv_seq *seq, uint32_t n_new_tokens) {
  assert(pool->block_size == seq->block_size);
  if (n_new_tokens > UINT32_MAX - seq->len) return KVD_EOVERFLOW;
  uint32_t need = seq_blocks_for(seq->len + n_new_tokens, seq->block_size);
  if (need <= seq->n_blocks) return 0;
  uint32_t add = need - seq->n_blocks;
  /* Refused before the table is touched, so the answer is KV_EXHAUSTED (not a realloc's ENOMEM)
   * and costs nothing. */
  if (add > kv_pool_available(pool)) {
    pool->alloc_failures++;
    return KVD_E_KV_EXHAUSTED;
  }
  /* The table grows first: if that fails, no block has left the pool yet. A grown but unused
   * allocation is not a visible change. */
  int rc = seq_grow(seq, need);
  if (rc < 0) return rc;
  rc = kv_pool_alloc_n(pool, add, seq->table + seq->n_blocks);
  if (rc < 0) return rc;
  seq->n_blocks = need;
  return 0;
}

int kv_seq_commit(struct kv_seq *seq, uint32_t n) {
  if ((uint64_t)seq->len + n > seq_capacity(seq)) return KVD_ERANGE;
  seq->len += n;
  return 0;
}

int kv_seq_truncate(struct kv_pool *pool, struct kv_seq *seq, uint32_t n) {
  assert(pool->block_size == seq->block_size);
  if (n > seq->len) return KVD_ERANGE;
  /* Positions before the dropped blocks' end are gone; a rewind there cannot be honoured. */
  if ((uint64_t)n < (uint64_t)seq->n_dropped * seq->block_size) return KVD_ERANGE;
  seq_release_from(pool, seq, seq_blocks_for(n, seq->block_size));
  seq->len = n;
  /* A block cut in the middle is no longer full here, though it stays keyed for its sharers. */
  uint32_t h = n / seq->block_size;
  if (seq->n_hashed > h) {
    seq->n_hashed = h;
    /* The chain's key after block h - 1: that block's own key, or, when it was given back (h is
     * then n_dropped, as n is past the dropped blocks), the one kept at the boundary. */
    if (h > 0) seq->chain_key = h - 1 < seq->n_dropped ? seq->drop_key : pool->keys[seq->table[h - 1]];
  }
  return 0;
}

int kv_seq_drop_before(struct kv_pool *pool, struct kv_seq *seq, uint32_t pos) {
  assert(pool->block_size == seq->block_size);
  if (pos > seq->len) return KVD_ERANGE;
  uint32_t nd = pos / seq->block_size; /* blocks wholly before pos */
  if (nd <= seq->n_dropped) return 0;
  /* Keep the chain's key at the new boundary if the chain has got that far: a later rewind to
   * the boundary resumes hashing from it (kv_seq_truncate). */
  if (seq->n_hashed >= nd) seq->drop_key = pool->keys[seq->table[nd - 1]];
  int n = 0;
  for (uint32_t i = seq->n_dropped; i < nd; i++) {
    kv_pool_unref(pool, seq->table[i]);
    seq->table[i] = KV_BLOCK_NONE;
    n++;
  }
  seq->n_dropped = nd;
  return n;
}

uint32_t kv_seq_live_blocks(const struct kv_seq *seq) {
  return seq_blocks_for(seq->len, seq->block_size) - seq->n_dropped;
}

int kv_seq_skip_dropped(struct kv_seq *seq, uint32_t n_blocks) {
  if (seq->len || seq->n_blocks) return KVD_EINVAL;
  if ((uint64_t)n_blocks * seq->block_size > UINT32_MAX) return KVD_EOVERFLOW;
  int rc = seq_grow(seq, n_blocks);
  if (rc < 0) return rc;
  for (uint32_t i = 0; i < n_blocks; i++)
    seq->table[i] = KV_BLOCK_NONE;
  seq->n_blocks = seq->n_dropped = n_blocks;
  seq->len = n_blocks * seq->block_size;
  seq->shifted = n_blocks > 0;
  return 0;
}

int kv_seq_new_reserved(const struct kv_pool *pool, uint32_t n_tokens, struct kv_seq **ret_seq) {
  struct kv_seq *seq;
  int rc = kv_seq_new(pool, &seq);
  if (rc < 0) return rc;
  rc = seq_grow(seq, seq_blocks_for(n_tokens, seq->block_size));
  if (rc < 0) {
    free(seq);
    return rc;
  }
  *ret_seq = seq;
  return 0;
}

int kv_seq_fork_into(struct kv_pool *pool, const struct kv_seq *src, struct kv_seq *dst) {
  assert(pool->block_size == src->block_size && dst->len == 0 && dst->n_blocks == 0);
  uint32_t n = seq_blocks_for(src->len, src->block_size);
  assert(n <= src->n_blocks);
  if (n > dst->cap_blocks) return KVD_ERANGE; /* reserved for a shorter source */
  for (uint32_t i = 0; i < n; i++) {
    dst->table[i] = src->table[i];
    if (src->table[i] != KV_BLOCK_NONE) kv_pool_ref(pool, src->table[i]);
  }
  dst->n_blocks = n;
  dst->len = src->len;
  dst->n_hashed = src->n_hashed;
  dst->chain_key = src->chain_key;
  dst->n_dropped = src->n_dropped < n ? src->n_dropped : n;
  dst->drop_key = src->drop_key;
  dst->shifted = src->shifted;
  return 0;
}

int kv_seq_fork(struct kv_pool *pool, const struct kv_seq *src, struct kv_seq **ret_dst) {
  struct kv_seq *dst;
  int rc = kv_seq_new_reserved(pool, src->len, &dst);
  if (rc < 0) return rc;
  rc = kv_seq_fork_into(pool, src, dst);
  assert(rc == 0); /* reserved for exactly this source */
  *ret_dst = dst;
  return rc;
}

int kv_seq_plan_write(struct kv_pool *pool, struct kv_seq *seq, uint32_t pos,
                      struct kv_copy *ret_copy) {
  assert(pool->block_size == seq->block_size);
  uint32_t bs = seq->block_size;
  uint32_t i = pos / bs;
  if (i >= seq->n_blocks) return KVD_ERANGE;
  uint32_t old = seq->table[i];
  if (kv_pool_refcount(pool, old) <= 1) {
    /* Only this sequence sees the block, and its content is about to change: a key naming the
     * old content must go (kv.h says when this happens). Done now, not at commit: a device that
     * fails half-way through the step may already have written into the block. */
    if (pool->flags[old]) kv__prefix_forget(pool, old);
    if (seq->n_hashed > i) seq->n_hashed = i;
    return 0;
  }

  /* The fresh block is the step's until commit: no table holds it, so a step that fails hands
   * it back (kv_seq_cancel_copy) and every sequence still reads the original. */
  uint32_t fresh;
  int rc = kv_pool_alloc(pool, &fresh);
  if (rc < 0) return rc;
  /* The rows of the old block this sequence has written; the others never held its tokens. */
  uint32_t start = i * bs;
  uint32_t rows = seq->len > start ? seq->len - start : 0;
  if (rows > bs) rows = bs;
  ret_copy->src_block = old;
  ret_copy->dst_block = fresh;
  ret_copy->n_tokens = rows;
  ret_copy->index = i;
  return 1;
}

void kv_seq_commit_copy(struct kv_pool *pool, struct kv_seq *seq, const struct kv_copy *cp) {
  assert(cp->index < seq->n_blocks && seq->table[cp->index] == cp->src_block);
  seq->table[cp->index] = cp->dst_block;
  /* Block i now differs from the keyed original, and so does the history of every later one. */
  if (seq->n_hashed > cp->index) seq->n_hashed = cp->index;
  /* Cannot free it: it had another owner when planned, which keeps reading the original (if that
   * owner swapped in its own copy in the same step, this is the last reference and it goes). */
  kv_pool_unref(pool, cp->src_block);
  pool->cow_copies++;
}

void kv_seq_cancel_copy(struct kv_pool *pool, const struct kv_copy *cp) {
  kv_pool_unref(pool, cp->dst_block);
}

int kv_seq_prepare_write(struct kv_pool *pool, struct kv_seq *seq, uint32_t pos,
                         struct kv_copy *ret_copy) {
  struct kv_copy cp;
  int rc = kv_seq_plan_write(pool, seq, pos, &cp);
  if (rc != 1) return rc;
  kv_seq_commit_copy(pool, seq, &cp);
  *ret_copy = cp;
  return 1;
}

uint32_t kv_seq_step_blocks(const struct kv_pool *pool, const struct kv_seq *seq,
                            uint32_t n_new_tokens) {
  if (n_new_tokens == 0) return 0;
  if (n_new_tokens > UINT32_MAX - seq->len) return UINT32_MAX;
  uint32_t need = seq_blocks_for(seq->len + n_new_tokens, seq->block_size);
  uint32_t add = need > seq->n_blocks ? need - seq->n_blocks : 0;
  /* Blocks reserve appends are fresh; only one already in the table can be shared, and of
   * those only the one holding `len` is written. */
  uint32_t i = seq->len / seq->block_size;
  if (i < seq->n_blocks && kv_pool_refcount(pool, seq->table[i]) > 1) add++;
  return add;
}

int kv_seq_slot(const struct kv_seq *seq, uint32_t pos, struct kv_slot *ret_slot) {
  uint32_t i = pos / seq->block_size;
  if (i >= seq->n_blocks) return KVD_ERANGE;
  ret_slot->block = seq->table[i];
  ret_slot->offset = pos % seq->block_size;
  return 0;
}

size_t kv_mirror_entries(const struct kv_seq *const *seqs, uint32_t n_seqs) {
  size_t n = 0;
  for (uint32_t s = 0; s < n_seqs; s++)
    n += seqs[s]->n_blocks;
  return n;
}

int kv_mirror_write(const struct kv_seq *const *seqs, uint32_t n_seqs, uint32_t *dst,
                    size_t dst_len, uint32_t *ret_offsets) {
  size_t total = kv_mirror_entries(seqs, n_seqs);
  /* The offsets the shader reads are uint32; the count returned is an int. */
  if (total > INT32_MAX) return KVD_EOVERFLOW;
  if (total > dst_len) return KVD_ENOSPC;
  uint32_t at = 0;
  for (uint32_t s = 0; s < n_seqs; s++) {
    uint32_t n = seqs[s]->n_blocks;
    if (n) memcpy(dst + at, seqs[s]->table, (size_t)n * sizeof *dst);
    ret_offsets[s] = at;
    at += n;
  }
  return (int)total;
}
