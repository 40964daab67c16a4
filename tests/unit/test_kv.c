/* The paged KV cache's bookkeeping: the block pool (free list, refcounts, counters), block tables
 * (lazy reserve, atomic exhaustion, commit, truncate, free), fork + copy-on-write, slot addressing,
 * the packed table mirror, pool sizing, and a randomized stress test that writes token ids into a
 * fake device memory through the tables and checks every sequence still reads its own tokens.
 * Then the prefix cache: registration and reuse, chained keys, blocks cached after free, LRU
 * eviction, copy-on-write of cached blocks, and a second stress test mixing prefix hits, forks,
 * rewinds and frees against a shadow model whose values depend on the whole history, checking the
 * refcount, free-list, LRU and key-table invariants after every operation. */
#include "kv.h"
#include "kt.h"
#include "kv_internal.h"
#include "kvd_error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

static void check_stats(const struct kv_pool *pool, uint32_t free_blocks, uint32_t hw) {
  struct kv_pool_stats st;
  kv_pool_stats(pool, &st);
  KT_CHECK_EQ(st.total, pool->n_blocks);
  KT_CHECK_EQ(st.free, free_blocks);
  KT_CHECK_EQ(st.used, pool->n_blocks - free_blocks - st.cached); /* cached: neither */
  KT_CHECK_EQ(st.high_water, hw);
}

/* A sequence of n committed tokens. */
static struct kv_seq *seq_with(struct kv_pool *pool, uint32_t n) {
  struct kv_seq *seq;
  if (kv_seq_new(pool, &seq) < 0) return NULL;
  if (kv_seq_reserve(pool, seq, n) < 0 || kv_seq_commit(seq, n) < 0) {
    kv_seq_free(pool, seq);
    return NULL;
  }
  return seq;
}

KT_TEST(pool_init_and_counters) {
  struct kv_pool pool;
  KT_CHECK_EQ(kv_pool_init(&pool, 0, 16), KVD_EINVAL);
  KT_CHECK_EQ(kv_pool_init(&pool, KV_BLOCK_NONE, 1), KVD_EINVAL);
  KT_CHECK_EQ(kv_pool_init(&pool, 1u << 29, 16), KVD_EINVAL); /* 2^33 slots: not uint32 */
  kv_pool_destroy(&pool);                                     /* zeroed by the failed init */

  KT_ASSERT_OK(kv_pool_init(&pool, 8, 0));
  KT_CHECK_EQ(pool.block_size, KV_BLOCK_SIZE_DEFAULT);
  check_stats(&pool, 8, 0);

  uint32_t b[8];
  for (uint32_t i = 0; i < 8; i++) {
    KT_ASSERT_OK(kv_pool_alloc(&pool, &b[i]));
    KT_CHECK_EQ(b[i], i); /* a fresh pool hands out 0, 1, 2 ... */
    KT_CHECK_EQ(kv_pool_refcount(&pool, b[i]), 1);
  }
  check_stats(&pool, 0, 8);
  uint32_t x = 1234;
  KT_CHECK_EQ(kv_pool_alloc(&pool, &x), KVD_E_KV_EXHAUSTED);
  KT_CHECK_EQ(x, 1234); /* ret_ written only on success */

  /* LIFO: the block freed last is the next one handed out. */
  kv_pool_unref(&pool, b[5]);
  kv_pool_unref(&pool, b[2]);
  check_stats(&pool, 2, 8);
  KT_ASSERT_OK(kv_pool_alloc(&pool, &x));
  KT_CHECK_EQ(x, b[2]);
  KT_ASSERT_OK(kv_pool_alloc(&pool, &x));
  KT_CHECK_EQ(x, b[5]);

  for (uint32_t i = 0; i < 8; i++)
    kv_pool_unref(&pool, b[i]);
  check_stats(&pool, 8, 8); /* high-water mark remembers the peak */
  struct kv_pool_stats st;
  kv_pool_stats(&pool, &st);
  KT_CHECK_EQ(st.alloc_failures, 1);
  KT_CHECK_EQ(st.block_size, 16);
  KT_CHECK_EQ(kv_pool_refcount(&pool, 8), 0); /* out of range reads as free */
  kv_pool_destroy(&pool);
}

KT_TEST(pool_refcounts_hold_blocks) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 4, 4));
  uint32_t b;
  KT_ASSERT_OK(kv_pool_alloc(&pool, &b));
  kv_pool_ref(&pool, b);
  kv_pool_ref(&pool, b);
  KT_CHECK_EQ(kv_pool_refcount(&pool, b), 3);
  kv_pool_unref(&pool, b);
  kv_pool_unref(&pool, b);
  check_stats(&pool, 3, 1); /* still held by its last owner */
  kv_pool_unref(&pool, b);
  check_stats(&pool, 4, 1);
  KT_CHECK_EQ(kv_pool_refcount(&pool, b), 0);
  kv_pool_destroy(&pool);
}

/* O(1) by construction (a stack pop or push per block): a million blocks go out and back in any
 * order with no search, every id handed out exactly once, and nothing lost. */
KT_TEST(pool_alloc_free_at_scale) {
  const uint32_t n = 1u << 20;
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, n, 16));
  uint32_t *ids = malloc((size_t)n * sizeof *ids);
  uint8_t *seen = calloc(n, 1);
  KT_ASSERT(ids && seen);
  for (int round = 0; round < 3; round++) {
    memset(seen, 0, n);
    for (uint32_t i = 0; i < n; i++) {
      KT_ASSERT_OK(kv_pool_alloc(&pool, &ids[i]));
      KT_ASSERT(ids[i] < n && !seen[ids[i]]);
      seen[ids[i]] = 1;
    }
    uint32_t x;
    KT_ASSERT_EQ(kv_pool_alloc(&pool, &x), KVD_E_KV_EXHAUSTED);
    for (uint32_t i = n - 1; i > 0; i--) { /* free in a random order */
      uint32_t j = kt_rand_range(0, i), t = ids[i];
      ids[i] = ids[j];
      ids[j] = t;
    }
    for (uint32_t i = 0; i < n; i++)
      kv_pool_unref(&pool, ids[i]);
    check_stats(&pool, n, n);
  }
  free(ids);
  free(seen);
  kv_pool_destroy(&pool);
}

KT_TEST(pool_alloc_n_is_all_or_nothing) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 4, 16));
  uint32_t b[5] = {99, 99, 99, 99, 99};
  KT_CHECK_EQ(kv_pool_alloc_n(&pool, 5, b), KVD_E_KV_EXHAUSTED);
  check_stats(&pool, 4, 0);
  KT_CHECK_EQ(b[0], 99);
  KT_ASSERT_OK(kv_pool_alloc_n(&pool, 4, b));
  check_stats(&pool, 0, 4);
  KT_ASSERT_OK(kv_pool_alloc_n(&pool, 0, b)); /* nothing asked, nothing refused */
  for (int i = 0; i < 4; i++)
    kv_pool_unref(&pool, b[i]);
  struct kv_pool_stats st;
  kv_pool_stats(&pool, &st);
  KT_CHECK_EQ(st.alloc_failures, 1);
  kv_pool_destroy(&pool);
}

KT_TEST(reserve_appends_blocks_only_as_tokens_need_them) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 16, 16));
  struct kv_seq *s;
  KT_ASSERT_OK(kv_seq_new(&pool, &s));
  KT_CHECK_EQ(s->n_blocks, 0);
  KT_CHECK_EQ(kv_seq_commit(s, 1), KVD_ERANGE); /* nothing reserved */
  KT_ASSERT_OK(kv_seq_reserve(&pool, s, 0));
  KT_CHECK_EQ(s->n_blocks, 0);
  KT_ASSERT_OK(kv_seq_reserve(&pool, s, 1));
  KT_CHECK_EQ(s->n_blocks, 1);
  KT_ASSERT_OK(kv_seq_reserve(&pool, s, 16)); /* still fits the first block */
  KT_CHECK_EQ(s->n_blocks, 1);
  KT_ASSERT_OK(kv_seq_reserve(&pool, s, 17));
  KT_CHECK_EQ(s->n_blocks, 2);
  check_stats(&pool, 14, 2);
  KT_ASSERT_OK(kv_seq_commit(s, 17));
  KT_CHECK_EQ(s->len, 17);
  KT_CHECK_EQ(kv_seq_commit(s, 16), KVD_ERANGE); /* capacity is 32 */
  KT_ASSERT_OK(kv_seq_commit(s, 15));
  KT_CHECK_EQ(s->len, 32);
  /* One token at a time: a new block exactly at every block boundary. */
  for (uint32_t i = 0; i < 40; i++) {
    KT_ASSERT_OK(kv_seq_reserve(&pool, s, 1));
    KT_ASSERT_OK(kv_seq_commit(s, 1));
    KT_CHECK_EQ(s->n_blocks, (s->len + 15) / 16);
  }
  KT_CHECK_EQ(kv_seq_reserve(&pool, s, UINT32_MAX), KVD_EOVERFLOW);
  kv_seq_free(&pool, s);
  kv_seq_free(&pool, NULL);
  check_stats(&pool, 16, 5);
  kv_pool_destroy(&pool);
}

KT_TEST(exhaustion_is_typed_and_changes_nothing) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 10, 4));
  struct kv_seq *a = seq_with(&pool, 23); /* 6 blocks */
  struct kv_seq *b = seq_with(&pool, 10); /* 3 blocks */
  KT_ASSERT(a && b);
  check_stats(&pool, 1, 9);
  uint32_t ta[6], tb[3];
  memcpy(ta, a->table, sizeof ta);
  memcpy(tb, b->table, sizeof tb);

  /* b needs 2 more blocks for 6 more tokens (10 + 6 = 16 = 4 blocks... 12 + 4): only 1 is free. */
  KT_CHECK_EQ(kv_seq_step_blocks(&pool, b, 7), 2);
  KT_CHECK_EQ(kv_seq_reserve(&pool, b, 7), KVD_E_KV_EXHAUSTED);
  KT_CHECK_EQ(b->len, 10);
  KT_CHECK_EQ(b->n_blocks, 3);
  KT_CHECK(memcmp(b->table, tb, sizeof tb) == 0);
  KT_CHECK_EQ(a->len, 23);
  KT_CHECK_EQ(a->n_blocks, 6);
  KT_CHECK(memcmp(a->table, ta, sizeof ta) == 0);
  check_stats(&pool, 1, 9);
  struct kv_pool_stats st;
  kv_pool_stats(&pool, &st);
  KT_CHECK_EQ(st.alloc_failures, 1);

  /* What does fit still works, and then the pool is exactly full. */
  KT_ASSERT_OK(kv_seq_reserve(&pool, b, 6));
  KT_ASSERT_OK(kv_seq_commit(b, 6));
  check_stats(&pool, 0, 10);
  KT_CHECK_EQ(kv_seq_reserve(&pool, a, 1), 0); /* a's last block has room: no block needed */
  KT_CHECK_EQ(kv_seq_reserve(&pool, a, 2), KVD_E_KV_EXHAUSTED);
  KT_CHECK(memcmp(a->table, ta, sizeof ta) == 0);

  /* A client going away frees its blocks; the other can then grow. */
  kv_seq_free(&pool, a);
  check_stats(&pool, 6, 10);
  KT_ASSERT_OK(kv_seq_reserve(&pool, b, 24));
  KT_CHECK_EQ(b->n_blocks, 10);
  KT_CHECK(memcmp(b->table, tb, sizeof tb) == 0); /* old blocks keep their places */
  kv_seq_free(&pool, b);
  check_stats(&pool, 10, 10);
  kv_pool_destroy(&pool);
}

KT_TEST(freeing_sequences_returns_every_block) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 64, 8));
  struct kv_seq *s[8];
  for (int i = 0; i < 8; i++) {
    s[i] = seq_with(&pool, (uint32_t)(i * 7 + 1));
    KT_ASSERT(s[i]);
  }
  struct kv_seq *f;
  KT_ASSERT_OK(kv_seq_fork(&pool, s[7], &f));
  KT_ASSERT_OK(kv_seq_reserve(&pool, s[3], 30)); /* reserved, never committed */
  for (int i = 7; i >= 0; i -= 2)
    kv_seq_free(&pool, s[i]);
  kv_seq_free(&pool, f);
  for (int i = 6; i >= 0; i -= 2)
    kv_seq_free(&pool, s[i]);
  struct kv_pool_stats st;
  kv_pool_stats(&pool, &st);
  KT_CHECK_EQ(st.free, 64);
  KT_CHECK_EQ(st.used, 0);
  for (uint32_t b = 0; b < 64; b++)
    KT_CHECK_EQ(kv_pool_refcount(&pool, b), 0);
  kv_pool_destroy(&pool);
}

