/* Step assembly: everything engine_forward() does on the host around the recorded forward pass
 * (engine_forward.c).
 *
 *   check      every item valid, the step within max_tokens / max_logits, the blocks it needs
 *              free; nothing has changed yet, so a refusal leaves every sequence as it was
 *   reserve    each sequence's KV blocks for its new tokens, and the copy-on-write copy of a
 *              shared block it is about to write
 *   upload     the block tables of every item, then per token its id, position, KV slot and
 *              (n_kv, table offset), straight into the mapped step buffer
 *   record     engine__record_step(), one submission
 *   wait       then commit the new tokens and hand out the logits; on any failure give back
 *              what reserve took */
#include "engine_internal.h"

#include "kvd_error.h"

#include <stdlib.h>
#include <string.h>

static uint64_t align_up(uint64_t v, uint64_t a) {
  return a > 1 ? (v + a - 1) / a * a : v;
}

int engine__layout_step(struct engine *e, uint64_t tables_cap) {
  uint64_t a = gpu_device_caps(e->dev)->min_storage_align, t = e->max_tokens, off = 0;
  struct eng_step_layout *L = &e->lay;
  L->ids = off;
  off = align_up(off + t * 4, a);
  L->pos = off;
  off = align_up(off + t * 4, a);
  L->slots = off;
  off = align_up(off + t * 4, a);
  L->tok_info = off;
  off = align_up(off + t * 8, a);
  L->tiles = off;
  off = align_up(off + t * 8, a);
  L->tables = off;
  off += tables_cap * 4;
  L->size = off;
  L->tables_cap = tables_cap;
  gpu_buffer_free(e->step);
  e->step = NULL;
  free(e->tables_host);
  e->tables_host = malloc(tables_cap * 4);
  if (!e->tables_host) return KVD_ENOMEM;
  return gpu_buffer_new(e->dev, L->size, GPU_MEM_MAPPABLE, "step arrays", &e->step);
}

static int eng_reserve_items(struct engine *e, uint32_t n_items) {
  if (n_items <= e->cap_items) return 0;
  uint32_t cap = n_items * 2;
  uint32_t *off = realloc(e->offsets_host, cap * sizeof *off);
  if (!off) return KVD_ENOMEM;
  e->offsets_host = off;
  const struct kv_seq **sp = realloc(e->seq_ptrs, cap * sizeof *sp);
  if (!sp) return KVD_ENOMEM;
  e->seq_ptrs = sp;
  e->cap_items = cap;
  return 0;
}

/* Validates everything and counts blocks before touching any sequence: all or nothing. */
static int eng_step_check(struct engine *e, const struct engine_item *items, uint32_t n_items,
                          struct eng_step *s) {
  const struct model_hparams *hp = &e->hp;
  uint64_t n_tok = 0, need_blocks = 0;
  uint32_t n_logits = 0;
  for (uint32_t i = 0; i < n_items; i++) {
    const struct engine_item *it = &items[i];
    if (!it->seq || it->n_tokens == 0 || !it->tokens) return KVD_EINVAL;
    for (uint32_t j = 0; j < it->n_tokens; j++)
      if (it->tokens[j] < 0 || (uint32_t)it->tokens[j] >= hp->n_vocab) return KVD_EINVAL;
    if ((uint64_t)it->seq->kv->len + it->n_tokens > hp->n_ctx_train) return KVD_E_CONTEXT;
    n_tok += it->n_tokens;
    if (it->n_logits > it->n_tokens) return KVD_EINVAL;
    n_logits += it->logits ? (it->n_logits > 1 ? it->n_logits : 1) : 0;
    need_blocks += kv_seq_step_blocks(&e->pool, it->seq->kv, it->n_tokens);
  }
  if (n_tok > e->max_tokens || n_logits > e->max_logits) return KVD_E2BIG;
  /* Cached prefix blocks count as available: an allocation evicts them when the free list is
   * empty. */
  if (need_blocks > kv_pool_available(&e->pool)) {
    e->pool.alloc_failures++;
    return KVD_E_KV_EXHAUSTED;
  }
  s->n_tokens = (uint32_t)n_tok;
  s->n_logits = n_logits;
  return 0;
}

