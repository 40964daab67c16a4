#include "scheduler.h"
#include "sched_internal.h"

#include "kvd_error.h"

#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

double sched__now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int sched_req_new(const int32_t *tokens, uint32_t n_tokens, struct sched_req **ret) {
  struct sched_req *r = calloc(1, sizeof *r);
  if (!r) return KVD_ENOMEM;
  r->tokens = malloc((n_tokens ? n_tokens : 1) * sizeof *r->tokens);
  if (!r->tokens) {
    free(r);
    return KVD_ENOMEM;
  }
  if (n_tokens) memcpy(r->tokens, tokens, n_tokens * sizeof *tokens);
  r->n_tokens = n_tokens;
  r->inbox = calloc(1, sizeof(struct inbox_item));
  if (!r->inbox) {
    free(r->tokens);
    free(r);
    return KVD_ENOMEM;
  }
  r->next = -1;
  sample_params_default(&r->sp);
  atomic_init(&r->cancel, false);
  atomic_init(&r->ev_out, 0);
  atomic_init(&r->pub_state, SCHED_STATE_QUEUED);
  atomic_init(&r->pub_cached, 0);
  atomic_init(&r->pub_queue_us, 0);
  *ret = r;
  return 0;
}

void sched_req_free(struct sched_req *r) {
  if (!r) return;
  free(r->tokens);
  free(r->inbox);
  free(r->hist);
  free(r->logits);
  free(r->scratch);
  sampler_free(r->smp);
  free(r);
}

void sched_cancel(struct sched_req *r) {
  atomic_store(&r->cancel, true);
  struct sched *s = r->sched;
  if (!s) return; /* never submitted */
  pthread_mutex_lock(&s->lock);
  s->kick = true;
  pthread_cond_signal(&s->wake);
  pthread_mutex_unlock(&s->lock);
}

/* Appends to the inbox and wakes the engine thread; under s->lock. */
static void sched_append_inbox(struct sched *s, struct inbox_item *it) {
  if (s->in_tail)
    s->in_tail->next = it;
  else
    s->in_head = it;
  s->in_tail = it;
  pthread_cond_signal(&s->wake);
}

static void sched_push_inbox(struct sched *s, struct inbox_item *it) {
  pthread_mutex_lock(&s->lock);
  sched_append_inbox(s, it);
  pthread_mutex_unlock(&s->lock);
}

/* Makes room for `need` events in the ring; under s->lock. */
static int sched_ring_reserve(struct sched *s, uint64_t need) {
  if (need <= s->ev_cap) return 0;
  if (need > UINT32_MAX / 2) return KVD_ENOMEM;
  uint32_t cap = s->ev_cap ? s->ev_cap : 256;
  while (cap < need)
    cap *= 2;
  struct sched_event *n = malloc((size_t)cap * sizeof *n);
  if (!n) return KVD_ENOMEM;
  for (uint32_t i = 0; i < s->ev_count; i++)
    n[i] = s->events[(s->ev_head + i) % s->ev_cap];
  free(s->events);
  s->events = n;
  s->ev_head = 0;
  s->ev_cap = cap;
  return 0;
}

int sched_submit(struct sched *s, struct sched_req *r) {
  r->t_submit = sched__now();
  pthread_mutex_lock(&s->lock);
  int rc = sched_ring_reserve(s, s->ev_reserved + SCHED_EV_WINDOW);
  if (rc < 0) {
    pthread_mutex_unlock(&s->lock);
    return rc;
  }
  s->ev_reserved += SCHED_EV_WINDOW;
  r->sched = s;
  atomic_store(&r->ev_out, 0);
  /* The inbox item was allocated with the request, so nothing else can fail. */
  struct inbox_item *it = r->inbox;
  r->inbox = NULL;
  it->kind = INBOX_REQ;
  it->req = r;
  sched_append_inbox(s, it); /* under the same lock as the reservation */
  pthread_mutex_unlock(&s->lock);
  return 0;
}

int sched_session_new(struct sched *s, struct sched_session **ret) {
  (void)s;
  struct sched_session *ss = calloc(1, sizeof *ss);
  if (!ss) return KVD_ENOMEM;
  ss->free_item = calloc(1, sizeof(struct inbox_item));
  if (!ss->free_item) {
    free(ss);
    return KVD_ENOMEM;
  }
  ss->pending = -1;
  ss->mirror = true;
  atomic_init(&ss->len, 0);
  *ret = ss;
  return 0;
}

int sched_session_restore(struct sched *s, struct sched_snapshot *sn, struct sched_session **ret) {
  struct sched_session *ss = NULL;
  struct sched_kv_copy *c = sn->kv.n_blocks ? calloc(1, sizeof *c) : NULL;
  int rc = sn->kv.n_blocks && !c ? KVD_ENOMEM : sched_session_new(s, &ss);
  if (rc < 0 || (sn->kv.shifted && !c) || (c && sn->kv.len != sn->n_hist)) {
    free(c);
    if (ss) sched_session_free(s, ss);
    sched_snapshot_clear(sn);
    return rc < 0 ? rc : KVD_EINVAL;
  }
  /* Not yet seen by the engine thread: the loop may set its engine-side state. */
  ss->hist = sn->hist;
  ss->n_hist = ss->cap_hist = sn->n_hist;
  ss->pending = sn->pending;
  if (c) {
    *c = sn->kv;
    ss->swap = c;
  }
  atomic_store(&ss->len, sn->n_hist + (sn->pending >= 0 ? 1u : 0u));
  sn->hist = NULL;
  sn->kv.data = NULL;
  sched_snapshot_clear(sn);
  *ret = ss;
  return 0;
}

int sched_session_fork(struct sched *s, struct sched_session *src, struct sched_session **ret) {
  struct sched_session *ss;
  struct inbox_item *it = calloc(1, sizeof *it);
  if (!it) return KVD_ENOMEM;
  if (sched_session_new(s, &ss) < 0) {
    free(it);
    return KVD_ENOMEM;
  }
  /* Everything that can fail happens here, where the caller hears of it: the copy's table is
   * allocated now (the source is idle, so its length holds), and the engine thread only fills
   * it in. A fork that reports success is a fork. */
  uint32_t len = atomic_load(&src->len);
  ss->hist = malloc((len ? len : 1) * sizeof *ss->hist); /* the source's ids, copied there */
  ss->cap_hist = len;
  if (!ss->hist || engine_seq_reserve(s->e, len, &ss->reserved) < 0) {
    free(ss->hist);
    free(ss->free_item);
    free(ss);
    free(it);
    return KVD_ENOMEM;
  }
  atomic_store(&ss->len, len);
  it->kind = INBOX_FORK;
  it->a = src;
  it->b = ss;
  sched_push_inbox(s, it);
  *ret = ss;
  return 0;
}