KT_TEST(fork_shares_and_copy_on_write_splits) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 8, 4));
  struct kv_seq *a = seq_with(&pool, 10); /* blocks 0 1 2, the last half full */
  KT_ASSERT(a);
  KT_ASSERT_OK(kv_seq_reserve(&pool, a, 6)); /* a 4th block, reserved only */
  KT_CHECK_EQ(a->n_blocks, 4);
  struct kv_seq *b;
  KT_ASSERT_OK(kv_seq_fork(&pool, a, &b));
  KT_CHECK_EQ(b->len, 10);
  KT_CHECK_EQ(b->n_blocks, 3); /* the reserved block holds nothing to share */
  for (uint32_t i = 0; i < 3; i++) {
    KT_CHECK_EQ(b->table[i], a->table[i]);
    KT_CHECK_EQ(kv_pool_refcount(&pool, a->table[i]), 2);
  }
  KT_CHECK_EQ(kv_pool_refcount(&pool, a->table[3]), 1);
  check_stats(&pool, 4, 4); /* sharing costs no blocks */

  /* a appends at 10: the block holding it is shared, so it is copied first. */
  KT_CHECK_EQ(kv_seq_step_blocks(&pool, a, 1), 1);
  uint32_t old = a->table[2];
  struct kv_copy cp = {0, 0, 0, 0};
  KT_ASSERT_EQ(kv_seq_prepare_write(&pool, a, 10, &cp), 1);
  KT_CHECK_EQ(cp.src_block, old);
  KT_CHECK_EQ(cp.dst_block, a->table[2]);
  KT_CHECK(cp.dst_block != old);
  KT_CHECK_EQ(cp.n_tokens, 2);   /* positions 8 and 9 */
  KT_CHECK_EQ(b->table[2], old); /* b keeps reading the original */
  KT_CHECK_EQ(kv_pool_refcount(&pool, old), 1);
  KT_CHECK_EQ(kv_pool_refcount(&pool, cp.dst_block), 1);
  check_stats(&pool, 3, 5);
  /* Now a's own: no second copy, and b's block is b's alone too. */
  KT_CHECK_EQ(kv_seq_step_blocks(&pool, a, 1), 0);
  KT_CHECK_EQ(kv_seq_prepare_write(&pool, a, 11, &cp), 0);
  KT_CHECK_EQ(kv_seq_prepare_write(&pool, b, 10, &cp), 0);
  KT_ASSERT_OK(kv_seq_commit(a, 2));

  /* Rewriting an old position of a shared full block copies all its rows. */
  KT_ASSERT_EQ(kv_seq_prepare_write(&pool, b, 1, &cp), 1);
  KT_CHECK_EQ(cp.src_block, a->table[0]);
  KT_CHECK_EQ(cp.n_tokens, 4);
  KT_CHECK_EQ(kv_seq_prepare_write(&pool, b, 12, &cp), KVD_ERANGE); /* past b's capacity */
  struct kv_pool_stats st;
  kv_pool_stats(&pool, &st);
  KT_CHECK_EQ(st.cow_copies, 2);

  /* A copy the pool cannot supply is refused with nothing changed. */
  struct kv_seq *fill = seq_with(&pool, 8); /* takes the last 2 free blocks */
  KT_ASSERT(fill);
  check_stats(&pool, 0, 8);
  KT_CHECK_EQ(kv_pool_refcount(&pool, a->table[1]), 2);
  uint32_t a1 = a->table[1];
  cp.src_block = 77;
  KT_CHECK_EQ(kv_seq_prepare_write(&pool, a, 5, &cp), KVD_E_KV_EXHAUSTED);
  KT_CHECK_EQ(cp.src_block, 77);
  KT_CHECK_EQ(a->table[1], a1);
  KT_CHECK_EQ(b->table[1], a1);
  KT_CHECK_EQ(kv_pool_refcount(&pool, a1), 2);

  kv_seq_free(&pool, a);
  kv_seq_free(&pool, fill);
  KT_CHECK_EQ(kv_pool_refcount(&pool, a1), 1); /* b still holds it */
  kv_seq_free(&pool, b);
  check_stats(&pool, 8, 8);
  kv_pool_destroy(&pool);
}

/* Copy-on-write in two phases: planning takes the fresh block but leaves the table alone, so a
 * step that fails between plan and commit leaves a forked sequence reading exactly what it read
 * (before, the swap happened at once and a failed step left a never-filled block in the table). */
KT_TEST(copy_on_write_is_two_phase) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 8, 4));
  struct kv_seq *a = seq_with(&pool, 6); /* blocks 0 1, the second half full */
  KT_ASSERT(a);
  struct kv_seq *b;
  KT_ASSERT_OK(kv_seq_fork(&pool, a, &b));
  uint32_t shared = a->table[1];
  check_stats(&pool, 6, 2);

  /* Plan a's write at 6, then the step fails: the table, the refcounts and the pool are as
   * before. */
  KT_ASSERT_OK(kv_seq_reserve(&pool, a, 1));
  struct kv_copy cp = {0};
  KT_ASSERT_EQ(kv_seq_plan_write(&pool, a, 6, &cp), 1);
  KT_CHECK_EQ(cp.src_block, shared);
  KT_CHECK_EQ(cp.index, 1);
  KT_CHECK_EQ(cp.n_tokens, 2);
  KT_CHECK(cp.dst_block != shared);
  KT_CHECK_EQ(a->table[1], shared); /* not swapped until commit */
  KT_CHECK_EQ(kv_pool_refcount(&pool, shared), 2);
  KT_CHECK_EQ(kv_pool_refcount(&pool, cp.dst_block), 1);
  check_stats(&pool, 5, 3);
  kv_seq_cancel_copy(&pool, &cp);
  KT_ASSERT_OK(kv_seq_truncate(&pool, a, 6));
  KT_CHECK_EQ(a->table[1], shared);
  KT_CHECK_EQ(b->table[1], shared);
  KT_CHECK_EQ(kv_pool_refcount(&pool, shared), 2);
  check_stats(&pool, 6, 3);
  struct kv_pool_stats st;
  kv_pool_stats(&pool, &st);
  KT_CHECK_EQ(st.cow_copies, 0); /* a cancelled copy is no copy */

  /* Both sharers write in one step: each plans its own copy (the step counted both), and after
   * both commit the original has no holder left. */
  KT_CHECK_EQ(kv_seq_step_blocks(&pool, a, 1) + kv_seq_step_blocks(&pool, b, 1), 2);
  struct kv_copy ca, cb;
  KT_ASSERT_EQ(kv_seq_plan_write(&pool, a, 6, &ca), 1);
  KT_ASSERT_EQ(kv_seq_plan_write(&pool, b, 6, &cb), 1);
  KT_CHECK(ca.dst_block != cb.dst_block);
  kv_seq_commit_copy(&pool, a, &ca);
  kv_seq_commit_copy(&pool, b, &cb);
  KT_CHECK_EQ(a->table[1], ca.dst_block);
  KT_CHECK_EQ(b->table[1], cb.dst_block);
  KT_CHECK_EQ(kv_pool_refcount(&pool, shared), 0);
  kv_pool_stats(&pool, &st);
  KT_CHECK_EQ(st.cow_copies, 2);
  /* Now private: nothing more to plan. */
  KT_CHECK_EQ(kv_seq_plan_write(&pool, a, 6, &cp), 0);

  kv_seq_free(&pool, a);
  kv_seq_free(&pool, b);
  check_stats(&pool, 8, 4);
  kv_pool_destroy(&pool);
}

KT_TEST(truncate_frees_whole_blocks_past_n) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 8, 4));
  struct kv_seq *a = seq_with(&pool, 10);
  KT_ASSERT(a);
  KT_ASSERT_OK(kv_seq_reserve(&pool, a, 6)); /* 4 blocks, 10 tokens */
  KT_CHECK_EQ(kv_seq_truncate(&pool, a, 11), KVD_ERANGE);
  KT_ASSERT_OK(kv_seq_truncate(&pool, a, 10)); /* drops the reserved block only */
  KT_CHECK_EQ(a->n_blocks, 3);
  check_stats(&pool, 5, 4);
  KT_ASSERT_OK(kv_seq_truncate(&pool, a, 5));
  KT_CHECK_EQ(a->len, 5);
  KT_CHECK_EQ(a->n_blocks, 2);
  KT_ASSERT_OK(kv_seq_truncate(&pool, a, 4)); /* exactly one full block */
  KT_CHECK_EQ(a->n_blocks, 1);
  check_stats(&pool, 7, 4);

  /* Truncating a forked sequence drops only its own references. */
  KT_ASSERT_OK(kv_seq_reserve(&pool, a, 8));
  KT_ASSERT_OK(kv_seq_commit(a, 8)); /* 12 tokens, 3 full blocks */
  struct kv_seq *b;
  KT_ASSERT_OK(kv_seq_fork(&pool, a, &b));
  KT_ASSERT_OK(kv_seq_truncate(&pool, a, 6));
  KT_CHECK_EQ(kv_pool_refcount(&pool, b->table[2]), 1);
  KT_CHECK_EQ(kv_pool_refcount(&pool, b->table[1]), 2);
  /* a writes at 6, inside the still shared block 1: that needs a copy of its 2 valid rows. */
  KT_CHECK_EQ(kv_seq_step_blocks(&pool, a, 1), 1);
  struct kv_copy cp;
  KT_ASSERT_EQ(kv_seq_prepare_write(&pool, a, 6, &cp), 1);
  KT_CHECK_EQ(cp.src_block, b->table[1]);
  KT_CHECK_EQ(cp.n_tokens, 2);
  KT_ASSERT_OK(kv_seq_truncate(&pool, a, 0));
  KT_CHECK_EQ(a->n_blocks, 0);
  kv_seq_free(&pool, a);
  kv_seq_free(&pool, b);
  check_stats(&pool, 8, 4);
  kv_pool_destroy(&pool);
}

KT_TEST(slot_addressing_across_block_boundaries) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 16, 4));
  struct kv_seq *a, *b;
  KT_ASSERT_OK(kv_seq_new(&pool, &a));
  KT_ASSERT_OK(kv_seq_new(&pool, &b));
  /* Interleaved growth so neither table is contiguous: a gets 0 2 4, b gets 1 3 5. */
  for (int i = 0; i < 3; i++) {
    KT_ASSERT_OK(kv_seq_reserve(&pool, a, 4));
    KT_ASSERT_OK(kv_seq_commit(a, 4));
    KT_ASSERT_OK(kv_seq_reserve(&pool, b, 4));
    KT_ASSERT_OK(kv_seq_commit(b, 4));
  }
  KT_CHECK_EQ(a->table[1], 2);
  KT_CHECK_EQ(b->table[2], 5);
  for (uint32_t pos = 0; pos < 12; pos++) {
    struct kv_slot sa, sb;
    KT_ASSERT_OK(kv_seq_slot(a, pos, &sa));
    KT_ASSERT_OK(kv_seq_slot(b, pos, &sb));
    KT_CHECK_EQ(sa.block, 2 * (pos / 4));
    KT_CHECK_EQ(sb.block, 2 * (pos / 4) + 1);
    KT_CHECK_EQ(sa.offset, pos % 4);
    KT_CHECK_EQ(kv_slot_index(sa, 4), 8 * (pos / 4) + pos % 4);
    KT_CHECK_EQ(kv_slot_index(sb, 4), 8 * (pos / 4) + 4 + pos % 4);
  }
  struct kv_slot s = {42, 42};
  KT_CHECK_EQ(kv_seq_slot(a, 12, &s), KVD_ERANGE);
  KT_CHECK_EQ(s.block, 42);
  /* Reserved but not yet committed positions are addressable: the forward pass writes them. */
  KT_ASSERT_OK(kv_seq_reserve(&pool, a, 1));
  KT_ASSERT_OK(kv_seq_slot(a, 15, &s));
  KT_CHECK_EQ(s.block, 6);
  KT_CHECK_EQ(s.offset, 3);
  kv_seq_free(&pool, a);
  kv_seq_free(&pool, b);
  kv_pool_destroy(&pool);
}

