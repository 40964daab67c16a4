/* Sessions in the pool and the host-RAM tier. A session keeps its tokens (hist, pending) on the
 * engine thread, so its KV can leave the pool and come back: when the pool is short, idle
 * sessions are swapped out least recently used first, into host copies within the tier's budget
 * (sched_opts.host_bytes). When the budget is full, older copies of sessions that can be
 * recomputed from their tokens are dropped (their full blocks usually stay in the prefix cache,
 * which a recompute reads first). A swapped-out session comes back on its next request: the
 * blocks still cached are shared, the rest copied back. */
#include "sched_internal.h"

#include "kvd_error.h"

#include <stdlib.h>
#include <string.h>

void sched__session_link(struct sched *s, struct sched_session *ss) {
  if (ss->linked) return;
  ss->linked = true;
  ss->prev = NULL;
  ss->next = s->sessions;
  if (s->sessions) s->sessions->prev = ss;
  s->sessions = ss;
  if (ss->swap) s->host_used += (uint64_t)ss->swap->n_blocks * ss->swap->block_bytes;
  if (!ss->last_used) ss->last_used = sched__now();
}

void sched__session_unlink(struct sched *s, struct sched_session *ss) {
  if (!ss->linked) return;
  if (ss->prev)
    ss->prev->next = ss->next;
  else
    s->sessions = ss->next;
  if (ss->next) ss->next->prev = ss->prev;
  ss->linked = false;
  sched__copy_free(s, ss->swap);
  ss->swap = NULL;
}

void sched__copy_free(struct sched *s, struct sched_kv_copy *c) {
  if (!c) return;
  uint64_t bytes = (uint64_t)c->n_blocks * c->block_bytes;
  s->host_used = s->host_used > bytes ? s->host_used - bytes : 0;
  free(c->data);
  free(c);
}

/* Whether a session without KV can be brought back by recomputing its tokens. */
static bool tier_recomputable(const struct sched_session *ss, bool shifted) {
  return ss->mirror && !shifted;
}

/* Drops the host copies of idle recomputable sessions, oldest first, until `need` more bytes fit
 * the budget; false if they cannot. */
static bool tier_make_room(struct sched *s, const struct sched_session *keep, uint64_t need) {
  /* Prefix blocks give way to sessions first: they can come back from disk or be recomputed. */
  while (s->host_used + need > s->o.host_bytes && sched__ram_shrink(s, need)) {
  }
  while (s->host_used + need > s->o.host_bytes) {
    struct sched_session *oldest = NULL;
    for (struct sched_session *o = s->sessions; o; o = o->next)
      if (o != keep && o->swap && !o->busy && tier_recomputable(o, o->swap->shifted) &&
          (!oldest || o->last_used < oldest->last_used))
        oldest = o;
    if (!oldest) return false;
    sched__copy_free(s, oldest->swap);
    oldest->swap = NULL;
    s->local.swap_recomputed++;
  }
  return true;
}

int sched__swap_out(struct sched *s, struct sched_session *ss) {
  if (!ss->seq) return 0;
  bool shifted = engine_seq_shifted(ss->seq);
  uint32_t first;
  uint64_t n = engine_seq_export_blocks(ss->seq, &first);
  uint64_t unit = engine_kv_block_bytes(s->e), bytes = n * unit;
  struct sched_kv_copy *c = NULL;
  if (n && s->o.host_bytes && bytes <= s->o.host_bytes && tier_make_room(s, ss, bytes)) {
    c = calloc(1, sizeof *c);
    if (c) c->data = malloc((size_t)bytes);
    if (c && c->data) {
      double t0 = sched__now();
      c->len = engine_seq_len(ss->seq);
      c->first = first;
      c->n_blocks = (uint32_t)n;
      c->shifted = shifted;
      c->block_bytes = unit;
      if (engine_seq_export(s->e, ss->seq, c->data) < 0) {
        free(c->data);
        c->data = NULL;
      } else {
        s->local.swap_out_ms += (uint64_t)((sched__now() - t0) * 1e3);
      }
    }
    if (c && !c->data) {
      free(c);
      c = NULL;
    }
  }
  if (!c && n && !tier_recomputable(ss, shifted)) return KVD_E_KV_EXHAUSTED;
  /* Its registered blocks stay in the prefix cache (cached, evictable); the rest go back. */
  engine_seq_free(s->e, ss->seq);
  ss->seq = NULL;
  if (c) {
    ss->swap = c;
    s->host_used += bytes;
    s->local.swap_out++;
  } else {
    s->local.swap_recomputed++;
  }
  return 0;
}