void sched_session_free(struct sched *s, struct sched_session *ss) {
  if (!ss) return;
  struct inbox_item *it = ss->free_item;
  ss->free_item = NULL;
  it->kind = INBOX_FREE;
  it->a = ss;
  sched_push_inbox(s, it);
}

uint32_t sched_session_len(const struct sched_session *ss) {
  return atomic_load(&((struct sched_session *)ss)->len);
}

/* ---- engine thread ---- */

/* Never fails, sleeps or drops: the request's slots were reserved by sched_submit, and a
 * request is stepped only with room for one token and its DONE (sched_has_room). */
static void sched_emit(struct sched *s, const struct sched_event *ev) {
  pthread_mutex_lock(&s->lock);
  assert(s->ev_count < s->ev_cap);
  s->events[(s->ev_head + s->ev_count) % s->ev_cap] = *ev;
  s->ev_count++;
  atomic_fetch_add(&ev->req->ev_out, 1);
  pthread_mutex_unlock(&s->lock);
}

/* Whether a running request may take part in a step: its token and a DONE must fit its window. */
static bool sched_has_room(struct sched *s, struct sched_req *r) {
  if (atomic_load(&r->ev_out) + 2 <= SCHED_EV_WINDOW) return true;
  /* Set before looking again, so a drain in between either is seen here or sees the flag. */
  atomic_store(&s->out_blocked, true);
  return atomic_load(&r->ev_out) + 2 <= SCHED_EV_WINDOW;
}

uint32_t sched_drain(struct sched *s, struct sched_event *out, uint32_t cap) {
  pthread_mutex_lock(&s->lock);
  uint32_t n = s->ev_count < cap ? s->ev_count : cap;
  for (uint32_t i = 0; i < n; i++) {
    out[i] = s->events[(s->ev_head + i) % s->ev_cap];
    atomic_fetch_sub(&out[i].req->ev_out, 1);
    if (out[i].done) s->ev_reserved -= SCHED_EV_WINDOW; /* the engine is done with it */
  }
  s->ev_head = n ? (s->ev_head + n) % s->ev_cap : s->ev_head;
  s->ev_count -= n;
  if (n && atomic_exchange(&s->out_blocked, false)) {
    s->kick = true;
    pthread_cond_signal(&s->wake);
  }
  pthread_mutex_unlock(&s->lock);
  return n;
}

void sched_get_stats(struct sched *s, struct sched_stats *ret) {
  pthread_mutex_lock(&s->lock);
  *ret = s->stats;
  pthread_mutex_unlock(&s->lock);
}

static void list_remove(struct sched_req **head, struct sched_req *r) {
  for (struct sched_req **p = head; *p; p = &(*p)->next_req)
    if (*p == r) {
      *p = r->next_req;
      r->next_req = NULL;
      return;
    }
}

static void list_append(struct sched_req **head, struct sched_req *r) {
  struct sched_req **p = head;
  while (*p)
    p = &(*p)->next_req;
  r->next_req = NULL;
  *p = r;
}

/* A session's turn ends: the session keeps what its KV holds now (or, without KV, the ids to
 * recompute), the ids in hist, the last sampled token pending. A turn that failed or was
 * cancelled before its first token leaves the session as it found it: its prompt's KV is cut off
 * and the previous answer's last token is pending again, so the next turn reads the same history
 * (the client got no answer to build on). After a context shift that dropped part of this
 * prompt's KV there is no such point to go back to: the session keeps what it holds (its history
 * already lost old turns). */
static void sched_finish_session(struct sched *s, struct sched_req *r, enum sched_finish why) {
  struct sched_session *ss = r->session;
  bool rollback =
      r->n_generated == 0 && (why == SCHED_FINISH_ERROR || why == SCHED_FINISH_CANCELLED);
  if (rollback) {
    if (!r->n_shifts && r->seq) {
      uint32_t len = engine_seq_len(r->seq);
      if (len > r->sess_base) {
        engine_seq_truncate(s->e, r->seq, r->sess_base);
      } else if (len < r->sess_base) { /* a recompute that had not got back there */
        engine_seq_free(s->e, r->seq);
        r->seq = ss->seq = NULL;
      }
    }
    if (!r->n_shifts || r->n_prefilled == 0) r->next = r->sess_pending0;
  }
  uint32_t n = r->seq     ? engine_seq_len(r->seq)
               : ss->swap ? ss->swap->len
               : rollback ? r->sess_base
                          : r->n_hist;
  if (r->hist_base == 0 && n <= r->n_hist) {
    /* hist mirrors the sequence: it becomes the session's (buffers are swapped, so nothing here
     * can fail; the request frees the old one with itself). */
    int32_t *h = ss->hist;
    uint32_t cap = ss->cap_hist;
    ss->hist = r->hist;
    ss->cap_hist = r->cap_hist;
    r->hist = h;
    r->cap_hist = cap;
    r->n_hist = 0;
    ss->n_hist = n;
    ss->mirror = true;
  } else if (r->hist_base != 0) {
    ss->mirror = false; /* the turn outgrew its buffer: the ids no longer give the KV */
    ss->n_hist = 0;
  }
  if (!r->seq && !ss->swap && !ss->mirror) {
    /* Cannot happen (only a recomputable session goes without KV); should it, the session
     * starts over rather than read ids that do not match. */
    ss->n_hist = 0;
    r->next = -1;
  }
  ss->seq = r->seq;
  ss->pending = r->next;
  atomic_store(&ss->len, ss->n_hist + (r->next >= 0 ? 1u : 0u));
  ss->busy = false;
  ss->last_used = sched__now();
}

/* Ends a request: its sequence goes back to the pool unless a session keeps it. */
static void sched_finish(struct sched *s, struct sched_req *r, enum sched_finish why, int error) {
  sched__spec_drop(s, r);
  if (r->session) {
    if (r->sess_taken) sched_finish_session(s, r, why); /* one that never began left it as is */
  } else if (r->seq) {
    engine_seq_free(s->e, r->seq);
  }
  r->seq = NULL;
  r->t_end = sched__now();
  struct sched_event ev = {.req = r, .done = true, .finish = why, .error = error};
  sched_emit(s, &ev);
}

static void sched_finish_from(struct sched *s, struct sched_req **head, struct sched_req *r,
                              enum sched_finish why, int error) {
  list_remove(head, r);
  sched_finish(s, r, why, error);
}