KT_TEST(mirror_is_packed_with_offsets) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 16, 4));
  struct kv_seq *a = seq_with(&pool, 9); /* 3 blocks */
  struct kv_seq *e = seq_with(&pool, 0); /* none */
  struct kv_seq *b = seq_with(&pool, 5); /* 2 blocks */
  KT_ASSERT(a && e && b);
  KT_ASSERT_OK(kv_seq_reserve(&pool, b, 4)); /* + 1 reserved: in the mirror too */
  const struct kv_seq *batch[3] = {a, e, b};
  KT_CHECK_EQ(kv_mirror_entries(batch, 3), 6);

  uint32_t dst[8], off[3];
  for (int i = 0; i < 8; i++)
    dst[i] = 0xdeadbeef;
  KT_CHECK_EQ(kv_mirror_write(batch, 3, dst, 5, off), KVD_ENOSPC);
  KT_CHECK_EQ(dst[0], 0xdeadbeef);
  KT_ASSERT_EQ(kv_mirror_write(batch, 3, dst, 8, off), 6);
  KT_CHECK_EQ(off[0], 0);
  KT_CHECK_EQ(off[1], 3);
  KT_CHECK_EQ(off[2], 3);
  uint32_t want[6] = {0, 1, 2, 3, 4, 5};
  KT_CHECK(memcmp(dst, want, sizeof want) == 0);
  KT_CHECK_EQ(dst[6], 0xdeadbeef); /* nothing past the entries */
  /* Read it the way attn_paged.comp does: tables[table_offset + pos / block_size]. */
  for (uint32_t s = 0; s < 3; s += 2) {
    for (uint32_t pos = 0; pos < batch[s]->n_blocks * 4; pos++) {
      struct kv_slot sl;
      KT_ASSERT_OK(kv_seq_slot(batch[s], pos, &sl));
      KT_CHECK_EQ(dst[off[s] + pos / pool.block_size], sl.block);
    }
  }
  KT_CHECK_EQ(kv_mirror_write(batch, 0, dst, 0, off), 0);
  kv_seq_free(&pool, a);
  kv_seq_free(&pool, e);
  kv_seq_free(&pool, b);
  kv_pool_destroy(&pool);
}

KT_TEST(sizing_fits_budget_and_binding_cap) {
  /* 2 layers, 4 KV heads x 64 dims of f16: 512 bytes per token per buffer, 8 KiB per block, 4
   * buffers, so each block id costs 32 KiB. */
  struct kv_geometry g = {.n_layer = 2, .block_size = 16, .token_bytes = 4 * 64 * 2};
  struct kv_plan p;
  KT_ASSERT_OK(kv_plan_pool(&g, 1u << 20, 0, 0, &p));
  KT_CHECK_EQ(p.n_blocks, 32);
  KT_CHECK_EQ(p.n_buffers, 4);
  KT_CHECK_EQ(p.block_bytes, 8192);
  KT_CHECK_EQ(p.buffer_bytes, 32 * 8192);
  KT_CHECK_EQ(p.total_bytes, 1u << 20);
  KT_CHECK(!p.binding_limited);
  KT_ASSERT_OK(kv_plan_pool(&g, (1u << 20) + 32767, 0, 0, &p)); /* rounds down */
  KT_CHECK_EQ(p.n_blocks, 32);

  /* A 64 KiB binding cap holds 8 blocks per buffer, whatever the budget. */
  KT_ASSERT_OK(kv_plan_pool(&g, 1u << 20, 65536, 0, &p));
  KT_CHECK_EQ(p.n_blocks, 8);
  KT_CHECK(p.binding_limited);
  KT_CHECK(p.buffer_bytes <= 65536);
  KT_ASSERT_OK(kv_plan_pool(&g, 1u << 20, 65535, 0, &p));
  KT_CHECK_EQ(p.n_blocks, 7);
  /* Alignment padding (4 x 255 bytes worst case) comes off the budget first. */
  KT_ASSERT_OK(kv_plan_pool(&g, 1u << 20, 0, 256, &p));
  KT_CHECK_EQ(p.n_blocks, 31);
  KT_CHECK(p.total_bytes + 4 * 255 <= (1u << 20));

  KT_CHECK_EQ(kv_plan_pool(&g, 1u << 20, 8191, 0, &p), KVD_E_LIMIT);
  KT_CHECK_EQ(kv_plan_pool(&g, 32767, 0, 0, &p), KVD_E_KV_EXHAUSTED);
  KT_CHECK_EQ(kv_plan_pool(&g, 32768, 0, 0, &p), 0);
  KT_CHECK_EQ(kv_plan_pool(&g, 1u << 20, 0, 3, &p), KVD_EINVAL);
  struct kv_geometry bad = g;
  bad.n_layer = 0;
  KT_CHECK_EQ(kv_plan_pool(&bad, 1u << 20, 0, 0, &p), KVD_EINVAL);
  bad = g;
  bad.token_bytes = 0;
  KT_CHECK_EQ(kv_plan_pool(&bad, 1u << 20, 0, 0, &p), KVD_EINVAL);
  bad = g;
  bad.token_bytes = UINT64_MAX / 8;
  KT_CHECK_EQ(kv_plan_pool(&bad, UINT64_MAX, 0, 0, &p), KVD_EOVERFLOW);

  /* Default block size, and the uint32 slot-index ceiling on a huge budget. */
  struct kv_geometry tiny = {.n_layer = 1, .block_size = 0, .token_bytes = 1};
  KT_ASSERT_OK(kv_plan_pool(&tiny, UINT64_MAX, 0, 0, &p));
  KT_CHECK_EQ(p.block_bytes, 16);
  KT_CHECK_EQ(p.n_blocks, 1u << 28); /* 2^28 blocks x 16 = 2^32 slots */
  struct kv_pool pool;
  KT_CHECK_EQ(kv_pool_init(&pool, p.n_blocks + 1, 16), KVD_EINVAL);

  /* A 7B-class model (32 layers, 32 KV heads x 128, f16) with 8 GiB: 8 MiB per block id. */
  struct kv_geometry big = {.n_layer = 32, .block_size = 16, .token_bytes = 32 * 128 * 2};
  KT_ASSERT_OK(kv_plan_pool(&big, 8ull << 30, 4ull << 30, 0, &p));
  KT_CHECK_EQ(p.n_blocks, 1024);
  KT_CHECK_EQ(p.n_buffers, 64);
  KT_CHECK(!p.binding_limited);
  KT_ASSERT_OK(kv_plan_pool(&big, 8ull << 30, 64ull << 20, 0, &p)); /* a 64 MiB binding cap */
  KT_CHECK_EQ(p.n_blocks, 512);
  KT_CHECK(p.binding_limited);

  KT_CHECK_EQ(kv_budget_fraction(1000, 0.9), 900);
  KT_CHECK_EQ(kv_budget_fraction(1000, 1.5), 1000);
  KT_CHECK_EQ(kv_budget_fraction(1000, -1.0), 0);
  KT_CHECK_EQ(kv_budget_fraction(1000, NAN), 0);
  KT_CHECK_EQ(kv_budget_fraction(UINT64_MAX, 0.5), UINT64_MAX / 2);
  KT_CHECK_EQ(kv_budget_fraction(24ull << 30, 0.75), 18ull << 30);
}

/* ---- randomized stress ------------------------------------------------------------------------
 */

#define ST_SEQS 24

struct st_seq {
  struct kv_seq *seq; /* NULL = slot empty */
  uint32_t *tokens;   /* what positions [0, len) must read back */
  uint32_t cap;
};

struct st {
  struct kv_pool pool;
  uint32_t *mem; /* fake device memory: one uint32 "K/V row" per slot */
  struct st_seq s[ST_SEQS];
  uint32_t *refs; /* recomputed from the tables */
  uint64_t ops[6];
};

static bool st_fit(struct st_seq *ss, uint32_t n) {
  if (n <= ss->cap) return true;
  uint32_t cap = ss->cap ? ss->cap : 16;
  while (cap < n)
    cap *= 2;
  uint32_t *t = realloc(ss->tokens, cap * sizeof *t);
  if (!t) return false;
  ss->tokens = t;
  ss->cap = cap;
  return true;
}

/* Writes value v at pos the way the engine would: copy-on-write first, then the slot. Returns a
 * kvd code; on KV_EXHAUSTED nothing was written. */
static int st_write(struct st *st, struct kv_seq *seq, uint32_t pos, uint32_t v) {
  struct kv_copy cp;
  int rc = kv_seq_prepare_write(&st->pool, seq, pos, &cp);
  if (rc < 0) return rc;
  uint32_t bs = st->pool.block_size;
  if (rc == 1) {
    KT_CHECK(cp.n_tokens <= bs);
    memcpy(&st->mem[(size_t)cp.dst_block * bs], &st->mem[(size_t)cp.src_block * bs],
           cp.n_tokens * sizeof *st->mem);
  }
  struct kv_slot sl;
  rc = kv_seq_slot(seq, pos, &sl);
  if (rc < 0) return rc;
  /* The heart of copy-on-write: nobody ever writes into a block someone else can see. */
  if (kv_pool_refcount(&st->pool, sl.block) != 1) {
    kt__fail(__FILE__, __LINE__, "write into block %u with refcount %u", sl.block,
             kv_pool_refcount(&st->pool, sl.block));
    return KVD_EINVAL;
  }
  st->mem[kv_slot_index(sl, bs)] = v;
  return 0;
}

static bool st_check(struct st *st) {
  struct kv_pool *pool = &st->pool;
  uint32_t nb = pool->n_blocks, bs = pool->block_size;
  memset(st->refs, 0, nb * sizeof *st->refs);
  for (int i = 0; i < ST_SEQS; i++) {
    struct kv_seq *q = st->s[i].seq;
    if (!q) continue;
    if ((uint64_t)q->n_blocks * bs < q->len) {
      kt__fail(__FILE__, __LINE__, "seq %d: %u tokens in %u blocks", i, q->len, q->n_blocks);
      return false;
    }
    for (uint32_t b = 0; b < q->n_blocks; b++) {
      uint32_t id = q->table[b];
      if (id >= nb) {
        kt__fail(__FILE__, __LINE__, "seq %d: block id %u out of range", i, id);
        return false;
      }
      st->refs[id]++;
    }
    /* Every position still reads what this sequence wrote there. */
    for (uint32_t pos = 0; pos < q->len; pos++) {
      uint32_t got = st->mem[(size_t)q->table[pos / bs] * bs + pos % bs];
      if (got != st->s[i].tokens[pos]) {
        kt__fail(__FILE__, __LINE__, "seq %d pos %u: read %u, wrote %u", i, pos, got,
                 st->s[i].tokens[pos]);
        return false;
      }
    }
  }
  uint32_t zero = 0;
  for (uint32_t b = 0; b < nb; b++) {
    if (st->refs[b] != pool->refs[b]) {
      kt__fail(__FILE__, __LINE__, "block %u: refcount %u, %u tables hold it", b, pool->refs[b],
               st->refs[b]);
      return false;
    }
    zero += pool->refs[b] == 0;
  }
  if (zero != pool->n_free) {
    kt__fail(__FILE__, __LINE__, "%u blocks unreferenced but %u on the free list", zero,
             pool->n_free);
    return false;
  }
  /* The free list holds exactly the unreferenced blocks, each once (refs doubles as a marker). */
  for (uint32_t i = 0; i < pool->n_free; i++) {
    uint32_t b = pool->free_ids[i];
    if (b >= nb || pool->refs[b] != 0 || st->refs[b] == UINT32_MAX) {
      kt__fail(__FILE__, __LINE__, "free list entry %u (block %u) is wrong", i, b);
      return false;
    }
    st->refs[b] = UINT32_MAX;
  }
  struct kv_pool_stats stats;
  kv_pool_stats(pool, &stats);
  if (stats.used > stats.high_water) {
    kt__fail(__FILE__, __LINE__, "used %u above high water %u", stats.used, stats.high_water);
    return false;
  }
  return true;
}