int sched__swap_in(struct sched *s, struct sched_session *ss) {
  struct sched_kv_copy *c = ss->swap;
  if (!c || ss->seq) return 0;
  double t0 = sched__now();
  struct engine_seq *seq = NULL;
  uint32_t cached = 0;
  struct kv_pool_stats kv;
  engine_kv_stats(s->e, &kv);
  uint32_t bs = kv.block_size;
  int rc;
  if (!c->shifted && c->first == 0 && ss->mirror && ss->n_hist == c->len)
    rc = engine_seq_new_prefix(s->e, ss->hist, ss->n_hist, &seq, &cached);
  else if ((rc = engine_seq_new(s->e, &seq)) == 0 && c->first)
    rc = engine_seq_skip_dropped(s->e, seq, c->first);
  if (rc == 0 && c->shifted) engine_seq_mark_shifted(seq);
  uint32_t skip = cached / bs; /* blocks the prefix cache supplied */
  uint32_t at = c->first * bs + cached;
  if (rc == 0 && skip < c->n_blocks)
    rc = engine_seq_import(s->e, seq, c->data + (uint64_t)skip * c->block_bytes, c->n_blocks - skip,
                           c->len - at);
  if (rc < 0) {
    engine_seq_free(s->e, seq);
    return rc;
  }
  ss->seq = seq;
  ss->swap = NULL;
  sched__copy_free(s, c);
  s->local.swap_in++;
  s->local.swap_in_ms += (uint64_t)((sched__now() - t0) * 1e3);
  return 0;
}

bool sched__evict_idle(struct sched *s, uint32_t need) {
  bool any = false;
  while (engine_kv_available(s->e) < need) {
    struct sched_session *lru = NULL;
    for (struct sched_session *o = s->sessions; o; o = o->next)
      if (o->seq && !o->busy && engine_seq_live_blocks(o->seq) &&
          (!lru || o->last_used < lru->last_used))
        lru = o;
    if (!lru) break;
    if (sched__swap_out(s, lru) < 0) {
      /* It cannot leave (shifted, and no room in the tier): the next one may. Its recency is
       * bumped so the scan moves on; it stays where it is. */
      lru->last_used = sched__now();
      bool other = false;
      for (struct sched_session *o = s->sessions; o; o = o->next)
        if (o != lru && o->seq && !o->busy && engine_seq_live_blocks(o->seq)) other = true;
      if (!other) break;
      continue;
    }
    any = true;
  }
  return any;
}

int sched__snapshot(struct sched *s, struct sched_req *r) {
  struct sched_session *ss = r->session;
  struct sched_snapshot *sn = r->snapshot;
  if (ss->busy) return KVD_EBUSY;
  memset(sn, 0, sizeof *sn);
  sn->pending = ss->pending;
  sn->n_hist = ss->n_hist;
  sn->hist = malloc((ss->n_hist ? ss->n_hist : 1) * sizeof *sn->hist);
  if (!sn->hist) return KVD_ENOMEM;
  if (ss->n_hist) memcpy(sn->hist, ss->hist, ss->n_hist * sizeof *sn->hist);
  struct sched_kv_copy *src = ss->swap;
  if (ss->seq) {
    uint32_t first;
    uint64_t n = engine_seq_export_blocks(ss->seq, &first);
    sn->kv.block_bytes = engine_kv_block_bytes(s->e);
    sn->kv.len = engine_seq_len(ss->seq);
    sn->kv.first = first;
    sn->kv.n_blocks = (uint32_t)n;
    sn->kv.shifted = engine_seq_shifted(ss->seq);
    if (n) {
      sn->kv.data = malloc((size_t)(n * sn->kv.block_bytes));
      if (!sn->kv.data) return KVD_ENOMEM;
      int rc = engine_seq_export(s->e, ss->seq, sn->kv.data);
      if (rc < 0) return rc;
    }
  } else if (src) {
    sn->kv = *src;
    sn->kv.data = malloc((size_t)((uint64_t)src->n_blocks * src->block_bytes));
    if (!sn->kv.data) return KVD_ENOMEM;
    memcpy(sn->kv.data, src->data, (size_t)((uint64_t)src->n_blocks * src->block_bytes));
  } else if (!ss->mirror) {
    return KVD_ENOENT; /* cannot happen: only a recomputable session goes without KV */
  }
  if (!ss->mirror) sn->kv.shifted = true; /* its ids do not give its KV back */
  return 0;
}

void sched_snapshot_clear(struct sched_snapshot *sn) {
  if (!sn) return;
  free(sn->hist);
  free(sn->kv.data);
  memset(sn, 0, sizeof *sn);
  sn->pending = -1;
}