/* First use of a request on the engine thread: its sequence, sampler and prompt. */
static int sched_admit(struct sched *s, struct sched_req *r) {
  const struct model_hparams *hp = engine_hparams(s->e);
  int rc = sampler_new(hp->n_vocab, &r->sp, &r->smp);
  if (rc < 0) return rc;
  if (r->spec == SCHED_SPEC_DRAFT && !s->o.draft) return KVD_E_UNSUPPORTED;
  r->logits = malloc(hp->n_vocab * sizeof(float));
  r->logits_rows = 1;
  if (r->logprobs) r->scratch = malloc(hp->n_vocab * sizeof(float));
  if (r->logprobs && !r->scratch) return KVD_ENOMEM;
  if (r->n_tokens == 0 && !r->session) return KVD_EINVAL;
  struct sched_session *ss = r->session;
  uint32_t base = 0; /* a session's ids that lead hist, its KV already in the pool */
  if (ss) {
    /* The session's next tokens: the previous completion's last token (never run), the new
     * prompt, and, when the session holds no KV at all (swapped out with no copy kept), its
     * whole history first, recomputed through the prefix cache. */
    sched__session_link(s, ss);
    ss->busy = true;
    r->sess_taken = true;
    r->sess_pending0 = ss->pending;
    r->sess_base = ss->n_hist;
    bool recompute = !ss->seq && !ss->swap && ss->n_hist > 0;
    uint32_t pre = recompute ? ss->n_hist : 0, lead = ss->pending >= 0 ? 1 : 0;
    if (pre || lead) {
      uint64_t n = (uint64_t)pre + lead + r->n_tokens;
      int32_t *t = n <= UINT32_MAX ? malloc((size_t)n * sizeof *t) : NULL;
      if (!t) return KVD_ENOMEM;
      if (pre) memcpy(t, ss->hist, pre * sizeof *t);
      if (lead) t[pre] = ss->pending;
      memcpy(t + pre + lead, r->tokens, r->n_tokens * sizeof *t);
      free(r->tokens);
      r->tokens = t;
      r->n_tokens = (uint32_t)n;
      ss->pending = -1;
    }
    if (!ss->seq && recompute) {
      uint32_t cached = 0;
      rc = engine_seq_new_prefix(s->e, r->tokens, r->n_tokens, &ss->seq, &cached);
      if (rc < 0) return rc;
      cached += sched__disk_extend(s, ss->seq, r->tokens, r->n_tokens);
      r->n_prefilled = r->n_prefix = cached;
    } else if (!ss->seq) {
      rc = engine_seq_new(s->e, &ss->seq);
      if (rc < 0) return rc;
    }
    r->seq = ss->seq;
    if (!recompute && ss->mirror) base = ss->n_hist;
  } else {
    /* Shared prefixes (a system prompt, a document) are computed once: start from the longest
     * cached chain of this prompt's blocks and prefill only the rest. */
    uint32_t cached = 0;
    rc = engine_seq_new_prefix(s->e, r->tokens, r->n_tokens, &r->seq, &cached);
    if (rc < 0) return rc;
    cached += sched__disk_extend(s, r->seq, r->tokens, r->n_tokens);
    r->n_prefilled = r->n_prefix = cached;
  }
  r->cached_tokens = engine_seq_len(r->seq);
  if (r->n_tokens == 0) return KVD_EINVAL;
  /* The history never holds more than the context (ids whose KV the sequence holds, then what is
   * generated; a preempted request's prompt is its history so far), apart from a prompt that
   * runs past it in chunks: max_tokens comes from the wire, so it only shortens that, computed in
   * 64 bits (n_tokens + 1 + 2^32-1 used to wrap to a tiny buffer). */
  uint64_t least = (uint64_t)base + r->n_tokens + 1;
  uint64_t cap = least + (r->max_tokens ? r->max_tokens : hp->n_ctx_train);
  uint64_t most = (uint64_t)hp->n_ctx_train + 1 > least ? (uint64_t)hp->n_ctx_train + 1 : least;
  if (cap > most) cap = most;
  if (cap > UINT32_MAX) return KVD_E_CONTEXT;
  r->cap_hist = (uint32_t)cap;
  r->hist = malloc((size_t)cap * sizeof(int32_t));
  if (!r->logits || !r->hist) return KVD_ENOMEM;
  /* What the sequence will hold once the prompt is in: what it holds beyond the part of the
   * prompt the prefix cache supplied, plus the prompt. */
  uint64_t total = (uint64_t)r->cached_tokens - r->n_prefilled + r->n_tokens;
  /* A prompt that cannot fit even with the whole pool to itself is refused at once. */
  struct kv_pool_stats kv;
  engine_kv_stats(s->e, &kv);
  if (r->overflow == KV_OVERFLOW_ERROR && total >= hp->n_ctx_train) return KVD_E_CONTEXT;
  if (r->overflow != KV_OVERFLOW_ERROR && total > hp->n_ctx_train) total = hp->n_ctx_train;
  if ((total + kv.block_size) / kv.block_size > kv.total) return KVD_E_KV_EXHAUSTED;
  if (base) memcpy(r->hist, ss->hist, base * sizeof(int32_t));
  memcpy(r->hist + base, r->tokens, r->n_tokens * sizeof(int32_t));
  r->n_hist = base + r->n_tokens;
  /* A session whose ids no longer mirror its KV keeps this turn's only (for the penalties). */
  r->hist_base = ss && !ss->mirror ? UINT32_MAX : 0;
  r->admitted = true;
  r->t_start = sched__now();
  atomic_store(&r->pub_cached, r->cached_tokens);
  atomic_store(&r->pub_queue_us, (uint64_t)((r->t_start - r->t_submit) * 1e6));
  atomic_store(&r->pub_state, SCHED_STATE_PREFILL);
  return 0;
}

/* Whether id a ranks above id b: the higher logit, the lower id on a tie. */
static bool logit_above(const float *logits, int32_t a, int32_t b) {
  return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
}

/* The top-k log-probabilities of a token event: one pass over the vocabulary with a k-entry
 * min-heap (O(V log k) on the engine thread; k <= SCHED_MAX_TOP), then the k sorted. */