KT_TEST(stress_against_shadow_model) {
  for (int round = 0; round < 8; round++) {
    static const uint32_t sizes[] = {1, 2, 4, 16};
    struct st st;
    memset(&st, 0, sizeof st);
    uint32_t nb = kt_rand_range(8, 160), bs = sizes[kt_rand_range(0, 3)];
    KT_ASSERT_OK(kv_pool_init(&st.pool, nb, bs));
    st.mem = calloc((size_t)nb * bs, sizeof *st.mem);
    st.refs = calloc(nb, sizeof *st.refs);
    KT_ASSERT(st.mem && st.refs);
    uint32_t next_token = 1;
    bool ok = true;

    for (int it = 0; it < 20000 && ok; it++) {
      int i = (int)kt_rand_range(0, ST_SEQS - 1);
      struct st_seq *ss = &st.s[i];
      uint32_t op = kt_rand_range(0, 99);
      if (!ss->seq) {
        if (op < 60) {
          KT_ASSERT_OK(kv_seq_new(&st.pool, &ss->seq));
        } else {
          /* fork from a random live sequence into the empty slot */
          struct st_seq *src = &st.s[kt_rand_range(0, ST_SEQS - 1)];
          if (!src->seq) continue;
          uint32_t used = st.pool.n_blocks - st.pool.n_free;
          KT_ASSERT_OK(kv_seq_fork(&st.pool, src->seq, &ss->seq));
          KT_CHECK_EQ(st.pool.n_blocks - st.pool.n_free, used); /* sharing is free */
          KT_ASSERT(st_fit(ss, src->seq->len));
          if (src->seq->len) memcpy(ss->tokens, src->tokens, src->seq->len * sizeof *ss->tokens);
          st.ops[1]++;
        }
      } else if (op < 50) {
        /* append: reserve, copy-on-write, write, commit */
        struct kv_seq *q = ss->seq;
        uint32_t n = kt_rand_range(1, 3 * bs), len = q->len, blocks = q->n_blocks;
        uint32_t step = kv_seq_step_blocks(&st.pool, q, n), before = st.pool.n_free;
        int rc = kv_seq_reserve(&st.pool, q, n);
        if (rc == KVD_E_KV_EXHAUSTED) {
          KT_CHECK_EQ(q->n_blocks, blocks);
          KT_CHECK_EQ(st.pool.n_free, before);
          KT_CHECK(step > before);
        } else if (kt_rand_range(0, 3) == 0) {
          /* A step that fails after planning (the engine's host side, or the device half-way):
           * whatever it wrote went only into blocks no table holds yet, and the cancel and the
           * rewind give them back with every table as it was. */
          KT_ASSERT_OK(rc);
          struct kv_copy cp;
          int planned = kv_seq_plan_write(&st.pool, q, len, &cp);
          KT_ASSERT(planned >= 0 || planned == KVD_E_KV_EXHAUSTED);
          for (uint32_t k = 0; k < n && planned >= 0; k++) {
            struct kv_slot sl;
            KT_ASSERT_OK(kv_seq_slot(q, len + k, &sl));
            if (planned == 1 && (len + k) / bs == cp.index) sl.block = cp.dst_block;
            KT_CHECK_EQ(kv_pool_refcount(&st.pool, sl.block), 1);
            st.mem[kv_slot_index(sl, bs)] = 0xdeadu; /* never read back by anyone */
          }
          if (planned == 1) kv_seq_cancel_copy(&st.pool, &cp);
          KT_ASSERT_OK(kv_seq_truncate(&st.pool, q, len));
          KT_CHECK_EQ(q->len, len);
          /* Blocks an earlier abandoned append left reserved go too. */
          uint32_t whole = (len + bs - 1) / bs;
          KT_CHECK_EQ(q->n_blocks, whole);
          KT_CHECK_EQ(st.pool.n_free, before + (blocks - whole));
          st.ops[5]++;
        } else {
          KT_ASSERT_OK(rc);
          KT_ASSERT(st_fit(ss, len + n));
          uint32_t v = next_token;
          rc = st_write(&st, q, len, v);
          if (rc == KVD_E_KV_EXHAUSTED) {
            KT_CHECK(step > before); /* only the copy was missing */
          } else {
            KT_ASSERT_OK(rc);
            for (uint32_t k = 1; k < n && rc == 0; k++)
              rc = st_write(&st, q, len + k, v + k);
            KT_ASSERT_OK(rc); /* the rest are in blocks that are already private */
            for (uint32_t k = 0; k < n; k++)
              ss->tokens[len + k] = v + k;
            next_token += n;
            KT_ASSERT_OK(kv_seq_commit(q, n));
            KT_CHECK_EQ(before - st.pool.n_free, step);
            st.ops[0]++;
          }
        }
      } else if (op < 65) {
        /* rewrite an old position (copy-on-write in the middle of a shared prefix) */
        struct kv_seq *q = ss->seq;
        if (!q->len) continue;
        uint32_t pos = kt_rand_range(0, q->len - 1), before = st.pool.n_free;
        int rc = st_write(&st, q, pos, next_token);
        if (rc == KVD_E_KV_EXHAUSTED) {
          KT_CHECK_EQ(st.pool.n_free, before);
          KT_CHECK_EQ(before, 0);
        } else {
          KT_ASSERT_OK(rc);
          ss->tokens[pos] = next_token++;
          st.ops[2]++;
        }
      } else if (op < 80) {
        /* fork this one into another empty slot */
        int j = (int)kt_rand_range(0, ST_SEQS - 1);
        if (st.s[j].seq) continue;
        KT_ASSERT_OK(kv_seq_fork(&st.pool, ss->seq, &st.s[j].seq));
        KT_ASSERT(st_fit(&st.s[j], ss->seq->len));
        if (ss->seq->len) memcpy(st.s[j].tokens, ss->tokens, ss->seq->len * sizeof *ss->tokens);
        st.ops[1]++;
      } else if (op < 90) {
        struct kv_seq *q = ss->seq;
        uint32_t n = kt_rand_range(0, q->len);
        KT_ASSERT_OK(kv_seq_truncate(&st.pool, q, n));
        KT_CHECK_EQ(q->n_blocks, (n + bs - 1) / bs);
        st.ops[3]++;
      } else {
        kv_seq_free(&st.pool, ss->seq);
        ss->seq = NULL;
        st.ops[4]++;
      }
      ok = st_check(&st);
    }

    for (int i = 0; i < ST_SEQS; i++) {
      kv_seq_free(&st.pool, st.s[i].seq);
      free(st.s[i].tokens);
    }
    struct kv_pool_stats stats;
    kv_pool_stats(&st.pool, &stats);
    KT_CHECK_EQ(stats.free, nb);
    KT_CHECK_EQ(stats.used, 0);
    for (uint32_t b = 0; b < nb; b++)
      KT_CHECK_EQ(st.pool.refs[b], 0);
    kt_log("round %d: %u blocks of %u, %llu appends, %llu failed steps, %llu forks, %llu "
           "rewrites, %llu truncates, %llu frees, %llu copies, %llu refusals, high water %u",
           round, nb, bs, (unsigned long long)st.ops[0], (unsigned long long)st.ops[5],
           (unsigned long long)st.ops[1], (unsigned long long)st.ops[2],
           (unsigned long long)st.ops[3], (unsigned long long)st.ops[4],
           (unsigned long long)stats.cow_copies, (unsigned long long)stats.alloc_failures,
           stats.high_water);
    free(st.mem);
    free(st.refs);
    kv_pool_destroy(&st.pool);
    if (!ok) return;
  }
}

/* ---- prefix cache ---------------------------------------------------------------------------- */

/* A request the way the engine runs one: share the cached prefix of the prompt, compute (here:
 * reserve and commit) the rest, register the full blocks. NULL on any failure. */
static struct kv_seq *prefix_seq(struct kv_pool *pool, const int32_t *tokens, uint32_t n,
                                 uint32_t *ret_cached) {
  struct kv_seq *seq;
  uint32_t cached = 12345;
  if (kv_seq_new_with_prefix(pool, tokens, n, &seq, &cached) < 0) return NULL;
  if (cached != seq->len || kv_seq_reserve(pool, seq, n - cached) < 0 ||
      kv_seq_commit(seq, n - cached) < 0 || kv_seq_register_blocks(pool, seq, tokens, n) < 0) {
    kv_seq_free(pool, seq);
    return NULL;
  }
  if (ret_cached) *ret_cached = cached;
  return seq;
}

static void check_cache(const struct kv_pool *pool, uint32_t cached, uint32_t registered,
                        uint64_t lookups, uint64_t hits, uint64_t evictions) {
  struct kv_pool_stats st;
  kv_pool_stats(pool, &st);
  KT_CHECK_EQ(st.cached, cached);
  KT_CHECK_EQ(st.registered, registered);
  KT_CHECK_EQ(st.lookups, lookups);
  KT_CHECK_EQ(st.hits, hits);
  KT_CHECK_EQ(st.evictions, evictions);
  KT_CHECK_EQ(st.free + st.cached + st.used, st.total);
  KT_CHECK_EQ(kv_pool_available(pool), st.free + st.cached);
}

KT_TEST(prefix_registration_and_reuse) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 16, 4));
  int32_t tok[14];
  for (int i = 0; i < 14; i++)
    tok[i] = 100 + i;
  uint32_t cached = 99;

  /* The first request finds nothing and registers its 3 full blocks (not the partial 4th). */
  struct kv_seq *a = prefix_seq(&pool, tok, 14, &cached);
  KT_ASSERT(a);
  KT_CHECK_EQ(cached, 0);
  KT_CHECK_EQ(a->n_blocks, 4);
  KT_CHECK_EQ(a->n_hashed, 3);
  check_cache(&pool, 0, 3, 3, 0, 0);
  /* Registering again (nothing new is full) adds nothing; more than len is refused. */
  KT_CHECK_EQ(kv_seq_register_blocks(&pool, a, tok, 14), 0);
  KT_CHECK_EQ(kv_seq_register_blocks(&pool, a, tok, 15), KVD_EINVAL);

  /* The same 3-block prefix: all three shared, only the 2 tokens after them left to compute. */
  struct kv_seq *b;
  KT_ASSERT_OK(kv_seq_new_with_prefix(&pool, tok, 14, &b, &cached));
  KT_CHECK_EQ(cached, 12);
  KT_CHECK_EQ(b->len, 12);
  KT_CHECK_EQ(b->n_blocks, 3);
  for (uint32_t i = 0; i < 3; i++) {
    KT_CHECK_EQ(b->table[i], a->table[i]);
    KT_CHECK_EQ(kv_pool_refcount(&pool, a->table[i]), 2);
  }
  check_cache(&pool, 0, 3, 6, 3, 0);
  check_stats(&pool, 12, 4); /* a hit costs no block */
  /* Writing resumes at 12, in a fresh block: nothing shared is copied or written. */
  KT_CHECK_EQ(kv_seq_step_blocks(&pool, b, 2), 1);
  KT_ASSERT_OK(kv_seq_reserve(&pool, b, 2));
  struct kv_copy cp;
  KT_CHECK_EQ(kv_seq_prepare_write(&pool, b, 12, &cp), 0);
  KT_CHECK_EQ(kv_pool_refcount(&pool, b->table[3]), 1);
  KT_CHECK(b->table[3] != a->table[3]);
  KT_ASSERT_OK(kv_seq_commit(b, 2));

  /* A prompt of exactly 3 blocks reuses 2: the last block's tokens (and its last token's
   * logits) must be computed. Its own copy of block 3 duplicates a registered key: not added. */
  struct kv_seq *c;
  KT_ASSERT_OK(kv_seq_new_with_prefix(&pool, tok, 12, &c, &cached));
  KT_CHECK_EQ(cached, 8);
  KT_CHECK_EQ(c->n_blocks, 2);
  check_cache(&pool, 0, 3, 8, 5, 0);
  KT_ASSERT_OK(kv_seq_reserve(&pool, c, 4));
  KT_ASSERT_OK(kv_seq_commit(c, 4));
  KT_CHECK(c->table[2] != a->table[2]);
  KT_CHECK_EQ(kv_seq_register_blocks(&pool, c, tok, 12), 0);
  KT_CHECK_EQ(c->n_hashed, 3);
  KT_CHECK_EQ(pool.flags[c->table[2]], KV_BLOCK_KEYED);
  check_cache(&pool, 0, 3, 8, 5, 0);
  /* Freed, the duplicate goes back to the free list, not the cache. */
  uint32_t dup = c->table[2];
  kv_seq_free(&pool, c);
  KT_CHECK_EQ(pool.flags[dup], 0);
  check_cache(&pool, 0, 3, 8, 5, 0);

  /* Short prompts: nothing to reuse, nothing looked up. */
  KT_ASSERT_OK(kv_seq_new_with_prefix(&pool, tok, 4, &c, &cached));
  KT_CHECK_EQ(cached, 0);
  KT_CHECK_EQ(c->n_blocks, 0);
  kv_seq_free(&pool, c);
  KT_ASSERT_OK(kv_seq_new_with_prefix(&pool, NULL, 0, &c, &cached));
  KT_CHECK_EQ(cached, 0);
  kv_seq_free(&pool, c);
  KT_ASSERT_OK(kv_seq_new_with_prefix(&pool, tok, 5, &c, &cached)); /* one whole block + 1 */
  KT_CHECK_EQ(cached, 4);
  kv_seq_free(&pool, c);
  check_cache(&pool, 0, 3, 9, 6, 0);

  kv_seq_free(&pool, a);
  kv_seq_free(&pool, b);
  kv_pool_destroy(&pool);
}

