/* Past the context window: which tokens a full sequence gives up (the overflow policies), and the
 * block-table side of dropping them (context shift).
 *
 * Dropping n_drop tokens after the first `keep` moves every later token n_drop positions down.
 * With n_drop a multiple of the block size a token keeps its row within its block, so the blocks
 * after the dropped run simply move up the table; the dropped blocks go back to the pool whole.
 * Only two things touch rows: the keys of every moved token are rotated back by n_drop positions
 * (RoPE is a rotation: the stored key at p becomes the key at p - n_drop, done by the engine's
 * kv_shift kernel), and when keep is not block-aligned, the keep % block_size kept rows of the
 * block the cut falls in are copied once into the first moved block, which takes its place. A
 * moved block another sequence shares is not rotated in place but into a fresh block
 * (copy-on-write), so sharers never see the change; so is a block registered in the prefix cache
 * while free blocks last, so the cache keeps naming the original history truthfully. */
#include "kv.h"
#include "kv_internal.h"

#include "kvd_error.h"

#include <stdlib.h>
#include <string.h>

const char *kv_overflow_name(enum kv_overflow p) {
  switch (p) {
  case KV_OVERFLOW_ERROR:
    return "error";
  case KV_OVERFLOW_SHIFT:
    return "shift";
  case KV_OVERFLOW_WINDOW:
    return "window";
  }
  return "?";
}

int kv_overflow_parse(const char *name, enum kv_overflow *ret) {
  static const enum kv_overflow all[] = {KV_OVERFLOW_ERROR, KV_OVERFLOW_SHIFT, KV_OVERFLOW_WINDOW};
  for (size_t i = 0; name && i < sizeof all / sizeof all[0]; i++)
    if (strcmp(name, kv_overflow_name(all[i])) == 0) {
      *ret = all[i];
      return 0;
    }
  return KVD_EINVAL;
}

static uint32_t round_up(uint32_t n, uint32_t m) {
  return n / m * m + (n % m ? m : 0);
}

int kv_overflow_plan(enum kv_overflow policy, uint32_t len, uint32_t n_new, uint32_t n_ctx,
                     uint32_t keep, uint32_t block_size, struct kv_overflow_cut *ret) {
  *ret = (struct kv_overflow_cut){0};
  if (block_size == 0 || n_ctx == 0) return KVD_EINVAL;
  uint64_t want = (uint64_t)len + n_new;
  if (want <= n_ctx) return 0;
  if (policy != KV_OVERFLOW_SHIFT && policy != KV_OVERFLOW_WINDOW) return KVD_E_CONTEXT;
  /* A keep that leaves less than two blocks to cut from would shift again every few tokens (or
   * never make room): it is capped, so the policy always makes progress. */
  uint32_t keep_max = n_ctx > 2 * block_size ? n_ctx - 2 * block_size : 0;
  if (keep > keep_max) keep = keep_max;
  if (keep > len) keep = len;
  uint64_t need = want - n_ctx; /* tokens that must go */
  if (need > len - keep) return KVD_E_CONTEXT;
  uint32_t drop = round_up((uint32_t)need, block_size);
  /* shift: half of what is not kept at once, so shifts are rare (each rotates every moved key);
   * window: just enough whole blocks, the oldest first, so the window stays as wide as it can. */
  if (policy == KV_OVERFLOW_SHIFT) {
    uint32_t half = (len - keep) / 2 / block_size * block_size;
    if (half > drop) drop = half;
  }
  if (drop > len - keep) drop = (len - keep) / block_size * block_size;
  if (drop < need) return KVD_E_CONTEXT;
  ret->keep = keep;
  ret->n_drop = drop;
  return 0;
}