static void sched_logprobs(const float *logits, uint32_t n_vocab, int32_t tok, uint32_t k,
                           struct sched_event *ev) {
  double mx = logits[0], sum = 0;
  for (uint32_t i = 1; i < n_vocab; i++)
    mx = fmax(mx, logits[i]);
  for (uint32_t i = 0; i < n_vocab; i++)
    sum += exp((double)logits[i] - mx);
  double lse = mx + log(sum);
  ev->logprob = (float)((double)logits[tok] - lse);
  if (k > SCHED_MAX_TOP) k = SCHED_MAX_TOP;
  if (k > n_vocab) k = n_vocab;
  int32_t *h = ev->top_id; /* heap[0] is the lowest-ranked of those kept */
  uint32_t n = 0;
  for (uint32_t i = 0; i < n_vocab; i++) {
    int32_t id = (int32_t)i;
    uint32_t at;
    if (n < k) { /* sift up */
      at = n++;
      while (at > 0 && logit_above(logits, h[(at - 1) / 2], id)) {
        h[at] = h[(at - 1) / 2];
        at = (at - 1) / 2;
      }
      h[at] = id;
      continue;
    }
    if (!k || !logit_above(logits, id, h[0])) continue;
    at = 0; /* replace the root, sift down */
    for (;;) {
      uint32_t c = 2 * at + 1;
      if (c >= n) break;
      if (c + 1 < n && logit_above(logits, h[c], h[c + 1])) c++;
      if (!logit_above(logits, id, h[c])) break;
      h[at] = h[c];
      at = c;
    }
    h[at] = id;
  }
  for (uint32_t i = 1; i < n; i++) { /* best first */
    int32_t id = h[i];
    uint32_t j = i;
    for (; j > 0 && logit_above(logits, id, h[j - 1]); j--)
      h[j] = h[j - 1];
    h[j] = id;
  }
  for (uint32_t j = 0; j < n; j++)
    ev->top_logprob[j] = (float)((double)logits[h[j]] - lse);
  ev->n_top = n;
}

static bool sched_is_eog(const struct sched_req *r, int32_t tok) {
  for (uint32_t i = 0; i < r->n_eog; i++)
    if (r->eog[i] == tok) return true;
  return false;
}

/* Samples r's next token from row (n_vocab logits, edited by the penalties), given hist; the
 * log-probs, when asked for, go into ev from the logits as the model gave them. Returns the token
 * or a negative code. */
static int32_t sched_pick(struct sched *s, struct sched_req *r, float *row,
                          struct sched_event *ev) {
  const struct model_hparams *hp = engine_hparams(s->e);
  if (r->logprobs) memcpy(r->scratch, row, hp->n_vocab * sizeof(float));
  int32_t tok = sampler_sample(r->smp, row, r->hist, r->n_hist);
  if (tok >= 0 && r->logprobs && !sched_is_eog(r, tok))
    sched_logprobs(r->scratch, hp->n_vocab, tok, r->logprobs, ev);
  return tok;
}

/* tok is r's next token (its sequence holding len tokens before it): emitted, unless it ends the
 * generation. Returns why r is finished, or -1 when it goes on. */
static int sched_take(struct sched *s, struct sched_req *r, int32_t tok, struct sched_event *ev,
                      uint32_t len) {
  const struct model_hparams *hp = engine_hparams(s->e);
  if (!r->t_first) r->t_first = sched__now();
  r->next = tok;
  if (sched_is_eog(r, tok)) return SCHED_FINISH_STOP;
  ev->token = tok;
  r->n_generated++;
  if (r->n_hist == r->cap_hist && r->session) {
    /* A session's turn outgrew its history buffer under a context policy: only the penalties
     * read it, so its older half goes (a one-shot request's hist mirrors its sequence and is
     * trimmed by each shift instead). */
    uint32_t cut = r->n_hist / 2;
    memmove(r->hist, r->hist + cut, (r->n_hist - cut) * sizeof *r->hist);
    r->n_hist -= cut;
    r->hist_base = UINT32_MAX; /* no longer a window of the sequence */
  }
  if (r->n_hist < r->cap_hist) r->hist[r->n_hist++] = tok;
  sched_emit(s, ev);
  bool wall = r->overflow == KV_OVERFLOW_ERROR && len + 1 >= hp->n_ctx_train;
  if ((r->max_tokens && r->n_generated >= r->max_tokens) || wall) return SCHED_FINISH_LENGTH;
  return -1;
}

/* r's sequence holds `keep` tokens whose ids are in hist: the rest (rejected drafts) goes, its
 * full blocks become findable, and a windowed model gives back what no later query reads, except
 * what a failed session turn must be able to rewind to (sched_finish: its start, until the first
 * token). */
static void sched_settle(struct sched *s, struct sched_req *r, uint32_t keep, uint32_t accepted) {
  if (engine_seq_len(r->seq) > keep) engine_seq_truncate(s->e, r->seq, keep);
  sched__spec_settle(s, r, keep, accepted);
  if (r->hist_base == 0) engine_seq_register(s->e, r->seq, r->hist, engine_seq_len(r->seq));
  engine_seq_drop_window(s->e, r->seq,
                         r->session && r->n_generated == 0 && !r->n_shifts ? r->sess_base
                                                                           : UINT32_MAX);
}

/* After a step that gave r's logits: rows 0..k follow its sequence's first `base` tokens and then
 * each of its k drafts (r->spec_tok[1..k]). The sampler runs over the rows in order exactly as it
 * would one step at a time, and a draft is kept while it equals what was sampled; the first
 * token that differs (or the one after the last draft) is the next to decode. So the tokens are
 * those of decoding without drafts, and drafts only save steps. False when r ended. */
static bool sched_verify(struct sched *s, struct sched_req *r, struct sched_req **list,
                         uint32_t base, uint32_t k) {
  uint32_t v = engine_hparams(s->e)->n_vocab;
  for (uint32_t j = 0;; j++) {
    struct sched_event ev = {.req = r};
    int32_t tok = sched_pick(s, r, r->logits + (size_t)j * v, &ev);
    if (tok < 0) {
      sched_settle(s, r, base + j, j);
      r->next = -1;
      sched_finish_from(s, list, r, SCHED_FINISH_ERROR, tok);
      return false;
    }
    int why = sched_take(s, r, tok, &ev, base + j);
    bool hit = j < k && tok == r->spec_tok[j + 1];
    if (hit && why < 0) continue; /* the draft's K/V, already in the sequence, is kept */
    sched_settle(s, r, base + j, j + hit);
    if (why >= 0) {
      sched_finish_from(s, list, r, (enum sched_finish)why, 0);
      return false;
    }
    return true;
  }
}

static int sched_reserve_items(struct sched *s, uint32_t n) {
  if (n <= s->cap_items) return 0;
  uint32_t cap = n * 2;
  struct engine_item *it = realloc(s->items, cap * sizeof *it);
  if (!it) return KVD_ENOMEM;
  s->items = it;
  struct sched_req **ir = realloc(s->item_req, cap * sizeof *ir);
  if (!ir) return KVD_ENOMEM;
  s->item_req = ir;
  s->cap_items = cap;
  return 0;
}