KT_TEST(prefix_keys_chain_the_whole_history) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 32, 4));
  int32_t tok[13];
  for (int i = 0; i < 13; i++)
    tok[i] = i;
  struct kv_seq *a = prefix_seq(&pool, tok, 13, NULL);
  KT_ASSERT(a);

  /* Block 2 differs in one token: only block 1 matches, and block 3 (same tokens as a's block
   * 3, different history) does not either. */
  int32_t t2[13];
  memcpy(t2, tok, sizeof tok);
  t2[6] = 99;
  uint32_t cached;
  struct kv_seq *b = prefix_seq(&pool, t2, 13, &cached);
  KT_ASSERT(b);
  KT_CHECK_EQ(cached, 4);
  KT_CHECK_EQ(b->table[0], a->table[0]);
  KT_CHECK(b->table[2] != a->table[2]);
  /* b's blocks 2 and 3 have new keys (new histories), so they were registered. */
  check_cache(&pool, 0, 5, 6, 1, 0);

  /* Block 1 differs: nothing matches, though blocks 2 and 3 hold the same tokens as a's. */
  int32_t t3[13];
  memcpy(t3, tok, sizeof tok);
  t3[0] = -1;
  struct kv_seq *c = prefix_seq(&pool, t3, 13, &cached);
  KT_ASSERT(c);
  KT_CHECK_EQ(cached, 0);
  check_cache(&pool, 0, 8, 9, 1, 0);

  /* The keys are the documented chain: XXH3 of the block's tokens seeded with the parent key. */
  uint64_t k = KV_PREFIX_ROOT_KEY;
  for (uint32_t i = 0; i < 3; i++) {
    k = XXH3_64bits_withSeed(tok + 4 * i, 4 * sizeof *tok, k);
    KT_CHECK_EQ(pool.keys[a->table[i]], k);
    KT_CHECK_EQ(pool.flags[a->table[i]], KV_BLOCK_KEYED | KV_BLOCK_REGISTERED);
  }
  kv_seq_free(&pool, a);
  kv_seq_free(&pool, b);
  kv_seq_free(&pool, c);
  check_cache(&pool, 8, 8, 9, 1, 0);
  kv_pool_destroy(&pool);
}

KT_TEST(prefix_blocks_stay_cached_after_free) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 8, 4));
  int32_t tok[14];
  for (int i = 0; i < 14; i++)
    tok[i] = 7 * i;
  struct kv_seq *a = prefix_seq(&pool, tok, 14, NULL);
  KT_ASSERT(a);
  uint32_t ta[4];
  memcpy(ta, a->table, sizeof ta);
  kv_seq_free(&pool, a);
  /* The 3 registered blocks keep their content; the partial one is free. */
  check_stats(&pool, 5, 4);
  check_cache(&pool, 3, 3, 3, 0, 0);
  for (uint32_t i = 0; i < 3; i++)
    KT_CHECK_EQ(kv_pool_refcount(&pool, ta[i]), 0);
  KT_CHECK_EQ(pool.lru_head, ta[2]); /* released last block first: the chain's tail goes first */
  KT_CHECK_EQ(pool.lru_tail, ta[0]);

  /* The next request with that prefix gets them back, off the LRU list and in use again. */
  uint32_t cached;
  struct kv_seq *b = prefix_seq(&pool, tok, 14, &cached);
  KT_ASSERT(b);
  KT_CHECK_EQ(cached, 12);
  for (uint32_t i = 0; i < 3; i++) {
    KT_CHECK_EQ(b->table[i], ta[i]);
    KT_CHECK_EQ(kv_pool_refcount(&pool, ta[i]), 1);
  }
  check_cache(&pool, 0, 3, 6, 3, 0);
  check_stats(&pool, 4, 4);
  KT_CHECK_EQ(pool.lru_head, KV_BLOCK_NONE);

  /* Truncating into registered blocks: the cut-off full block is cached, the one cut in the
   * middle stays in the table and keeps its key until it is written. */
  KT_ASSERT_OK(kv_seq_truncate(&pool, b, 6));
  KT_CHECK_EQ(b->n_hashed, 1);
  check_cache(&pool, 1, 3, 6, 3, 0);
  KT_CHECK_EQ(pool.lru_head, ta[2]);
  KT_ASSERT_OK(kv_seq_reserve(&pool, b, 1));
  struct kv_copy cp;
  KT_CHECK_EQ(kv_seq_prepare_write(&pool, b, 6, &cp), 0); /* held alone: no copy, key dropped */
  KT_CHECK_EQ(pool.flags[ta[1]], 0);
  check_cache(&pool, 1, 2, 6, 3, 0);
  KT_ASSERT_OK(kv_seq_commit(b, 1));
  kv_seq_free(&pool, b);
  check_cache(&pool, 2, 2, 6, 3, 0); /* block 0 and the orphaned block 2 */
  /* Block 1 is gone from the cache, so the chain stops at block 0. */
  struct kv_seq *c;
  KT_ASSERT_OK(kv_seq_new_with_prefix(&pool, tok, 14, &c, &cached));
  KT_CHECK_EQ(cached, 4);
  kv_seq_free(&pool, c);
  kv_pool_destroy(&pool);
}

KT_TEST(prefix_shared_cached_blocks_are_copied_not_written) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 16, 4));
  int32_t tok[14];
  for (int i = 0; i < 14; i++)
    tok[i] = 3 * i + 1;
  struct kv_seq *a = prefix_seq(&pool, tok, 14, NULL);
  uint32_t cached;
  struct kv_seq *b = prefix_seq(&pool, tok, 14, &cached);
  KT_ASSERT(a && b);
  KT_CHECK_EQ(cached, 12);
  /* b rewinds into shared block 1 and writes there: a private copy, the original keeps its key
   * and stays registered for a. */
  uint32_t shared = b->table[1];
  KT_ASSERT_OK(kv_seq_truncate(&pool, b, 6));
  KT_CHECK_EQ(kv_seq_step_blocks(&pool, b, 1), 1);
  KT_ASSERT_OK(kv_seq_reserve(&pool, b, 1));
  struct kv_copy cp;
  KT_ASSERT_EQ(kv_seq_prepare_write(&pool, b, 6, &cp), 1);
  KT_CHECK_EQ(cp.src_block, shared);
  KT_CHECK_EQ(cp.n_tokens, 2);
  KT_CHECK_EQ(pool.flags[shared], KV_BLOCK_KEYED | KV_BLOCK_REGISTERED);
  KT_CHECK_EQ(pool.flags[b->table[1]], 0);
  KT_CHECK_EQ(kv_pool_refcount(&pool, shared), 1);
  KT_ASSERT_OK(kv_seq_commit(b, 1));

  /* A fork shares registered blocks and the hashed count; its copy of the partial block is
   * keyed once filled, under the same key as a's: a duplicate, not registered twice. */
  struct kv_seq *f;
  KT_ASSERT_OK(kv_seq_fork(&pool, a, &f));
  KT_CHECK_EQ(f->n_hashed, 3);
  KT_ASSERT_OK(kv_seq_reserve(&pool, f, 2));
  KT_ASSERT_EQ(kv_seq_prepare_write(&pool, f, 14, &cp), 1); /* a's partial block 3 is shared */
  KT_ASSERT_OK(kv_seq_commit(f, 2));
  int32_t more[16];
  memcpy(more, tok, sizeof tok);
  more[14] = 50;
  more[15] = 51;
  KT_CHECK_EQ(kv_seq_register_blocks(&pool, f, more, 16), 1);
  KT_CHECK_EQ(f->n_hashed, 4);
  kv_seq_free(&pool, f);
  kv_seq_free(&pool, a);
  kv_seq_free(&pool, b);
  struct kv_pool_stats st;
  kv_pool_stats(&pool, &st);
  KT_CHECK_EQ(st.used, 0);
  KT_CHECK_EQ(st.cached, 4);
  /* f's 4-block history comes back whole for a prompt one token longer. */
  int32_t longer[17];
  memcpy(longer, more, sizeof more);
  longer[16] = 0;
  struct kv_seq *g;
  KT_ASSERT_OK(kv_seq_new_with_prefix(&pool, longer, 17, &g, &cached));
  KT_CHECK_EQ(cached, 16);
  kv_seq_free(&pool, g);
  kv_pool_destroy(&pool);
}

KT_TEST(prefix_lru_eviction_order) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 6, 2));
  /* Three one-block histories x, y, z, cached in that order; w holds 2 blocks in use. */
  int32_t x[3] = {1, 1, 0}, y[3] = {2, 2, 0}, z[3] = {3, 3, 0}, w[4] = {4, 4, 4, 4};
  struct kv_seq *sx = prefix_seq(&pool, x, 2, NULL), *sy = prefix_seq(&pool, y, 2, NULL);
  struct kv_seq *sz = prefix_seq(&pool, z, 2, NULL), *sw = prefix_seq(&pool, w, 4, NULL);
  KT_ASSERT(sx && sy && sz && sw);
  uint32_t bx = sx->table[0], by = sy->table[0], bz = sz->table[0];
  kv_seq_free(&pool, sx);
  kv_seq_free(&pool, sy);
  kv_seq_free(&pool, sz);
  check_stats(&pool, 1, 5);
  check_cache(&pool, 3, 5, 1, 0, 0); /* w's 4-token prompt looked up 1 block */
  KT_CHECK_EQ(kv_pool_available(&pool), 4);

  /* The free block goes first: no eviction. */
  uint32_t b1, b2, b3, b4;
  KT_ASSERT_OK(kv_pool_alloc(&pool, &b1));
  check_cache(&pool, 3, 5, 1, 0, 0);
  /* Touch x: a hit makes it the most recently used once released again: order y, z, x. */
  uint32_t cached;
  struct kv_seq *s;
  KT_ASSERT_OK(kv_seq_new_with_prefix(&pool, x, 3, &s, &cached));
  KT_CHECK_EQ(cached, 2);
  KT_CHECK_EQ(s->table[0], bx);
  KT_CHECK_EQ(kv_pool_available(&pool), 2);
  kv_seq_free(&pool, s);
  check_cache(&pool, 3, 5, 2, 1, 0);

  /* Then the oldest cached block: y, and y's history is no longer found. */
  KT_ASSERT_OK(kv_pool_alloc(&pool, &b2));
  KT_CHECK_EQ(b2, by);
  KT_CHECK_EQ(pool.flags[by], 0);
  check_cache(&pool, 2, 4, 2, 1, 1);
  KT_ASSERT_OK(kv_seq_new_with_prefix(&pool, y, 3, &s, &cached));
  KT_CHECK_EQ(cached, 0);
  kv_seq_free(&pool, s);
  /* All or nothing: 3 blocks are not there (z and x are), nothing is evicted for a refusal. */
  uint32_t b[3] = {77, 77, 77};
  KT_CHECK_EQ(kv_pool_alloc_n(&pool, 3, b), KVD_E_KV_EXHAUSTED);
  KT_CHECK_EQ(b[0], 77);
  check_cache(&pool, 2, 4, 3, 1, 1);
  KT_ASSERT_OK(kv_pool_alloc(&pool, &b3));
  KT_CHECK_EQ(b3, bz);
  KT_ASSERT_OK(kv_pool_alloc(&pool, &b4));
  KT_CHECK_EQ(b4, bx);
  check_cache(&pool, 0, 2, 3, 1, 3); /* only w's blocks, in use, remain registered */
  /* Free and cached are both empty: exhausted, and w's blocks were never touched. */
  uint32_t none = 55;
  KT_CHECK_EQ(kv_pool_alloc(&pool, &none), KVD_E_KV_EXHAUSTED);
  KT_CHECK_EQ(none, 55);
  KT_CHECK_EQ(kv_seq_reserve(&pool, sw, 1), KVD_E_KV_EXHAUSTED);
  KT_CHECK_EQ(kv_pool_refcount(&pool, sw->table[0]), 1);
  KT_CHECK_EQ(kv_pool_refcount(&pool, sw->table[1]), 1);
  struct kv_pool_stats st;
  kv_pool_stats(&pool, &st);
  KT_CHECK_EQ(st.alloc_failures, 3);
  KT_CHECK_EQ(st.high_water, 6);

  /* Reserve and copy-on-write evict too: w's blocks cached, a new sequence takes them. */
  kv_pool_unref(&pool, b1);
  kv_pool_unref(&pool, b2);
  kv_pool_unref(&pool, b3);
  kv_pool_unref(&pool, b4);
  kv_seq_free(&pool, sw);
  check_cache(&pool, 2, 2, 3, 1, 3);
  struct kv_seq *big;
  KT_ASSERT_OK(kv_seq_new(&pool, &big));
  KT_ASSERT_OK(kv_seq_reserve(&pool, big, 12));
  check_cache(&pool, 0, 0, 3, 1, 5);
  kv_seq_free(&pool, big);
  check_stats(&pool, 6, 6);
  kv_pool_destroy(&pool);
}

