/* Host copies of a sequence's KV: what swap-based preemption parks in host RAM and a session file
 * holds. The unit is one block over all layers, engine_kv_block_bytes() bytes laid out as each
 * layer's K block then its V block, as stored in the KV type (nothing is converted, so a copy is
 * only ever read back into a pool of the same model, KV type and block size: the callers check).
 * Copies go through a host-visible staging buffer in chunks, one submission per chunk, with
 * physically consecutive blocks merged into one copy region per buffer. */
#include "engine_internal.h"

#include "kvd_error.h"

#include <string.h>

/* Staging is grown up to this, then reused chunk by chunk (a 1,000-token history of an 8B model
 * in f16 is ~128 MiB: two chunks). */
#define SWAP_STAGING_MAX (64ull << 20)

uint64_t engine_kv_block_bytes(const struct engine *e) {
  return 2ull * e->hp.n_layer * e->plan.block_bytes;
}

uint64_t engine_seq_export_blocks(const struct engine_seq *s, uint32_t *ret_first) {
  const struct kv_seq *kv = s->kv;
  uint32_t first = kv->n_dropped;
  if (ret_first) *ret_first = first;
  return kv_seq_live_blocks(kv);
}

/* A staging buffer of at least min(want, SWAP_STAGING_MAX) bytes (and at least one block);
 * returns how many blocks it holds. */
static int swap_staging(struct engine *e, uint64_t want, uint32_t *ret_blocks) {
  uint64_t bb = engine_kv_block_bytes(e);
  if (want > SWAP_STAGING_MAX) want = SWAP_STAGING_MAX;
  if (want < bb) want = bb;
  if (!e->swap_staging || gpu_buffer_size(e->swap_staging) < want) {
    struct gpu_buffer *b = NULL;
    int rc = gpu_buffer_new(e->dev, want, GPU_MEM_HOST, "kv swap staging", &b);
    if (rc < 0) return rc;
    gpu_buffer_free(e->swap_staging);
    e->swap_staging = b;
  }
  uint64_t n = gpu_buffer_size(e->swap_staging) / bb;
  *ret_blocks = n > UINT32_MAX ? UINT32_MAX : (uint32_t)n;
  return 0;
}

/* Records copies between the blocks table[0, n) of every layer buffer and the staging buffer,
 * which holds them buffer-major (buffer b's n blocks at b * n * block_bytes), so a run of blocks
 * consecutive in the pool is one region per buffer. to_host picks the direction. */
static void swap_record(struct engine *e, const uint32_t *table, uint32_t n, bool to_host) {
  uint64_t bb = e->plan.block_bytes;
  for (uint32_t i = 0; i < n;) {
    uint32_t run = 1;
    while (i + run < n && table[i + run] == table[i] + run)
      run++;
    for (uint32_t l = 0; l < e->hp.n_layer; l++) {
      struct gpu_buffer *cache[2] = {e->layers[l].k_cache, e->layers[l].v_cache};
      for (uint32_t kv = 0; kv < 2; kv++) {
        uint64_t dev_off = (uint64_t)table[i] * bb;
        uint64_t host_off = ((2ull * l + kv) * n + i) * bb;
        if (to_host)
          gpu_cmd_copy(e->cmd, cache[kv], dev_off, e->swap_staging, host_off, run * bb);
        else
          gpu_cmd_copy(e->cmd, e->swap_staging, host_off, cache[kv], dev_off, run * bb);
      }
    }
    i += run;
  }
}

/* Between the staging's buffer-major chunk of n blocks and the block-major host layout: from
 * host_in into stage, or from stage into host_out (the other NULL). */
static void swap_shuffle(const struct engine *e, const uint8_t *host_in, uint8_t *host_out,
                         uint8_t *stage, uint32_t n) {
  uint64_t bb = e->plan.block_bytes, nb = 2ull * e->hp.n_layer;
  for (uint32_t i = 0; i < n; i++)
    for (uint64_t b = 0; b < nb; b++) {
      uint64_t h = ((uint64_t)i * nb + b) * bb, g = (b * n + i) * bb;
      if (host_out)
        memcpy(host_out + h, stage + g, bb);
      else
        memcpy(stage + g, host_in + h, bb);
    }
}

static int swap_submit(struct engine *e) {
  int rc = gpu_cmd_submit(e->cmd);
  return rc == 0 ? gpu_cmd_wait(e->cmd) : rc;
}

int engine_seq_export(struct engine *e, const struct engine_seq *s, void *dst) {
  uint32_t first;
  uint32_t n = (uint32_t)engine_seq_export_blocks(s, &first);
  return engine_blocks_export(e, s->kv->table + first, n, dst);
}