/* Takes each item's blocks for its new tokens and plans the copy of a shared block it is about
 * to write (into copies and copy_seqs, n_items at most). Planned, not committed: every table
 * still names the shared block, so a step that fails after this leaves each sequence reading
 * what it read (the copies are cancelled). *ret_done = items touched, the failing one included:
 * what the caller gives back on failure. */
static int eng_step_reserve(struct engine *e, const struct engine_item *items, uint32_t n_items,
                            struct kv_copy *copies, struct kv_seq **copy_seqs,
                            uint32_t *ret_n_copies, uint32_t *ret_done) {
  int rc = 0;
  uint32_t n_copies = 0, done = 0;
  for (; done < n_items && rc == 0; done++) {
    struct kv_seq *kv = items[done].seq->kv;
    uint32_t len = kv->len;
    rc = kv_seq_reserve(&e->pool, kv, items[done].n_tokens);
    if (rc == 0) {
      int c = kv_seq_plan_write(&e->pool, kv, len, &copies[n_copies]);
      if (c == 1)
        copy_seqs[n_copies++] = kv;
      else if (c < 0)
        rc = c;
    }
    e->seq_ptrs[done] = kv;
  }
  *ret_n_copies = n_copies;
  *ret_done = done;
  return rc;
}

/* Writes the step's per-token arrays into the mapped step buffer: the mirror of every block
 * table, then for each token its id, position, KV slot and (n_kv, table offset); and which token
 * rows want logits. */
static int eng_step_upload(struct engine *e, const struct engine_item *items, uint32_t n_items,
                           struct eng_step *s) {
  size_t entries = kv_mirror_entries(e->seq_ptrs, n_items);
  if (entries > e->lay.tables_cap) {
    int rc = engine__layout_step(e, entries * 2);
    if (rc < 0) return rc;
  }
  uint8_t *map = gpu_buffer_map(e->step);
  if (!map) return KVD_E_VULKAN;
  int n = kv_mirror_write(e->seq_ptrs, n_items, e->tables_host, e->lay.tables_cap, e->offsets_host);
  if (n < 0) return n;
  memcpy(map + e->lay.tables, e->tables_host, (size_t)n * 4);

  uint32_t *ids = (uint32_t *)(map + e->lay.ids);       /* (n_tokens) */
  uint32_t *pos = (uint32_t *)(map + e->lay.pos);       /* (n_tokens) */
  uint32_t *slots = (uint32_t *)(map + e->lay.slots);   /* (n_tokens) */
  uint32_t *info = (uint32_t *)(map + e->lay.tok_info); /* (n_tokens, 2) */
  uint32_t *tiles = (uint32_t *)(map + e->lay.tiles);   /* (n_tiles, 2) */
  uint32_t t = 0, li = 0, max_kv = 0, n_tiles = 0, longest = 0;
  uint32_t tile_tokens = attn_tile_tokens(&e->attn, e->hp.n_head, e->hp.n_head_kv);
  for (uint32_t i = 0; i < n_items; i++) {
    const struct engine_item *it = &items[i];
    const struct kv_seq *kv = it->seq->kv;
    /* An item's tokens are one sequence's, consecutive: its tiles. */
    for (uint32_t j = 0; j < it->n_tokens; j += tile_tokens, n_tiles++) {
      tiles[2 * n_tiles] = t + j;
      tiles[2 * n_tiles + 1] = it->n_tokens - j < tile_tokens ? it->n_tokens - j : tile_tokens;
    }
    if (it->n_tokens > longest) longest = it->n_tokens;
    for (uint32_t j = 0; j < it->n_tokens; j++, t++) {
      uint32_t p = kv->len + j;
      struct kv_slot slot;
      int rc = kv_seq_slot(kv, p, &slot);
      if (rc < 0) return rc;
      ids[t] = (uint32_t)it->tokens[j];
      pos[t] = p;
      slots[t] = kv_slot_index(slot, e->pool.block_size);
      info[2 * t] = p + 1;
      info[2 * t + 1] = e->offsets_host[i];
      if (p + 1 > max_kv) max_kv = p + 1;
    }
    if (it->logits)
      for (uint32_t k = it->n_logits > 1 ? it->n_logits : 1; k > 0; k--)
        e->logit_rows[li++] = t - k;
  }
  s->logit_rows = e->logit_rows;
  s->max_kv = max_kv;
  /* A step with a prompt chunk in it runs the tiled kernel (decoding items in it get a tile of
   * their own); one of single tokens only, the paged kernel with its KV splits. */
  s->n_tiles = longest > 1 ? n_tiles : 0;
  s->n_splits = s->n_tiles ? 1 : attn_pick_splits(&e->attn, max_kv, s->n_tokens * e->hp.n_head);
  return 0;
}