/* ---- prefix cache stress ------------------------------------------------------------------- */

/* The shadow model's K/V: the value at a position depends on every token up to it, as real keys
 * and values do, so a block served under the wrong history reads back wrong. */
static uint32_t pst_val(uint32_t prev, int32_t tok) {
  uint64_t x = ((uint64_t)prev << 32 | (uint32_t)tok) + 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return (uint32_t)(x ^ (x >> 31));
}

struct pst_seq {
  struct kv_seq *seq; /* NULL = slot empty */
  int32_t *tokens;    /* (cap) the history */
  uint32_t *vals;     /* (cap) what position pos must read: pst_val chained over tokens */
  uint32_t cap;
};

struct pst {
  struct kv_pool pool;
  uint32_t *mem; /* fake device memory, one value per slot */
  struct pst_seq s[ST_SEQS];
  uint32_t *refs;
  uint8_t *mark;
  int32_t templates[3][64];
  uint64_t ops[8];
};

static bool pst_fit(struct pst_seq *ss, uint32_t n) {
  if (n <= ss->cap) return true;
  uint32_t cap = ss->cap ? ss->cap : 16;
  while (cap < n)
    cap *= 2;
  int32_t *t = realloc(ss->tokens, cap * sizeof *t);
  if (t) ss->tokens = t;
  uint32_t *v = realloc(ss->vals, cap * sizeof *v);
  if (v) ss->vals = v;
  if (!t || !v) return false;
  ss->cap = cap;
  return true;
}

/* Sets shadow tokens [from, from + n) and their values. */
static void pst_shadow(struct pst_seq *ss, uint32_t from, const int32_t *toks, uint32_t n) {
  for (uint32_t k = 0; k < n; k++) {
    uint32_t p = from + k;
    ss->tokens[p] = toks[k];
    ss->vals[p] = pst_val(p ? ss->vals[p - 1] : 0x12345u, toks[k]);
  }
}

/* KT_ASSERT_OK for a function returning a kvd code. */
#define PST_OK(expr)                                                                               \
  do {                                                                                             \
    int pst_rc_ = (expr);                                                                          \
    if (pst_rc_ < 0) {                                                                             \
      kt__fail(__FILE__, __LINE__, "%s: %d", #expr, pst_rc_);                                      \
      return KVD_EINVAL;                                                                           \
    }                                                                                              \
  } while (0)

/* Computes n tokens at len the engine's way: reserve, copy-on-write of len's block, write, commit,
 * register. On KV_EXHAUSTED the sequence is as it was. */
static int pst_append(struct pst *st, struct pst_seq *ss, const int32_t *toks, uint32_t n) {
  struct kv_pool *pool = &st->pool;
  struct kv_seq *q = ss->seq;
  uint32_t len = q->len, bs = pool->block_size;
  if (!pst_fit(ss, len + n)) return KVD_ENOMEM;
  uint32_t step = kv_seq_step_blocks(pool, q, n), avail = kv_pool_available(pool);
  int rc = kv_seq_reserve(pool, q, n);
  struct kv_copy cp;
  if (rc == 0) rc = kv_seq_prepare_write(pool, q, len, &cp);
  if (rc < 0) {
    KT_CHECK(step > avail);
    KT_CHECK_EQ(rc, KVD_E_KV_EXHAUSTED);
    PST_OK(kv_seq_truncate(pool, q, len)); /* gives back what reserve took */
    return rc;
  }
  KT_CHECK(step <= avail);
  if (rc == 1) {
    memcpy(&st->mem[(size_t)cp.dst_block * bs], &st->mem[(size_t)cp.src_block * bs],
           cp.n_tokens * sizeof *st->mem);
  }
  pst_shadow(ss, len, toks, n);
  for (uint32_t k = 0; k < n; k++) {
    struct kv_slot sl;
    PST_OK(kv_seq_slot(q, len + k, &sl));
    /* Never into a block anyone else sees or that a key names. */
    if (kv_pool_refcount(pool, sl.block) != 1 || pool->flags[sl.block] != 0) {
      kt__fail(__FILE__, __LINE__, "write into block %u (refcount %u, flags %u)", sl.block,
               kv_pool_refcount(pool, sl.block), pool->flags[sl.block]);
      return KVD_EINVAL;
    }
    st->mem[kv_slot_index(sl, bs)] = ss->vals[len + k];
  }
  PST_OK(kv_seq_commit(q, n));
  rc = kv_seq_register_blocks(pool, q, ss->tokens, q->len);
  if (rc < 0) {
    kt__fail(__FILE__, __LINE__, "register: %d", rc);
    return KVD_EINVAL;
  }
  return 0;
}

#define PST_FAIL(...)                                                                              \
  do {                                                                                             \
    kt__fail(__FILE__, __LINE__, __VA_ARGS__);                                                     \
    return false;                                                                                  \
  } while (0)

static bool pst_check(struct pst *st) {
  struct kv_pool *pool = &st->pool;
  uint32_t nb = pool->n_blocks, bs = pool->block_size;
  memset(st->refs, 0, nb * sizeof *st->refs);
  memset(st->mark, 0, nb);
  for (int i = 0; i < ST_SEQS; i++) {
    struct pst_seq *ss = &st->s[i];
    struct kv_seq *q = ss->seq;
    if (!q) continue;
    if ((uint64_t)q->n_blocks * bs < q->len)
      PST_FAIL("seq %d: %u tokens in %u blocks", i, q->len, q->n_blocks);
    if ((uint64_t)q->n_hashed * bs > q->len)
      PST_FAIL("seq %d: %u hashed, len %u", i, q->n_hashed, q->len);
    for (uint32_t b = 0; b < q->n_blocks; b++) {
      if (q->table[b] >= nb) PST_FAIL("seq %d: block id %u out of range", i, q->table[b]);
      st->refs[q->table[b]]++;
    }
    for (uint32_t pos = 0; pos < q->len; pos++) {
      uint32_t got = st->mem[(size_t)q->table[pos / bs] * bs + pos % bs];
      if (got != ss->vals[pos])
        PST_FAIL("seq %d pos %u: read %u, wrote %u", i, pos, got, ss->vals[pos]);
    }
    /* The hashed blocks carry the true chain key of this history. */
    uint64_t k = KV_PREFIX_ROOT_KEY;
    for (uint32_t b = 0; b < q->n_hashed; b++) {
      k = XXH3_64bits_withSeed(ss->tokens + (size_t)b * bs, bs * sizeof(int32_t), k);
      uint32_t id = q->table[b];
      if (!(pool->flags[id] & KV_BLOCK_KEYED) || pool->keys[id] != k)
        PST_FAIL("seq %d block %u (id %u): flags %u, wrong key", i, b, id, pool->flags[id]);
    }
  }
  uint32_t zero = 0, keyed_registered = 0;
  for (uint32_t b = 0; b < nb; b++) {
    if (st->refs[b] != pool->refs[b])
      PST_FAIL("block %u: refcount %u, %u tables hold it", b, pool->refs[b], st->refs[b]);
    zero += pool->refs[b] == 0;
    uint8_t f = pool->flags[b];
    if ((f & KV_BLOCK_REGISTERED) && !(f & KV_BLOCK_KEYED)) PST_FAIL("block %u: flags %u", b, f);
    keyed_registered += (f & KV_BLOCK_REGISTERED) != 0;
  }
  if (zero != pool->n_free + pool->n_cached)
    PST_FAIL("%u unreferenced, %u free + %u cached", zero, pool->n_free, pool->n_cached);
  if (keyed_registered != pool->n_registered)
    PST_FAIL("%u flagged registered, %u counted", keyed_registered, pool->n_registered);
  /* Free list: unreferenced, no flags, each once (mark 1). */
  for (uint32_t i = 0; i < pool->n_free; i++) {
    uint32_t b = pool->free_ids[i];
    if (b >= nb || pool->refs[b] || pool->flags[b] || st->mark[b])
      PST_FAIL("free list entry %u (block %u) is wrong", i, b);
    st->mark[b] = 1;
  }
  /* LRU: unreferenced and registered, links consistent both ways, each once (mark 2). */
  uint32_t n = 0, prev = KV_BLOCK_NONE;
  for (uint32_t b = pool->lru_head; b != KV_BLOCK_NONE; b = pool->lru_next[b]) {
    if (b >= nb || n++ > nb || pool->refs[b] || !(pool->flags[b] & KV_BLOCK_REGISTERED) ||
        st->mark[b] || pool->lru_prev[b] != prev)
      PST_FAIL("LRU entry %u (block %u) is wrong", n, b);
    st->mark[b] = 2;
    prev = b;
  }
  if (prev != pool->lru_tail || n != pool->n_cached)
    PST_FAIL("LRU: %u blocks, tail %u, counted %u, tail %u", n, prev, pool->n_cached,
             pool->lru_tail);
  /* Key table: exactly the registered blocks, each once (mark 4), reachable from its home slot,
   * no key twice. */
  uint32_t in_table = 0;
  for (size_t i = 0; i <= pool->ht_mask; i++) {
    uint32_t b = pool->ht[i];
    if (b == KV_BLOCK_NONE) continue;
    if (b >= nb || !(pool->flags[b] & KV_BLOCK_REGISTERED) || (st->mark[b] & 4))
      PST_FAIL("key table slot %zu (block %u) is wrong", i, b);
    st->mark[b] |= 4;
    in_table++;
    for (size_t j = (size_t)pool->keys[b] & pool->ht_mask; j != i; j = (j + 1) & pool->ht_mask) {
      uint32_t o = pool->ht[j];
      if (o == KV_BLOCK_NONE) PST_FAIL("block %u unreachable in the key table", b);
      if (pool->keys[o] == pool->keys[b]) PST_FAIL("blocks %u and %u share a key", o, b);
    }
  }
  if (in_table != pool->n_registered)
    PST_FAIL("%u in the key table, %u registered", in_table, pool->n_registered);
  return true;
}

/* A prompt that often shares a prefix with earlier ones: the start of one of three templates,
 * then a few tokens of a two-letter alphabet. */
static uint32_t pst_prompt(struct pst *st, int32_t *dst, uint32_t bs) {
  uint32_t t = kt_rand_range(0, 2), k = kt_rand_range(0, 5 * bs), tail = kt_rand_range(1, 2 * bs);
  if (k > 64) k = 64;
  memcpy(dst, st->templates[t], k * sizeof *dst);
  for (uint32_t i = 0; i < tail; i++)
    dst[k + i] = (int32_t)kt_rand_range(0, 1);
  return k + tail;
}

KT_TEST(stress_prefix_cache_against_shadow_model) {
  for (int round = 0; round < 8; round++) {
    static const uint32_t sizes[] = {1, 2, 4, 8};
    struct pst st;
    memset(&st, 0, sizeof st);
    uint32_t nb = kt_rand_range(8, 96), bs = sizes[kt_rand_range(0, 3)];
    KT_ASSERT_OK(kv_pool_init(&st.pool, nb, bs));
    st.mem = calloc((size_t)nb * bs, sizeof *st.mem);
    st.refs = calloc(nb, sizeof *st.refs);
    st.mark = calloc(nb, 1);
    KT_ASSERT(st.mem && st.refs && st.mark);
    for (int t = 0; t < 3; t++)
      for (int i = 0; i < 64; i++)
        st.templates[t][i] = (int32_t)kt_rand_range(0, 3);
    int32_t buf[128];
    bool ok = true;

    for (int it = 0; it < 6000 && ok; it++) {
      struct pst_seq *ss = &st.s[kt_rand_range(0, ST_SEQS - 1)];
      uint32_t op = kt_rand_range(0, 99);
      if (!ss->seq) {
        if (op < 70) {
          /* a request: cached prefix, then prefill; refused (and dropped) if it does not fit */
          uint32_t n = pst_prompt(&st, buf, bs), cached;
          KT_ASSERT_OK(kv_seq_new_with_prefix(&st.pool, buf, n, &ss->seq, &cached));
          KT_CHECK(cached % bs == 0 && cached < n && cached == ss->seq->len);
          KT_ASSERT(pst_fit(ss, n));
          pst_shadow(ss, 0, buf, cached); /* checked against the cache's blocks below */
          int rc = pst_append(&st, ss, buf + cached, n - cached);
          if (rc < 0) {
            KT_ASSERT_EQ(rc, KVD_E_KV_EXHAUSTED);
            ok = pst_check(&st);
            kv_seq_free(&st.pool, ss->seq);
            ss->seq = NULL;
            st.ops[6]++;
          } else {
            st.ops[0]++;
          }
        } else {
          struct pst_seq *src = &st.s[kt_rand_range(0, ST_SEQS - 1)];
          if (!src->seq) continue;
          KT_ASSERT_OK(kv_seq_fork(&st.pool, src->seq, &ss->seq));
          KT_ASSERT(pst_fit(ss, src->seq->len));
          if (src->seq->len) {
            memcpy(ss->tokens, src->tokens, src->seq->len * sizeof *ss->tokens);
            memcpy(ss->vals, src->vals, src->seq->len * sizeof *ss->vals);
          }
          st.ops[1]++;
        }
      } else if (op < 45) {
        /* decode a few tokens */
        uint32_t n = kt_rand_range(1, bs + 1);
        for (uint32_t k = 0; k < n; k++)
          buf[k] = (int32_t)kt_rand_range(0, 1);
        if (pst_append(&st, ss, buf, n) == 0) st.ops[2]++;
      } else if (op < 60) {
        /* rewind and regenerate: truncate into the history, then compute new tokens there */
        uint32_t n = kt_rand_range(0, ss->seq->len), m = kt_rand_range(1, bs + 1);
        KT_ASSERT_OK(kv_seq_truncate(&st.pool, ss->seq, n));
        for (uint32_t k = 0; k < m; k++)
          buf[k] = (int32_t)kt_rand_range(0, 1);
        if (pst_append(&st, ss, buf, m) == 0) st.ops[3]++;
      } else if (op < 72) {
        struct pst_seq *dst = &st.s[kt_rand_range(0, ST_SEQS - 1)];
        if (dst->seq) continue;
        KT_ASSERT_OK(kv_seq_fork(&st.pool, ss->seq, &dst->seq));
        KT_ASSERT(pst_fit(dst, ss->seq->len));
        if (ss->seq->len) {
          memcpy(dst->tokens, ss->tokens, ss->seq->len * sizeof *ss->tokens);
          memcpy(dst->vals, ss->vals, ss->seq->len * sizeof *ss->vals);
        }
        st.ops[1]++;
      } else if (op < 82) {
        uint32_t n = kt_rand_range(0, ss->seq->len);
        KT_ASSERT_OK(kv_seq_truncate(&st.pool, ss->seq, n));
        KT_CHECK_EQ(ss->seq->n_blocks, (n + bs - 1) / bs);
        st.ops[4]++;
      } else {
        kv_seq_free(&st.pool, ss->seq);
        ss->seq = NULL;
        st.ops[5]++;
      }
      if (ok) ok = pst_check(&st);
    }

    for (int i = 0; i < ST_SEQS; i++) {
      kv_seq_free(&st.pool, st.s[i].seq);
      free(st.s[i].tokens);
      free(st.s[i].vals);
    }
    struct kv_pool_stats stats;
    kv_pool_stats(&st.pool, &stats);
    KT_CHECK_EQ(stats.used, 0);
    KT_CHECK_EQ(stats.free + stats.cached, nb);
    KT_CHECK_EQ(stats.cached, stats.registered);
    KT_CHECK(stats.hits > 0);
    kt_log("prefix round %d: %u blocks of %u, %llu requests (%llu refused), %llu forks, "
           "%llu decodes, %llu regenerations, %llu truncates, %llu frees; %llu of %llu prompt "
           "blocks hit, %llu evictions, %llu copies, %u cached at the end",
           round, nb, bs, (unsigned long long)st.ops[0], (unsigned long long)st.ops[6],
           (unsigned long long)st.ops[1], (unsigned long long)st.ops[2],
           (unsigned long long)st.ops[3], (unsigned long long)st.ops[4],
           (unsigned long long)st.ops[5], (unsigned long long)stats.hits,
           (unsigned long long)stats.lookups, (unsigned long long)stats.evictions,
           (unsigned long long)stats.cow_copies, stats.cached);
    free(st.mem);
    free(st.refs);
    free(st.mark);
    kv_pool_destroy(&st.pool);
    if (!ok) return;
  }
}

/* The fork in two halves (what a session fork uses so that a failure is reported to the client
 * that asked, not discovered later on the engine thread): the reserved sequence takes no block,
 * filling it in allocates nothing and shares every block of the source; one reserved for fewer
 * tokens than the source holds is refused and left empty. */
KT_TEST(fork_into_a_reserved_sequence) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 16, 4));
  struct kv_seq *src, *dst, *small;
  KT_ASSERT_OK(kv_seq_new(&pool, &src));
  uint32_t n = kt_rand_range(33, 60); /* more blocks than a table's smallest allocation */
  KT_ASSERT_OK(kv_seq_reserve(&pool, src, n));
  KT_ASSERT_OK(kv_seq_commit(src, n));
  struct kv_pool_stats before, after;
  kv_pool_stats(&pool, &before);
  KT_ASSERT_OK(kv_seq_new_reserved(&pool, n, &dst));
  KT_ASSERT_OK(kv_seq_new_reserved(&pool, 1, &small));
  kv_pool_stats(&pool, &after);
  KT_CHECK_EQ(after.free, before.free); /* reserving takes no block */
  KT_CHECK_EQ(dst->len, 0);
  uint32_t blocks = (n + 3) / 4;
  KT_CHECK_EQ(kv_seq_fork_into(&pool, src, small), KVD_ERANGE);
  KT_CHECK_EQ(small->n_blocks, 0);
  KT_ASSERT_OK(kv_seq_fork_into(&pool, src, dst));
  KT_CHECK_EQ(dst->len, n);
  KT_CHECK_EQ(dst->n_blocks, blocks);
  for (uint32_t i = 0; i < blocks; i++) {
    KT_CHECK_EQ(dst->table[i], src->table[i]);
    KT_CHECK(kv_pool_refcount(&pool, src->table[i]) >= 2);
  }
  kv_seq_free(&pool, small);
  kv_seq_free(&pool, dst);
  kv_seq_free(&pool, src);
  kv_pool_stats(&pool, &after);
  KT_CHECK_EQ(after.used, 0);
  kv_pool_destroy(&pool);
}