/* ---- the host tier's prefix blocks ---- */

static size_t ram_slot(const struct sched *s, uint64_t key) {
  size_t i = (size_t)(key ^ (key >> 31)) & s->ram_mask;
  while (s->ram_index[i] && s->ram[s->ram_index[i] - 1].key != key)
    i = (i + 1) & s->ram_mask;
  return i;
}

static bool ram_get(struct sched *s, uint64_t key, uint8_t *dst) {
  if (!s->ram_n || !key) return false;
  uint32_t e = s->ram_index[ram_slot(s, key)];
  if (!e) return false;
  memcpy(dst, s->ram[e - 1].data, (size_t)engine_kv_block_bytes(s->e));
  return true;
}

static void ram_index_remove(struct sched *s, uint64_t key) {
  size_t i = ram_slot(s, key);
  if (!s->ram_index[i]) return;
  s->ram_index[i] = 0;
  for (size_t j = (i + 1) & s->ram_mask; s->ram_index[j]; j = (j + 1) & s->ram_mask) {
    uint32_t e = s->ram_index[j];
    s->ram_index[j] = 0;
    s->ram_index[ram_slot(s, s->ram[e - 1].key)] = e;
  }
}

bool sched__ram_shrink(struct sched *s, uint64_t need) {
  uint64_t unit = engine_kv_block_bytes(s->e);
  bool any = false;
  while (s->ram_n && s->host_used + need > s->o.host_bytes) {
    struct sched_ram_block *b = &s->ram[s->ram_head];
    /* From there to the disk tier, unless it has the block already. */
    if (s->o.disk && !tier_disk_has(s->o.disk, b->key) &&
        tier_disk_put(s->o.disk, b->key, b->data) == 0)
      s->local.disk_writes++;
    ram_index_remove(s, b->key);
    free(b->data);
    b->data = NULL;
    b->key = 0;
    s->ram_head = (s->ram_head + 1) % s->ram_cap;
    s->ram_n--;
    s->host_used -= unit;
    any = true;
  }
  return any;
}

void sched__ram_free(struct sched *s) {
  for (uint32_t i = 0; i < s->ram_n; i++)
    free(s->ram[(s->ram_head + i) % s->ram_cap].data);
  free(s->ram);
  free(s->ram_index);
  s->ram = NULL;
  s->ram_index = NULL;
  s->ram_n = s->ram_cap = 0;
}

/* The ring and index, sized for the whole host budget in blocks (at most 1M entries). */
static bool ram_init(struct sched *s) {
  if (s->ram) return true;
  uint64_t unit = engine_kv_block_bytes(s->e), n = unit ? s->o.host_bytes / unit : 0;
  if (n == 0) return false;
  if (n > (1u << 20)) n = 1u << 20;
  size_t slots = 2;
  while (slots < 2 * n)
    slots *= 2;
  s->ram = calloc(n, sizeof *s->ram);
  s->ram_index = calloc(slots, sizeof *s->ram_index);
  if (!s->ram || !s->ram_index) {
    sched__ram_free(s);
    return false;
  }
  s->ram_cap = (uint32_t)n;
  s->ram_mask = slots - 1;
  return true;
}

static void ram_put(struct sched *s, uint64_t key, const uint8_t *src) {
  uint64_t unit = engine_kv_block_bytes(s->e);
  if (!key || !ram_init(s) || s->ram_index[ram_slot(s, key)]) return;
  if (s->ram_n == s->ram_cap || s->host_used + unit > s->o.host_bytes) sched__ram_shrink(s, unit);
  if (s->ram_n == s->ram_cap || s->host_used + unit > s->o.host_bytes) return;
  uint8_t *d = malloc((size_t)unit);
  if (!d) return;
  memcpy(d, src, (size_t)unit);
  uint32_t at = (s->ram_head + s->ram_n) % s->ram_cap;
  s->ram[at] = (struct sched_ram_block){key, d};
  s->ram_n++;
  s->ram_index[ram_slot(s, key)] = at + 1;
  s->host_used += unit;
}