/* The block of new table entry j (j >= kb) comes from old entry j + db. */
int kv_seq_shift_plan(struct kv_pool *pool, const struct kv_seq *seq, uint32_t keep,
                      uint32_t n_drop, struct kv_shift *ret) {
  memset(ret, 0, sizeof *ret);
  uint32_t bs = seq->block_size;
  if (bs != pool->block_size || n_drop == 0 || n_drop % bs || keep > seq->len ||
      n_drop > seq->len - keep)
    return KVD_EINVAL;
  uint32_t kb = keep / bs, r = keep % bs, db = n_drop / bs;
  /* Blocks a sliding window gave back hold nothing to keep: only a cut from 0 can pass them. */
  if (seq->n_dropped > 0 && keep > 0) return KVD_EINVAL;
  uint32_t nb = seq->n_blocks - db;
  ret->keep = keep;
  ret->n_drop = n_drop;
  ret->n_blocks = nb;
  ret->table = malloc((size_t)(seq->cap_blocks ? seq->cap_blocks : 1) * sizeof *ret->table);
  ret->fresh_at = malloc((size_t)(nb > kb ? nb - kb : 1) * sizeof *ret->fresh_at);
  uint64_t max_moves = (uint64_t)(nb > kb ? nb - kb : 0) * bs;
  ret->moves = malloc((size_t)(max_moves ? max_moves : 1) * sizeof *ret->moves);
  if (!ret->table || !ret->fresh_at || !ret->moves) {
    kv_seq_shift_cancel(pool, ret);
    return KVD_ENOMEM;
  }
  memcpy(ret->table, seq->table, (size_t)kb * sizeof *ret->table);
  /* First pass: which moved blocks get a fresh block. Those another sequence shares must (it
   * must not see the change); those registered in the prefix cache may, while free blocks last
   * (not by evicting others): then the original stays cached for a prompt that repeats this
   * history, instead of being rewritten and forgotten. */
  uint32_t n_fresh = 0, n_must = 0;
  for (uint32_t j = kb; j < nb; j++) {
    uint32_t b = seq->table[j + db];
    bool rows = (uint64_t)(j + db) * bs < seq->len || (j == kb && r > 0);
    if (b != KV_BLOCK_NONE && rows && pool->refs[b] > 1) n_must++;
  }
  uint32_t spare = pool->n_free > n_must ? pool->n_free - n_must : 0;
  for (uint32_t j = kb; j < nb; j++) {
    uint32_t o = j + db, b = seq->table[o];
    ret->table[j] = b;
    bool rows = (uint64_t)o * bs < seq->len || (j == kb && r > 0);
    if (b == KV_BLOCK_NONE || !rows) continue;
    if (pool->refs[b] > 1) {
      ret->fresh_at[n_fresh++] = j;
    } else if ((pool->flags[b] & KV_BLOCK_REGISTERED) && spare > 0) {
      ret->fresh_at[n_fresh++] = j;
      spare--;
    }
  }
  if (n_fresh) {
    ret->fresh = malloc((size_t)n_fresh * sizeof *ret->fresh);
    if (!ret->fresh) {
      kv_seq_shift_cancel(pool, ret);
      return KVD_ENOMEM;
    }
    int rc = kv_pool_alloc_n(pool, n_fresh, ret->fresh);
    if (rc < 0) {
      free(ret->fresh);
      ret->fresh = NULL;
      kv_seq_shift_cancel(pool, ret);
      return rc;
    }
    ret->n_fresh = n_fresh;
    for (uint32_t i = 0; i < n_fresh; i++)
      ret->table[ret->fresh_at[i]] = ret->fresh[i];
  }
  /* Second pass: the rows. Rotations first ([0, n_rotate)), then the kept rows' copies. */
  uint32_t n = 0;
  for (uint32_t j = kb; j < nb; j++) {
    uint32_t o = j + db, src = seq->table[o], dst = ret->table[j];
    if (src == KV_BLOCK_NONE) continue;
    for (uint32_t off = (j == kb ? r : 0); off < bs && (uint64_t)o * bs + off < seq->len; off++)
      ret->moves[n++] = (struct kv_move){src * bs + off, dst * bs + off};
  }
  ret->n_rotate = n;
  if (r > 0 && kb < nb) {
    uint32_t src = seq->table[kb], dst = ret->table[kb];
    for (uint32_t off = 0; off < r; off++)
      ret->moves[n++] = (struct kv_move){src * bs + off, dst * bs + off};
  }
  ret->n_moves = n;
  return 0;
}

void kv_seq_shift_commit(struct kv_pool *pool, struct kv_seq *seq, struct kv_shift *sh) {
  uint32_t bs = seq->block_size, kb = sh->keep / bs, db = sh->n_drop / bs;
  /* The blocks whose rows were rewritten in place change content: their keys go. */
  for (uint32_t j = kb; j < sh->n_blocks; j++) {
    uint32_t o = j + db, b = seq->table[o];
    if (b == KV_BLOCK_NONE) continue;
    if (sh->table[j] != b) {
      kv_pool_unref(pool, b); /* rotated into a copy: the sharers, or the prefix cache, keep it */
    } else if ((uint64_t)o * bs < seq->len || (j == kb && sh->keep % bs)) {
      kv__prefix_forget(pool, b);
    }
  }
  /* The dropped run, last first (kv_seq.c's release order). */
  for (uint32_t i = kb + db; i > kb; i--)
    if (seq->table[i - 1] != KV_BLOCK_NONE) kv_pool_unref(pool, seq->table[i - 1]);
  memcpy(seq->table, sh->table, (size_t)sh->n_blocks * sizeof *seq->table);
  seq->n_blocks = sh->n_blocks;
  seq->len -= sh->n_drop;
  seq->n_dropped = seq->n_dropped > db ? seq->n_dropped - db : 0;
  /* Blocks before the cut keep their keys; from the cut on, the cache holds keys no token
   * history computes (they attended to the dropped tokens), so nothing after it is ever keyed:
   * the chain stops for good. */
  if (seq->n_hashed > kb) {
    seq->n_hashed = kb;
    seq->chain_key = kb ? pool->keys[seq->table[kb - 1]] : 0;
  }
  seq->shifted = true;
  sh->n_fresh = 0; /* now in the table */
  kv_seq_shift_cancel(pool, sh);
}

void kv_seq_shift_cancel(struct kv_pool *pool, struct kv_shift *sh) {
  for (uint32_t i = 0; i < sh->n_fresh; i++)
    kv_pool_unref(pool, sh->fresh[i]);
  free(sh->table);
  free(sh->fresh_at);
  free(sh->fresh);
  free(sh->moves);
  memset(sh, 0, sizeof *sh);
}