/* ---- sliding windows: blocks given back before the window -------------------------------------- */

/* A long sequence that drops what a 40-position window no longer reads keeps a bounded number
 * of blocks; the pool gets the rest back; forks, rewinds within the kept range and the free
 * handle the KV_BLOCK_NONE entries. */
KT_TEST(drop_before_gives_blocks_back_and_keeps_the_table_length) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 16, 8));
  struct kv_seq *s;
  KT_ASSERT_OK(kv_seq_new(&pool, &s));
  const uint32_t w = 40;
  uint32_t most = 0;
  for (uint32_t t = 0; t < 400; t++) { /* 400 tokens, 50 blocks' worth, through a 16-block pool */
    KT_ASSERT_OK(kv_seq_reserve(&pool, s, 1));
    KT_ASSERT_OK(kv_seq_commit(s, 1));
    if (s->len + 1 > w) KT_ASSERT(kv_seq_drop_before(&pool, s, s->len + 1 - w) >= 0);
    if (kv_seq_live_blocks(s) > most) most = kv_seq_live_blocks(s);
  }
  KT_CHECK(most <= w / 8 + 2);
  KT_CHECK_EQ(s->n_blocks, 50); /* positions still map to entries */
  KT_CHECK_EQ(s->n_dropped, (400 + 1 - w) / 8);
  for (uint32_t i = 0; i < s->n_dropped; i++)
    KT_CHECK_EQ(s->table[i], KV_BLOCK_NONE);
  struct kv_pool_stats st;
  kv_pool_stats(&pool, &st);
  KT_CHECK_EQ(st.used, kv_seq_live_blocks(s));
  /* Dropping is idempotent and never goes past len. */
  KT_CHECK_EQ(kv_seq_drop_before(&pool, s, 100), 0);
  KT_CHECK_EQ(kv_seq_drop_before(&pool, s, 401), KVD_ERANGE);
  /* A fork shares only the live blocks. */
  struct kv_seq *f;
  KT_ASSERT_OK(kv_seq_fork(&pool, s, &f));
  KT_CHECK_EQ(f->n_dropped, s->n_dropped);
  for (uint32_t i = s->n_dropped; i < s->n_blocks; i++)
    KT_CHECK_EQ(kv_pool_refcount(&pool, s->table[i]), 2);
  /* A rewind into given-back positions is refused and changes nothing; one after them works. */
  KT_CHECK_EQ(kv_seq_truncate(&pool, f, s->n_dropped * 8 - 1), KVD_ERANGE);
  KT_CHECK_EQ(f->len, 400);
  KT_ASSERT_OK(kv_seq_truncate(&pool, f, s->n_dropped * 8));
  KT_CHECK_EQ(f->len, s->n_dropped * 8);
  kv_seq_free(&pool, f);
  kv_seq_free(&pool, s);
  kv_pool_stats(&pool, &st);
  KT_CHECK_EQ(st.free, st.total);
  kv_pool_destroy(&pool);
}

/* The prefix chain goes on through blocks given back before they were hashed: a sequence that
 * dropped blocks registers its later blocks under the same keys as one that kept everything,
 * and a rewind to the drop boundary resumes the chain from the key kept there. */
KT_TEST(prefix_chain_continues_through_dropped_blocks) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 64, 4));
  int32_t tok[96];
  for (int i = 0; i < 96; i++)
    tok[i] = (int32_t)kt_rand_range(0, 1000);
  struct kv_seq *keep = seq_with(&pool, 96), *drop;
  KT_ASSERT(keep);
  KT_ASSERT(kv_seq_register_blocks(&pool, keep, tok, 96) == 24);
  /* The twin drops 10 blocks before anything is hashed, registers, drops more, rewinds. */
  KT_ASSERT_OK(kv_seq_new(&pool, &drop));
  KT_ASSERT_OK(kv_seq_reserve(&pool, drop, 96));
  KT_ASSERT_OK(kv_seq_commit(drop, 96));
  KT_CHECK_EQ(kv_seq_drop_before(&pool, drop, 40), 10);
  KT_CHECK_EQ(kv_seq_register_blocks(&pool, drop, tok, 96), 0); /* same keys: already held */
  for (uint32_t i = 10; i < 24; i++)
    KT_CHECK(pool.keys[drop->table[i]] == pool.keys[keep->table[i]]);
  KT_CHECK(drop->chain_key == pool.keys[keep->table[23]]);
  KT_CHECK(drop->drop_key == pool.keys[keep->table[9]]);
  KT_CHECK_EQ(kv_seq_drop_before(&pool, drop, 60), 5);
  KT_CHECK(drop->drop_key == pool.keys[keep->table[14]]);
  KT_ASSERT_OK(kv_seq_truncate(&pool, drop, 60)); /* back to the boundary */
  KT_CHECK_EQ(drop->n_hashed, 15);
  KT_CHECK(drop->chain_key == pool.keys[keep->table[14]]);
  KT_ASSERT_OK(kv_seq_reserve(&pool, drop, 36));
  KT_ASSERT_OK(kv_seq_commit(drop, 36));
  kv_seq_register_blocks(&pool, drop, tok, 96);
  KT_CHECK(drop->chain_key == pool.keys[keep->table[23]]);
  kv_seq_free(&pool, drop);
  kv_seq_free(&pool, keep);
  kv_pool_destroy(&pool);
}