void sched__spill(struct sched *s, uint32_t ahead) {
  uint32_t free_blocks = engine_kv_free_blocks(s->e);
  if (!s->o.host_bytes || free_blocks >= ahead) return;
  /* Taking `ahead` blocks would evict this many cached ones, least recently used first. */
  uint32_t in_line = ahead - free_blocks, ids[32], n = 0;
  uint64_t keys[32];
  uint32_t b = KV_BLOCK_NONE;
  for (uint32_t seen = 0; n < 32 && seen < in_line; seen++) {
    uint64_t key = 0;
    bool persisted = false;
    b = engine_lru_next(s->e, b, &key, &persisted);
    if (b == KV_BLOCK_NONE) break;
    if (persisted) continue;
    if (s->ram_n && s->ram_index[ram_slot(s, key)]) {
      engine_mark_persisted(s->e, b);
      continue;
    }
    ids[n] = b;
    keys[n++] = key;
  }
  if (n == 0) return;
  uint64_t unit = engine_kv_block_bytes(s->e);
  uint8_t *buf = malloc((size_t)(n * unit));
  if (buf && engine_blocks_export(s->e, ids, n, buf) == 0) {
    for (uint32_t i = 0; i < n; i++) {
      ram_put(s, keys[i], buf + (uint64_t)i * unit);
      engine_mark_persisted(s->e, ids[i]);
    }
    s->local.ram_spills += n;
  }
  free(buf);
}

/* ---- the disk tier ---- */

#define DISK_BATCH 32u /* blocks read or written per submission */

uint32_t sched__disk_extend(struct sched *s, struct engine_seq *seq, const int32_t *tokens,
                            uint32_t n_tokens) {
  struct tier_disk *t = s->o.disk;
  if ((!t && !s->ram_n) || engine_seq_shifted(seq) || engine_seq_dropped_blocks(seq) ||
      n_tokens == 0)
    return 0;
  struct kv_pool_stats kv;
  engine_kv_stats(s->e, &kv);
  uint32_t bs = kv.block_size, len = engine_seq_len(seq);
  if (len % bs) return 0;
  /* Never the last prompt token: its logits are what the request samples from. */
  uint32_t max_blocks = (n_tokens - 1) / bs, added = 0;
  uint64_t unit = engine_kv_block_bytes(s->e), key = engine_seq_chain_key(s->e, seq);
  uint8_t *buf = NULL;
  for (uint32_t i = len / bs; i < max_blocks;) {
    uint32_t m = 0, want = max_blocks - i < DISK_BATCH ? max_blocks - i : DISK_BATCH;
    if (!buf && !(buf = malloc((size_t)(DISK_BATCH * unit)))) break;
    uint64_t k = key;
    while (m < want) {
      uint64_t next = engine_prefix_next(s->e, k, tokens + (size_t)(i + m) * bs);
      uint8_t *dst = buf + (uint64_t)m * unit;
      if (ram_get(s, next, dst)) {
        s->local.ram_hits++;
      } else if (!t || !tier_disk_has(t, next) || tier_disk_get(t, next, dst) < 0) {
        break;
      } else {
        s->local.disk_hits++;
      }
      k = next;
      m++;
    }
    /* Into the pool only while free or cached blocks allow: this is a shortcut, not a need. */
    if (m == 0 || m + 1 > engine_kv_available(s->e)) break;
    if (engine_seq_import(s->e, seq, buf, m, m * bs) < 0) break;
    engine_seq_register(s->e, seq, tokens, engine_seq_len(seq));
    engine_seq_mark_persisted(s->e, seq, i, m);
    added += m * bs;
    key = k;
    i += m;
    if (m < want) break;
  }
  free(buf);
  return added;
}

uint32_t sched__disk_flush(struct sched *s, uint32_t max) {
  struct tier_disk *t = s->o.disk;
  if (!t) return 0;
  uint32_t ids[DISK_BATCH];
  uint64_t keys[DISK_BATCH];
  uint32_t n = 0, from = s->persist_from;
  if (max > DISK_BATCH) max = DISK_BATCH;
  for (int wrapped = 0; n < max && wrapped < 2;) {
    uint32_t b = engine_next_unpersisted(s->e, from, &keys[n]);
    if (b == KV_BLOCK_NONE) {
      from = 0;
      wrapped++;
      continue;
    }
    ids[n++] = b;
    from = b + 1;
  }
  s->persist_from = from;
  if (n == 0) return 0;
  uint64_t unit = engine_kv_block_bytes(s->e);
  uint8_t *buf = malloc((size_t)(n * unit));
  if (buf && engine_blocks_export(s->e, ids, n, buf) == 0)
    for (uint32_t i = 0; i < n; i++)
      if (tier_disk_put(t, keys[i], buf + (uint64_t)i * unit) == 0) s->local.disk_writes++;
  free(buf);
  /* Marked even when a write failed (a full or read-only disk): tried once, not in a loop. */
  for (uint32_t i = 0; i < n; i++)
    engine_mark_persisted(s->e, ids[i]);
  return n;
}