int engine_blocks_export(struct engine *e, const uint32_t *blocks, uint32_t n, void *dst) {
  if (n == 0) return 0;
  uint64_t unit = engine_kv_block_bytes(e);
  uint32_t chunk;
  int rc = swap_staging(e, (uint64_t)n * unit, &chunk);
  if (rc < 0) return rc;
  uint8_t *stage = gpu_buffer_map(e->swap_staging);
  for (uint32_t at = 0; at < n && rc == 0; at += chunk) {
    uint32_t k = n - at < chunk ? n - at : chunk;
    rc = gpu_cmd_begin(e->cmd);
    if (rc == 0) swap_record(e, blocks + at, k, true);
    if (rc == 0) rc = swap_submit(e);
    if (rc == 0) swap_shuffle(e, NULL, (uint8_t *)dst + (uint64_t)at * unit, stage, k);
  }
  return rc;
}

int engine_seq_import(struct engine *e, struct engine_seq *s, const void *src, uint32_t n_blocks,
                      uint32_t n_tokens) {
  struct kv_seq *kv = s->kv;
  uint32_t bs = e->pool.block_size;
  /* Whole blocks after whole blocks: the copy fills exactly the blocks it appends. */
  if (kv->len % bs || kv->n_blocks != kv->len / bs) return KVD_EINVAL;
  if (n_blocks == 0 || n_tokens == 0) return n_blocks || n_tokens ? KVD_EINVAL : 0;
  if (n_tokens > (uint64_t)n_blocks * bs || n_tokens <= (uint64_t)(n_blocks - 1) * bs)
    return KVD_EINVAL;
  if ((uint64_t)kv->len + n_tokens > e->hp.n_ctx_train) return KVD_E_CONTEXT;
  uint64_t unit = engine_kv_block_bytes(e);
  uint32_t chunk;
  int rc = swap_staging(e, (uint64_t)n_blocks * unit, &chunk);
  if (rc < 0) return rc;
  uint32_t old_blocks = kv->n_blocks;
  rc = kv_seq_reserve(&e->pool, kv, n_tokens); /* all or nothing */
  if (rc < 0) return rc;
  uint8_t *stage = gpu_buffer_map(e->swap_staging);
  for (uint32_t at = 0; at < n_blocks && rc == 0; at += chunk) {
    uint32_t k = n_blocks - at < chunk ? n_blocks - at : chunk;
    swap_shuffle(e, (const uint8_t *)src + (uint64_t)at * unit, NULL, stage, k);
    rc = gpu_cmd_begin(e->cmd);
    if (rc == 0) swap_record(e, kv->table + old_blocks + at, k, false);
    if (rc == 0) rc = swap_submit(e);
  }
  if (rc < 0) {
    kv_seq_truncate(&e->pool, kv, kv->len); /* the reserved blocks go back */
    return rc;
  }
  return kv_seq_commit(kv, n_tokens);
}

int engine_seq_skip_dropped(struct engine *e, struct engine_seq *s, uint32_t n_blocks) {
  (void)e;
  return kv_seq_skip_dropped(s->kv, n_blocks);
}

bool engine_seq_shifted(const struct engine_seq *s) {
  return s->kv->shifted;
}

uint32_t engine_seq_dropped_blocks(const struct engine_seq *s) {
  return s->kv->n_dropped;
}

void engine_seq_mark_shifted(struct engine_seq *s) {
  s->kv->shifted = true;
}

uint32_t engine_next_unpersisted(const struct engine *e, uint32_t from, uint64_t *ret_key) {
  uint32_t b = kv_pool_next_unpersisted(&e->pool, from);
  if (b != KV_BLOCK_NONE) *ret_key = e->pool.keys[b];
  return b;
}

void engine_mark_persisted(struct engine *e, uint32_t block) {
  if (block < e->pool.n_blocks && (e->pool.flags[block] & KV_BLOCK_REGISTERED))
    e->pool.flags[block] |= KV_BLOCK_PERSISTED;
}

uint64_t engine_seq_chain_key(const struct engine *e, const struct engine_seq *s) {
  return kv_seq_chain_key(&e->pool, s->kv);
}

uint64_t engine_prefix_next(const struct engine *e, uint64_t parent, const int32_t *tokens) {
  return kv_prefix_next(&e->pool, parent, tokens);
}

void engine_seq_mark_persisted(struct engine *e, const struct engine_seq *s, uint32_t first,
                               uint32_t n) {
  for (uint32_t i = first; i < first + n && i < s->kv->n_blocks; i++)
    if (s->kv->table[i] != KV_BLOCK_NONE) engine_mark_persisted(e, s->kv->table[i]);
}

uint32_t engine_lru_next(const struct engine *e, uint32_t after, uint64_t *ret_key,
                         bool *ret_persisted) {
  uint32_t b = kv_pool_lru_next(&e->pool, after);
  if (b != KV_BLOCK_NONE) {
    *ret_key = e->pool.keys[b];
    *ret_persisted = e->pool.flags[b] & KV_BLOCK_PERSISTED;
  }
  return b;
}

uint32_t engine_kv_free_blocks(const struct engine *e) {
  return e->pool.n_free;
}