static uint32_t list_len(const struct sched_req *r) {
  uint32_t n = 0;
  for (; r; r = r->next_req)
    n++;
  return n;
}

/* Applies what the loop sent, in order. */
static void sched_take_inbox(struct sched *s, struct inbox_item *it) {
  while (it) {
    struct inbox_item *next = it->next;
    switch (it->kind) {
    case INBOX_REQ:
      if (it->req->snapshot) {
        /* session.save: the session is idle (the loop runs one request per session), so the
         * copy is taken now, between steps. */
        struct sched_req *r = it->req;
        sched__session_link(s, r->session);
        int rc = sched__snapshot(s, r);
        if (rc < 0) sched_snapshot_clear(r->snapshot);
        r->t_end = sched__now();
        struct sched_event ev = {.req = r,
                                 .done = true,
                                 .finish = rc < 0 ? SCHED_FINISH_ERROR : SCHED_FINISH_STOP,
                                 .error = rc};
        sched_emit(s, &ev);
        break;
      }
      list_append(&s->waiting, it->req);
      break;
    case INBOX_FORK:
      sched__session_link(s, it->a);
      /* The ids first (room for them was allocated with the fork), then the KV. */
      memcpy(it->b->hist, it->a->hist, it->a->n_hist * sizeof *it->a->hist);
      it->b->n_hist = it->a->n_hist;
      it->b->mirror = it->a->mirror;
      if (!it->a->seq && it->a->swap) {
        /* The source is in the host tier: the copy gets a copy of that. */
        struct sched_kv_copy *c = calloc(1, sizeof *c);
        uint64_t bytes = (uint64_t)it->a->swap->n_blocks * it->a->swap->block_bytes;
        if (c) {
          *c = *it->a->swap;
          c->data = malloc((size_t)bytes);
          if (c->data) {
            memcpy(c->data, it->a->swap->data, (size_t)bytes);
            it->b->swap = c;
          } else {
            free(c);
          }
        }
        if (!it->b->swap && !(it->b->mirror && !it->a->swap->shifted)) {
          it->b->n_hist = 0; /* out of memory: the copy starts empty */
          it->b->pending = -1;
          atomic_store(&it->b->len, 0);
        } else {
          it->b->pending = it->a->pending;
        }
        engine_seq_unreserve(it->b->reserved);
        it->b->reserved = NULL;
        sched__session_link(s, it->b);
        break;
      }
      sched__session_link(s, it->b);
      it->b->pending = it->a->pending;
      if (it->a->seq && engine_seq_fork_into(s->e, it->a->seq, it->b->reserved) == 0) {
        it->b->seq = it->b->reserved;
        it->b->reserved = NULL;
      } else if (it->a->seq) {
        /* Cannot happen (reserved for the idle source's length); the allocating fork then. */
        if (engine_seq_fork(s->e, it->a->seq, &it->b->seq) < 0) {
          it->b->seq = NULL;
          it->b->pending = -1;
          it->b->n_hist = 0;
          atomic_store(&it->b->len, 0);
        }
      }
      engine_seq_unreserve(it->b->reserved); /* unused: the source had no sequence yet */
      it->b->reserved = NULL;
      break;
    case INBOX_FREE:
      sched__session_unlink(s, it->a); /* its host copy goes too */
      engine_seq_unreserve(it->a->reserved);
      engine_seq_free(s->e, it->a->seq);
      if (it->a->swap) { /* restored and never used: not counted in the tier */
        free(it->a->swap->data);
        free(it->a->swap);
      }
      free(it->a->hist);
      free(it->a);
      break;
    }
    free(it);
    it = next;
  }
}

static void sched_cancel_flagged(struct sched *s, struct sched_req **list) {
  for (struct sched_req *r = *list, *next; r; r = next) {
    next = r->next_req;
    if (atomic_load(&r->cancel)) sched_finish_from(s, list, r, SCHED_FINISH_CANCELLED, 0);
  }
}

/* Frees a running request's blocks and puts it back at the head of the queue: it will prefill its
 * prompt and everything it generated so far (the last sampled token included, whose logits are
 * what it needs next), then go on sampling as if nothing happened. */
static void sched_preempt(struct sched *s, struct sched_req *r) {
  list_remove(&s->running, r);
  sched__spec_drop(s, r);
  engine_seq_free(s->e, r->seq);
  r->seq = NULL;
  int32_t *t = malloc(r->n_hist * sizeof *t);
  if (!t) {
    r->next = -1;
    sched_finish(s, r, SCHED_FINISH_ERROR, KVD_ENOMEM);
    return;
  }
  memcpy(t, r->hist, r->n_hist * sizeof *t);
  free(r->tokens);
  r->tokens = t;
  r->n_tokens = r->n_hist;
  r->n_prefilled = 0;
  r->next = -1;
  r->next_req = s->waiting;
  s->waiting = r;
  s->local.preemptions++;
}

/* A running session request gives its blocks up: into a host copy (it resumes decoding where it
 * was once they are back), else, if its ids give its KV back, nothing kept (it recomputes them
 * like a preempted one-shot request). KVD_E_KV_EXHAUSTED (nothing changed) when neither. */
static int sched_preempt_session(struct sched *s, struct sched_req *r) {
  struct sched_session *ss = r->session;
  bool mirror = ss->mirror;
  ss->mirror = r->hist_base == 0; /* this turn's hist is what recomputing would run */
  int32_t *t = ss->mirror ? malloc((r->n_hist ? r->n_hist : 1) * sizeof *t) : NULL;
  int rc = sched__swap_out(s, ss);
  ss->mirror = mirror;
  if (rc == 0 && !ss->swap && !t) {
    /* Given up with no copy and no room for the ids: the KV is gone. Cannot happen for a
     * request whose hist mirrors (t was allocated), so this is host OOM. */
    r->seq = NULL;
    r->next = -1;
    list_remove(&s->running, r);
    sched_finish(s, r, SCHED_FINISH_ERROR, KVD_ENOMEM);
    return 0;
  }
  if (rc < 0) {
    free(t);
    return rc;
  }
  list_remove(&s->running, r);
  sched__spec_drop(s, r);
  r->seq = NULL;
  if (ss->swap) {
    free(t);
    r->swapped = true; /* r->next is still the token it decodes next */
  } else {
    memcpy(t, r->hist, r->n_hist * sizeof *t);
    free(r->tokens);
    r->tokens = t;
    r->n_tokens = r->n_hist;
    r->n_prefilled = r->n_prefix = 0;
    r->next = -1;
  }
  r->next_req = s->waiting;
  s->waiting = r;
  s->local.preemptions++;
  return 0;
}