int engine_forward(struct engine *e, struct engine_item *items, uint32_t n_items) {
  const struct model_hparams *hp = &e->hp;
  if (n_items == 0) return KVD_EINVAL;
  struct eng_step s = {0};
  int rc = eng_reserve_items(e, n_items);
  if (rc == 0) rc = eng_step_check(e, items, n_items, &s);
  if (rc < 0) return rc;

  struct kv_copy copies_small[16], *copies = copies_small;
  struct kv_seq *copy_seqs_small[16], **copy_seqs = copy_seqs_small;
  if (n_items > 16) {
    copies = malloc(n_items * sizeof *copies);
    copy_seqs = malloc(n_items * sizeof *copy_seqs);
    if (!copies || !copy_seqs) {
      free(copies);
      free(copy_seqs);
      return KVD_ENOMEM;
    }
  }
  uint32_t done = 0;
  rc = eng_step_reserve(e, items, n_items, copies, copy_seqs, &s.n_copies, &done);
  s.copies = copies;
  if (rc == 0) {
    /* The device must see the fresh blocks (the step copies into them first, then writes): the
     * tables are uploaded with them swapped in, then put back until the step has run. */
    for (uint32_t i = 0; i < s.n_copies; i++)
      copy_seqs[i]->table[copies[i].index] = copies[i].dst_block;
    rc = eng_step_upload(e, items, n_items, &s);
    for (uint32_t i = 0; i < s.n_copies; i++)
      copy_seqs[i]->table[copies[i].index] = copies[i].src_block;
  }
  if (rc == 0) rc = engine__record_step(e, &s);
  if (rc == 0) rc = gpu_cmd_wait(e->cmd);
  /* Second phase: the copies go into the tables only now that the step ran. */
  for (uint32_t i = 0; i < s.n_copies; i++) {
    if (rc == 0)
      kv_seq_commit_copy(&e->pool, copy_seqs[i], &copies[i]);
    else
      kv_seq_cancel_copy(&e->pool, &copies[i]);
  }
  if (copies != copies_small) {
    free(copies);
    free(copy_seqs);
  }
  if (rc < 0) {
    /* Give back what this step reserved; committed tokens stay as they were. */
    for (uint32_t i = 0; i < done; i++)
      kv_seq_truncate(&e->pool, items[i].seq->kv, items[i].seq->kv->len);
    return rc;
  }
  const float *lg = gpu_buffer_map(e->logits); /* (n_logits, n_vocab) */
  uint32_t li = 0;
  for (uint32_t i = 0; i < n_items; i++) {
    kv_seq_commit(items[i].seq->kv, items[i].n_tokens);
    if (!items[i].logits) continue;
    uint32_t k = items[i].n_logits > 1 ? items[i].n_logits : 1;
    memcpy(items[i].logits, lg + (size_t)li * hp->n_vocab, (size_t)k * hp->n_vocab * sizeof(float));
    li += k;
  }
  return 0;
}