/* ---- past the context (kv_shift.c) ------------------------------------------------------------ */

KT_TEST(overflow_plan_follows_each_policy) {
  struct kv_overflow_cut c;
  /* Fits: nothing to drop, under any policy. */
  KT_ASSERT_OK(kv_overflow_plan(KV_OVERFLOW_ERROR, 500, 12, 512, 1, 16, &c));
  KT_CHECK_EQ(c.n_drop, 0);
  KT_CHECK_EQ(kv_overflow_plan(KV_OVERFLOW_ERROR, 512, 1, 512, 1, 16, &c), KVD_E_CONTEXT);
  /* shift: half of what follows keep, in whole blocks. */
  KT_ASSERT_OK(kv_overflow_plan(KV_OVERFLOW_SHIFT, 512, 1, 512, 1, 16, &c));
  KT_CHECK_EQ(c.keep, 1);
  KT_CHECK_EQ(c.n_drop, (512 - 1) / 2 / 16 * 16);
  /* window: just one block, after 4 sinks. */
  KT_ASSERT_OK(kv_overflow_plan(KV_OVERFLOW_WINDOW, 512, 1, 512, 4, 16, &c));
  KT_CHECK_EQ(c.keep, 4);
  KT_CHECK_EQ(c.n_drop, 16);
  /* A chunk of 40 needs 40 gone: rounded up to 48. */
  KT_ASSERT_OK(kv_overflow_plan(KV_OVERFLOW_WINDOW, 512, 40, 512, 4, 16, &c));
  KT_CHECK_EQ(c.n_drop, 48);
  /* keep past the context less two blocks is capped; a chunk larger than what can go fails. */
  KT_ASSERT_OK(kv_overflow_plan(KV_OVERFLOW_SHIFT, 512, 1, 512, 600, 16, &c));
  KT_CHECK_EQ(c.keep, 512 - 32);
  KT_CHECK(c.n_drop >= 16 && c.keep + c.n_drop <= 512);
  KT_CHECK_EQ(kv_overflow_plan(KV_OVERFLOW_SHIFT, 512, 600, 512, 0, 16, &c), KVD_E_CONTEXT);
  /* Every policy makes room whatever the numbers (randomized). */
  for (int i = 0; i < 20000; i++) {
    uint32_t bs = kt_rand_range(1, 64), n_ctx = kt_rand_range(2 * bs + 1, 4096);
    uint32_t len = kt_rand_range(0, n_ctx), n_new = kt_rand_range(1, n_ctx / 2 + 1);
    uint32_t keep = kt_rand_range(0, n_ctx + 10);
    enum kv_overflow p = kt_rand_range(0, 1) ? KV_OVERFLOW_SHIFT : KV_OVERFLOW_WINDOW;
    int rc = kv_overflow_plan(p, len, n_new, n_ctx, keep, bs, &c);
    if (rc == KVD_E_CONTEXT) {
      KT_CHECK((uint64_t)len + n_new > n_ctx); /* only when the cut cannot make room */
      continue;
    }
    KT_ASSERT_OK(rc);
    KT_CHECK(c.n_drop % bs == 0 && c.keep <= keep && (uint64_t)c.keep + c.n_drop <= len);
    KT_CHECK((uint64_t)len - c.n_drop + n_new <= n_ctx);
    if ((uint64_t)len + n_new <= n_ctx) KT_CHECK_EQ(c.n_drop, 0);
  }
  enum kv_overflow p;
  KT_ASSERT_OK(kv_overflow_parse("window", &p));
  KT_CHECK_EQ(p, KV_OVERFLOW_WINDOW);
  KT_CHECK_EQ(kv_overflow_parse("shiftx", &p), KVD_EINVAL);
}

/* Fake device memory for shifts: each slot holds the token id and position of the row there. */
struct fake_row {
  int32_t tok;
  int32_t pos;
};

static void fake_write(struct fake_row *mem, const struct kv_seq *s, const int32_t *hist,
                       uint32_t from) {
  for (uint32_t p = from; p < s->len; p++) {
    struct kv_slot sl;
    KT_ASSERT_OK(kv_seq_slot(s, p, &sl));
    mem[kv_slot_index(sl, s->block_size)] = (struct fake_row){hist[p], (int32_t)p};
  }
}

/* What the device does with a plan: rotations move a row and take n_drop off its position (read
 * everything first: moves may be in place), copies move it as it is. */
static void fake_apply(struct fake_row *mem, const struct kv_shift *sh) {
  struct fake_row *tmp = malloc((sh->n_moves ? sh->n_moves : 1) * sizeof *tmp);
  KT_ASSERT(tmp);
  for (uint32_t i = 0; i < sh->n_moves; i++)
    tmp[i] = mem[sh->moves[i].src];
  for (uint32_t i = 0; i < sh->n_moves; i++) {
    if (i < sh->n_rotate) tmp[i].pos -= (int32_t)sh->n_drop;
    mem[sh->moves[i].dst] = tmp[i];
  }
  free(tmp);
}

static bool fake_reads(const struct fake_row *mem, const struct kv_seq *s, const int32_t *hist) {
  for (uint32_t p = 0; p < s->len; p++) {
    struct kv_slot sl;
    if (kv_seq_slot(s, p, &sl) < 0) return false;
    struct fake_row r = mem[kv_slot_index(sl, s->block_size)];
    if (r.tok != hist[p] || r.pos != (int32_t)p) return false;
  }
  return true;
}

KT_TEST(shift_drops_tokens_moves_rows_and_spares_sharers) {
  for (int round = 0; round < 400; round++) {
    uint32_t bs = kt_rand_range(1, 20), n_blocks = 256;
    struct kv_pool pool;
    KT_ASSERT_OK(kv_pool_init(&pool, n_blocks, bs));
    struct fake_row *mem = calloc((size_t)n_blocks * bs, sizeof *mem);
    uint32_t len = kt_rand_range(bs + 1, 60 * bs < 1000 ? 60 * bs : 1000);
    int32_t *hist = malloc(len * sizeof *hist), *want = malloc(len * sizeof *want);
    KT_ASSERT(mem && hist && want);
    /* Distinct ids: the tokens after the cut never repeat the block they replace (equal ids
     * would rightly share the old block's K/V, which the probe below would count). */
    for (uint32_t i = 0; i < len; i++)
      hist[i] = (int32_t)(3 * i + kt_rand_range(0, 2));
    struct kv_seq *s, *fk = NULL;
    KT_ASSERT_OK(kv_seq_new(&pool, &s));
    KT_ASSERT_OK(kv_seq_reserve(&pool, s, len));
    KT_ASSERT_OK(kv_seq_commit(s, len));
    fake_write(mem, s, hist, 0);
    kv_seq_register_blocks(&pool, s, hist, len);
    bool fork = kt_rand_range(0, 1);
    if (fork) KT_ASSERT_OK(kv_seq_fork(&pool, s, &fk));
    uint32_t keep = kt_rand_range(0, len - bs);
    uint32_t n_drop = bs * kt_rand_range(1, (len - keep) / bs);
    struct kv_shift sh;
    KT_ASSERT_OK(kv_seq_shift_plan(&pool, s, keep, n_drop, &sh));
    if (kt_rand_range(0, 3) == 0) { /* a cancelled plan changes nothing */
      uint32_t avail = kv_pool_available(&pool), taken = sh.n_fresh;
      kv_seq_shift_cancel(&pool, &sh);
      KT_CHECK_EQ(kv_pool_available(&pool), avail + taken);
      KT_CHECK(fake_reads(mem, s, hist));
      KT_ASSERT_OK(kv_seq_shift_plan(&pool, s, keep, n_drop, &sh));
    }
    /* Copies: the fork's shared blocks always; registered ones only from free blocks. */
    KT_CHECK(sh.n_fresh <= s->n_blocks);
    fake_apply(mem, &sh);
    kv_seq_shift_commit(&pool, s, &sh);
    KT_CHECK_EQ(s->len, len - n_drop);
    KT_CHECK(s->shifted);
    memcpy(want, hist, keep * sizeof *want);
    memcpy(want + keep, hist + keep + n_drop, (len - keep - n_drop) * sizeof *want);
    KT_CHECK(fake_reads(mem, s, want));
    if (fk) KT_CHECK(fake_reads(mem, fk, hist)); /* the fork still reads the old history */
    /* Only the blocks wholly before the cut keep their keys: a prompt of the new history finds
     * those and nothing after (they hold K/V no history computes). */
    KT_CHECK_EQ(kv_seq_register_blocks(&pool, s, want, s->len), 0);
    struct kv_seq *probe;
    uint32_t cached;
    KT_ASSERT_OK(kv_seq_new_with_prefix(&pool, want, s->len, &probe, &cached));
    KT_CHECK(cached <= keep / bs * bs);
    kv_seq_free(&pool, probe);
    /* The old history's blocks were copied, not rewritten (the pool had room): a prompt
     * repeating it finds all of them, and reads the old rows. */
    KT_ASSERT_OK(kv_seq_new_with_prefix(&pool, hist, len, &probe, &cached));
    KT_CHECK_EQ(cached, (len - 1) / bs * bs);
    KT_CHECK(fake_reads(mem, probe, hist));
    kv_seq_free(&pool, probe);
    /* It goes on growing after the shift, and frees to nothing. */
    KT_ASSERT_OK(kv_seq_reserve(&pool, s, bs + 1));
    kv_seq_free(&pool, s);
    kv_seq_free(&pool, fk);
    struct kv_pool_stats st;
    kv_pool_stats(&pool, &st);
    KT_CHECK_EQ(st.free + st.cached, st.total);
    KT_CHECK_EQ(st.used, 0);
    free(mem), free(hist), free(want);
    kv_pool_destroy(&pool);
    if (kt__failed()) {
      kt_log("round %d: block %u, len %u, keep %u, drop %u, fork %d", round, bs, len, keep, n_drop,
             fork);
      return;
    }
  }
}

KT_TEST(shift_plan_is_all_or_nothing) {
  struct kv_pool pool;
  KT_ASSERT_OK(kv_pool_init(&pool, 8, 4));
  struct kv_seq *s, *fk;
  KT_ASSERT_OK(kv_seq_new(&pool, &s));
  KT_ASSERT_OK(kv_seq_reserve(&pool, s, 24));
  KT_ASSERT_OK(kv_seq_commit(s, 24));
  KT_ASSERT_OK(kv_seq_fork(&pool, s, &fk)); /* every block shared, 2 left */
  struct kv_shift sh;
  /* Dropping 4 after 2 moves 5 shared blocks: 5 copies wanted, 2 free. */
  KT_CHECK_EQ(kv_seq_shift_plan(&pool, s, 2, 4, &sh), KVD_E_KV_EXHAUSTED);
  KT_CHECK_EQ(kv_pool_available(&pool), 2);
  KT_CHECK_EQ(s->len, 24);
  /* Bad cuts are refused. */
  KT_CHECK_EQ(kv_seq_shift_plan(&pool, s, 2, 3, &sh), KVD_EINVAL);  /* not whole blocks */
  KT_CHECK_EQ(kv_seq_shift_plan(&pool, s, 20, 8, &sh), KVD_EINVAL); /* past len */
  KT_CHECK_EQ(kv_seq_shift_plan(&pool, s, 0, 0, &sh), KVD_EINVAL);
  kv_seq_free(&pool, fk);
  KT_ASSERT_OK(kv_seq_shift_plan(&pool, s, 2, 4, &sh)); /* alone now: in place */
  KT_CHECK_EQ(sh.n_fresh, 0);
  kv_seq_shift_commit(&pool, s, &sh);
  KT_CHECK_EQ(s->len, 20);
  KT_CHECK_EQ(kv_pool_available(&pool), 3);
  kv_seq_free(&pool, s);
  kv_pool_destroy(&pool);
}