/* A one-shot request whose sequence was given up before its prompt was in starts over from its
 * tokens: hist, which a context shift may have trimmed, mirrors them again. */
static void sched_reset_hist(struct sched_req *r) {
  memcpy(r->hist, r->tokens, r->n_tokens * sizeof *r->hist);
  r->n_hist = r->n_tokens;
  r->hist_base = 0;
}

/* Takes the blocks of the newest waiting one-shot request holding any (a half-run prompt, or
 * prefix blocks it pinned), other than keep: it starts over from the prefix cache when it runs
 * again. False when none holds blocks. */
static bool sched_reclaim_waiting(struct sched *s, const struct sched_req *keep) {
  struct sched_req *newest = NULL;
  for (struct sched_req *r = s->waiting; r; r = r->next_req)
    if (r != keep && r->seq && !r->session) newest = r;
  if (!newest) return false;
  engine_seq_free(s->e, newest->seq);
  newest->seq = NULL;
  newest->n_prefilled = newest->n_prefix = 0;
  sched_reset_hist(newest);
  s->local.preemptions++;
  return true;
}

/* Context policies: before r's sequence takes n more tokens past the context, drop what its
 * policy says (kv_overflow_plan) and rotate the rest into place. hist follows the sequence (the
 * tokens dropped from the cache leave it too), so a preempted request recomputes what its
 * cache held. 0 when there is room (or was made), else a negative code. */
static int sched_make_room(struct sched *s, struct sched_req *r, uint32_t n) {
  const struct model_hparams *hp = engine_hparams(s->e);
  struct kv_pool_stats kv;
  engine_kv_stats(s->e, &kv);
  uint32_t len = engine_seq_len(r->seq);
  uint32_t keep = model_all_windowed(hp) ? 0 : r->keep;
  struct kv_overflow_cut cut;
  int rc = kv_overflow_plan(r->overflow, len, n, hp->n_ctx_train, keep, kv.block_size, &cut);
  if (rc < 0 || cut.n_drop == 0) return rc;
  rc = engine_seq_shift(s->e, r->seq, cut.keep, cut.n_drop);
  if (rc < 0) return rc;
  r->n_shifts++;
  s->local.shifts++;
  s->local.shift_dropped += cut.n_drop;
  /* hist[i] is position hist_base + i: take out the part of [keep, keep + n_drop) it covers. */
  if (r->hist_base != UINT32_MAX) {
    uint64_t base = r->hist_base, lo = cut.keep > base ? cut.keep : base;
    uint64_t hi = (uint64_t)cut.keep + cut.n_drop, end = base + r->n_hist;
    if (hi > end) hi = end;
    if (lo < hi) {
      memmove(r->hist + (lo - base), r->hist + (hi - base), (end - hi) * sizeof *r->hist);
      r->n_hist -= (uint32_t)(hi - lo);
    }
    if (base >= (uint64_t)cut.keep + cut.n_drop)
      r->hist_base -= cut.n_drop;
    else if (base > cut.keep)
      r->hist_base = cut.keep;
  }
  return 0;
}

/* One step: every running request's next token, then prompt chunks first come first served
 * while the token budget lasts. Returns false when there was nothing to run. */
static bool sched_step(struct sched *s) {
  uint32_t budget = s->o.step_tokens;
  uint32_t n_run = list_len(s->running), n = 0;
  /* What this step may take: a block per running request and its prompt budget's worth. The
   * cached blocks that would be evicted for them go to the host tier first. */
  struct kv_pool_stats kvs;
  engine_kv_stats(s->e, &kvs);
  if (s->waiting || s->running)
    sched__spill(s, n_run + 1 + budget / (kvs.block_size ? kvs.block_size : 1));
  if (sched_reserve_items(s, n_run + list_len(s->waiting)) < 0) return false;
  /* Blocks this step will take, so prompts are admitted only while they fit: a prompt that would
   * push running requests out is left waiting rather than admitted and preempted in turn. */
  uint32_t reserved = 0;
  for (struct sched_req *r = s->running, *next; r && budget; r = next) {
    next = r->next_req;
    if (!sched_has_room(s, r)) continue; /* its reader is behind: it waits for a drain */
    int mrc = r->overflow != KV_OVERFLOW_ERROR ? sched_make_room(s, r, 1) : 0;
    if (mrc < 0) {
      r->next = -1;
      sched_finish_from(s, &s->running, r, SCHED_FINISH_ERROR, mrc);
      continue;
    }
    budget--;
    s->items[n] = (struct engine_item){r->seq, &r->next, 1, r->logits, 1};
    s->item_req[n++] = r;
    reserved += engine_seq_step_blocks(s->e, r->seq, 1);
  }
  uint32_t n_decode = n, reserved_decode = reserved;
  uint32_t rows = engine_max_logits(s->e) > n ? engine_max_logits(s->e) - n : 0;
  struct sched_req *blocked = NULL;
  bool resumed = false; /* a swapped request went back to running: it decodes next step */
  for (struct sched_req *r = s->waiting, *next; r && budget && n_run < s->o.max_running; r = next) {
    next = r->next_req;
    int arc = 0;
    struct sched_session *ss = r->session;
    if (ss && !ss->seq && ss->swap && (!r->admitted || r->swapped)) {
      /* Its session's KV is in the host tier: back into the pool first, pushing idle sessions
       * out if that is what it takes. */
      /* Like a prompt, only when its blocks and one more fit besides what this step's running
       * requests take: one swapped in over their needs would fail the step and be swapped out
       * again at once. */
      uint32_t want = reserved + ss->swap->n_blocks + 1;
      arc =
          want <= engine_kv_available(s->e) || sched__evict_idle(s, want) ? 0 : KVD_E_KV_EXHAUSTED;
      if (arc == 0 && want <= engine_kv_available(s->e)) arc = sched__swap_in(s, ss);
      if (arc == 0 && !ss->seq) arc = KVD_E_KV_EXHAUSTED;
      if (arc == KVD_E_KV_EXHAUSTED) {
        blocked = r;
        break;
      }
    }
    if (arc < 0) {
      /* nothing more to try */
    } else if (r->swapped) {
      /* Preempted while decoding and swapped back: it decodes from the next step on. */
      r->seq = ss->seq;
      r->swapped = false;
      list_remove(&s->waiting, r);
      list_append(&s->running, r);
      n_run++;
      resumed = true;
      continue;
    } else if (!r->admitted) {
      arc = sched_admit(s, r);
    } else if (!r->seq) { /* resuming after preemption: its own blocks may still be cached */
      uint32_t cached = 0;
      arc = engine_seq_new_prefix(s->e, r->tokens, r->n_tokens, &r->seq, &cached);
      r->n_prefilled = r->n_prefix = cached;
      if (arc == 0 && ss) ss->seq = r->seq;
    }
    if (arc < 0) {
      r->next = -1;
      sched_finish_from(s, &s->waiting, r, SCHED_FINISH_ERROR, arc);
      continue;
    }
    if (r->n_prefilled >= r->n_tokens) continue; /* cannot happen: a prefix never covers all */
    uint32_t left = r->n_tokens - r->n_prefilled;
    uint32_t chunk = left < budget ? left : budget;
    if (r->overflow != KV_OVERFLOW_ERROR) {
      /* A prompt past the context runs up to it, then makes room for the next chunk. */
      uint32_t n_ctx = engine_hparams(s->e)->n_ctx_train, len = engine_seq_len(r->seq);
      if (len >= n_ctx) {
        uint32_t want = chunk < n_ctx / 2 ? chunk : n_ctx / 2;
        int mrc = sched_make_room(s, r, want);
        if (mrc < 0) {
          r->next = -1;
          sched_finish_from(s, &s->waiting, r, SCHED_FINISH_ERROR, mrc);
          continue;
        }
        len = engine_seq_len(r->seq);
      }
      if (chunk > n_ctx - len) chunk = n_ctx - len;
    }
    uint32_t need = engine_seq_step_blocks(s->e, r->seq, chunk);
    /* Measured now, not at the start of the step: a prefix this admission pinned was counted as
     * evictable until it was pinned. */
    /* Idle sessions' blocks go to the host tier before a prompt waits for them. */
    if (reserved + need > engine_kv_available(s->e) && sched__evict_idle(s, reserved + need))
      need = engine_seq_step_blocks(s->e, r->seq, chunk);
    if (reserved + need > engine_kv_available(s->e)) {
      /* No room now. A prompt that has computed nothing gives its shared prefix blocks back
       * (they stay cached) instead of pinning them while it waits; first come, first served. */
      if (!r->session && r->n_prefilled == r->n_prefix) {
        engine_seq_free(s->e, r->seq);
        r->seq = NULL;
        r->n_prefilled = r->n_prefix = 0;
        sched_reset_hist(r);
      }
      blocked = r;
      break;
    }
    if (chunk == left && !rows) break; /* no logits row left for its first token */
    reserved += need;
    rows -= chunk == left;
    s->items[n] = (struct engine_item){r->seq, r->tokens + r->n_prefilled, chunk,
                                       chunk == left ? r->logits : NULL, 1};
    s->item_req[n++] = r;
    budget -= chunk;
    n_run++;
  }
  /* What the step has left (tokens, logits rows, blocks) goes to drafts of the running requests,
   * after the prompts: a draft only saves steps, a prompt waiting is a user waiting. */
  if (n_decode) sched__spec_plan(s, n_decode, &budget, &rows, &reserved);
  if (n == 0) {
    if (resumed) return true;
    if (blocked && blocked == s->waiting && !s->running) {
      /* Nothing runs and the first prompt does not fit: requests behind it give their blocks
       * back first. If none holds any (sessions hold the rest) it would wait forever, so it ends
       * now with a clear error. */
      if (sched_reclaim_waiting(s, blocked)) return true;
      blocked->next = -1;
      sched_finish_from(s, &s->waiting, blocked, SCHED_FINISH_ERROR, KVD_E_KV_EXHAUSTED);
      return true;
    }
    return false;
  }

  double t0 = sched__now();
  int rc = engine_forward(s->e, s->items, n);
  if (rc == KVD_E_KV_EXHAUSTED) {
    /* Drafts go first. */
    bool drafts = false;
    for (uint32_t i = 0; i < n_decode; i++)
      drafts |= s->item_req[i]->n_draft > 0;
    if (drafts) {
      sched__spec_strip(s, n_decode);
      rc = engine_forward(s->e, s->items, n);
    }
  }
  if (rc == KVD_E_KV_EXHAUSTED && n > n_decode) {
    /* Prompts wait for memory; the running requests go on without them. */
    n = n_decode;
    rc = n ? engine_forward(s->e, s->items, n) : 0;
  }
  if (rc == KVD_E_KV_EXHAUSTED) {
    /* Even the running requests do not fit. Idle sessions leave the pool first; then waiting
     * prompts holding blocks (half-run, or a pinned prefix) give them back; then the newest
     * running request is preempted (a session's by swapping its KV to the host tier, a one-shot
     * request's by recomputation: its blocks go back, its tokens are kept, it resumes first),
     * unless it is the only one. If nothing can give way, the newest ends in an error. */
    struct sched_req *newest = NULL, *newest_oneshot = NULL;
    for (struct sched_req *r = s->running; r; r = r->next_req) {
      newest = r;
      if (!r->session) newest_oneshot = r;
    }
    bool alone = s->running && !s->running->next_req;
    if (sched__evict_idle(s, reserved_decode + 1) || sched_reclaim_waiting(s, NULL)) {
    } else if (newest && !alone && newest->session && sched_preempt_session(s, newest) == 0) {
    } else if (newest_oneshot && !alone) {
      sched_preempt(s, newest_oneshot);
    } else if (newest) {
      newest->next = -1;
      sched_finish_from(s, &s->running, newest, SCHED_FINISH_ERROR, KVD_E_KV_EXHAUSTED);
    } else if (s->waiting) {
      /* Nothing runs and the first prompt still does not fit: it never will. */
      struct sched_req *r = s->waiting;
      r->next = -1;
      sched_finish_from(s, &s->waiting, r, SCHED_FINISH_ERROR, KVD_E_KV_EXHAUSTED);
    }
    return true;
  }
  if (rc < 0) {
    for (uint32_t i = 0; i < n; i++) {
      struct sched_req *r = s->item_req[i];
      r->next = -1;
      sched_finish_from(s, i < n_decode ? &s->running : &s->waiting, r, SCHED_FINISH_ERROR, rc);
    }
    return true;
  }
  s->local.steps++;
  s->disk_pending = s->o.disk != NULL; /* blocks it filled may be registered now */
  s->local.last_step_ms = (sched__now() - t0) * 1e3;
  if (n == n_decode) { /* a decode step (with its drafts): what verifying costs */
    double t = s->local.last_step_ms * 1e-3;
    s->t_step = s->t_step > 0 ? 0.8 * s->t_step + 0.2 * t : t;
  }
  uint32_t tokens = 0;
  for (uint32_t i = 0; i < n; i++) {
    struct sched_req *r = s->item_req[i];
    tokens += s->items[i].n_tokens;
    /* The blocks this step filled are registered once the tokens in them are known (sched_settle:
     * hist holds every id in the sequence, a session's earlier turns included, unless a session's
     * turn outgrew it); rejected drafts are cut off first. */
    uint32_t len = engine_seq_len(r->seq);
    if (i < n_decode) {
      s->local.decode_tokens++;
      sched_verify(s, r, &s->running, len - r->n_draft, r->n_draft);
      continue;
    }
    s->local.prefill_tokens += s->items[i].n_tokens;
    r->n_prefilled += s->items[i].n_tokens;
    if (r->n_prefilled < r->n_tokens) {
      sched_settle(s, r, len, 0);
      continue;
    }
    /* The prompt is in: from now on the request decodes. */
    list_remove(&s->waiting, r);
    list_append(&s->running, r);
    atomic_store(&r->pub_state, SCHED_STATE_DECODE);
    sched_verify(s, r, &s->running, len, 0);
  }
  if (tokens > s->local.batch_tokens_max) s->local.batch_tokens_max = tokens;
  return true;
}

static void sched_publish(struct sched *s) {
  engine_kv_stats(s->e, &s->local.kv);
  s->local.host_bytes = s->host_used;
  s->local.host_budget = s->o.host_bytes;
  uint32_t n = 0, swapped = 0;
  for (const struct sched_session *ss = s->sessions; ss; ss = ss->next) {
    n++;
    swapped += ss->swap != NULL;
  }
  s->local.sessions = n;
  s->local.sessions_swapped = swapped;
  s->local.ram_blocks = s->ram_n;
  s->local.has_draft = s->o.draft != NULL;
  if (s->o.draft) engine_kv_stats(s->o.draft, &s->local.draft_kv);
  if (s->o.disk) {
    struct tier_disk_stats ts;
    tier_disk_stats(s->o.disk, &ts);
    s->local.disk_blocks = ts.blocks;
    s->local.disk_bytes = ts.bytes;
  }
  s->local.running = list_len(s->running);
  s->local.waiting = list_len(s->waiting);
  pthread_mutex_lock(&s->lock);
  s->stats = s->local;
  pthread_mutex_unlock(&s->lock);
}

static void *sched_main(void *arg) {
  struct sched *s = arg;
  for (;;) {
    pthread_mutex_lock(&s->lock);
    while (!s->stop && !s->in_head && !s->running && !s->waiting && !s->disk_pending)
      pthread_cond_wait(&s->wake, &s->lock);
    struct inbox_item *in = s->in_head;
    s->in_head = s->in_tail = NULL;
    bool stop = s->stop;
    pthread_mutex_unlock(&s->lock);
    sched_take_inbox(s, in);
    if (stop) {
      for (struct sched_req *r = s->running; r; r = s->running)
        sched_finish_from(s, &s->running, r, SCHED_FINISH_CANCELLED, 0);
      for (struct sched_req *r = s->waiting; r; r = s->waiting)
        sched_finish_from(s, &s->waiting, r, SCHED_FINISH_CANCELLED, 0);
      /* What the prefix cache holds goes to the disk tier, so the next start finds it; at most
       * what the tier holds (more would only push out what was just written). */
      if (s->o.disk) {
        /* The host tier's prefix blocks first (those the disk lacks), then the pool's. */
        while (s->ram_n && sched__ram_shrink(s, s->o.host_bytes)) {
        }
        struct tier_disk_stats ts;
        tier_disk_stats(s->o.disk, &ts);
        uint64_t left = ts.budget / (engine_kv_block_bytes(s->e) + 32);
        for (uint32_t k; left > 0 && (k = sched__disk_flush(s, 32)) > 0;)
          left = left > k ? left - k : 0;
      }
      break;
    }
    sched_cancel_flagged(s, &s->running);
    sched_cancel_flagged(s, &s->waiting);
    bool ran = sched_step(s);
    /* Idle: a batch of blocks to the disk tier, then look at the inbox again. */
    if (!ran && s->disk_pending && sched__disk_flush(s, 32) == 0) s->disk_pending = false;
    if (!ran && s->disk_pending) ran = true;
    sched_publish(s);
    if (s->o.notify) s->o.notify(s->o.notify_ud);
    pthread_mutex_lock(&s->lock);
    if (!ran) {
      /* Nothing can run now (readers behind, or memory held by sessions): sleep until the loop
       * sends something, cancels, or drains events. Each of those sets kick under the lock, so
       * none is missed between the step and this wait. */
      while (!s->kick && !s->in_head && !s->stop)
        pthread_cond_wait(&s->wake, &s->lock);
    }
    s->kick = false;
    pthread_mutex_unlock(&s->lock);
  }
  sched_publish(s);
  if (s->o.notify) s->o.notify(s->o.notify_ud);
  return NULL;
}

int sched_new(struct engine *e, const struct sched_opts *opts, struct sched **ret) {
  struct sched *s = calloc(1, sizeof *s);
  if (!s) return KVD_ENOMEM;
  s->e = e;
  if (opts) s->o = *opts;
  if (!s->o.step_tokens || s->o.step_tokens > engine_max_step_tokens(e))
    s->o.step_tokens = engine_max_step_tokens(e);
  if (!s->o.max_running) s->o.max_running = 64;
  if (pthread_mutex_init(&s->lock, NULL) != 0) {
    free(s);
    return KVD_ENOMEM;
  }
  if (pthread_cond_init(&s->wake, NULL) != 0) {
    pthread_mutex_destroy(&s->lock);
    free(s);
    return KVD_ENOMEM;
  }
  atomic_init(&s->out_blocked, false);
  sched_publish(s);
  if (pthread_create(&s->thread, NULL, sched_main, s) != 0) {
    /* A constructor that fails takes nothing: the engine stays the caller's (sched_free would
     * free it, and the caller frees it too). */
    s->e = NULL;
    s->o.disk = NULL;
    s->o.draft = NULL;
    sched_free(s);
    return KVD_EAGAIN;
  }
  s->thread_started = true;
  *ret = s;
  return 0;
}

void sched_free(struct sched *s) {
  if (!s) return;
  if (s->thread_started) {
    pthread_mutex_lock(&s->lock);
    s->stop = true;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
    pthread_join(s->thread, NULL);
  } else {
    sched_take_inbox(s, s->in_head);
  }
  sched__spec_free(s);
  if (s->e) engine_free(s->e);
  sched__ram_free(s);
  tier_disk_close(s->o.disk);
  pthread_cond_destroy(&s->wake);
  pthread_mutex_destroy(&s->lock);
  free(s->events);
  free(s->items);
  free(s->item_req);
  free(s);
}

struct engine *sched_engine(struct sched *s) {
  return s->e;
}
