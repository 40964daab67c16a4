/* The scheduler's own structs, shared by scheduler.c (the engine thread's steps) and sched_tier.c
 * (sessions in the pool and the host-RAM tier). Not an API: scheduler.h is. */
#ifndef KVD_SCHED_INTERNAL_H
#define KVD_SCHED_INTERNAL_H

#include "scheduler.h"

struct inbox_item;

/* A session's tokens are hist[0, n_hist) then pending; its KV is in the pool (seq, whose len is
 * n_hist while it is idle), or in a host copy (swap, holding n_hist tokens), or nowhere (its next
 * turn recomputes hist, through the prefix cache where blocks of it are still cached). */
struct sched_session {
  struct engine_seq *seq;       /* engine thread only; NULL until the first request */
  struct inbox_item *free_item; /* allocated up front so closing a session cannot fail */
  struct engine_seq *reserved;  /* a fork's sequence, allocated when the fork was asked for */
  int32_t pending;              /* last sampled token, not yet run through the model; -1 = none */
  _Atomic uint32_t len;         /* history tokens, pending included */
  /* Engine thread (the loop sets them only before the session is first sent to it). */
  int32_t *hist; /* ids at positions [0, n_hist) of the sequence */
  uint32_t n_hist, cap_hist;
  bool mirror; /* hist is exactly the sequence's ids (false after a turn outgrew its buffer):
                  only then may its blocks be registered or recomputed from hist */
  struct sched_kv_copy *swap; /* the host copy while swapped out of the pool */
  bool busy;                  /* a request of it is admitted and not finished */
  bool linked;                /* on the engine thread's list of sessions */
  double last_used;           /* when its last request ended (recency for swapping) */
  struct sched_session *prev, *next;
};

/* The inbox keeps requests and session commands in one FIFO so a fork or a free is applied
 * before any request submitted after it. */
enum inbox_kind { INBOX_REQ, INBOX_FORK, INBOX_FREE };
struct inbox_item {
  enum inbox_kind kind;
  struct sched_req *req;
  struct sched_session *a, *b; /* FORK: a = source, b = copy; FREE: a */
  struct inbox_item *next;
};

struct sched {
  struct engine *e;
  struct sched_opts o;
  pthread_t thread;
  bool thread_started;
  pthread_mutex_t lock;
  pthread_cond_t wake;
  bool stop;
  bool kick; /* something the engine thread waits for happened (cancel, drained events) */
  struct inbox_item *in_head, *in_tail;
  /* The event ring: ev_cap >= ev_reserved (SCHED_EV_WINDOW per submitted request whose DONE has
   * not been drained) >= ev_count, so emitting always finds a slot. Grown only in sched_submit. */
  struct sched_event *events;
  uint32_t ev_head, ev_count, ev_cap;
  uint64_t ev_reserved;
  atomic_bool out_blocked;  /* a running request was left out of a step for its full window */
  struct sched_stats stats; /* published copy, under lock */

  /* engine thread only */
  struct sched_req *waiting; /* admitted or not, prompt not finished; FIFO */
  struct sched_req *running; /* decoding */
  struct engine_item *items;
  struct sched_req **item_req;
  uint32_t cap_items;
  struct sched_stats local;
  struct sched_session *sessions; /* every session the engine thread has seen */
  uint64_t host_used;             /* bytes of the host copies sessions hold */
  bool disk_pending;              /* registered blocks may be missing from the disk tier */
  /* The host tier's prefix blocks: cached blocks about to be evicted from the pool are copied
   * here first (sched__spill); oldest first in a ring, found through an open-addressing index
   * of keys (0 = empty slot). Their bytes count in host_used with the sessions' copies. */
  struct sched_ram_block {
    uint64_t key;
    uint8_t *data;
  } * ram;
  uint32_t ram_cap, ram_head, ram_n;
  uint32_t *ram_index; /* slot -> ring entry + 1 (0 = empty) */
  size_t ram_mask;
  uint32_t persist_from; /* where the next scan for them starts */
  /* The draft model's step (sched_spec.c): a request drafting from it, with the most tokens it
   * may draft, an item and a logits row per request. */
  struct sched_draft {
    struct sched_req *r;
    uint32_t want;
  } * dcand;
  uint32_t *dmap; /* item -> dcand entry */
  struct engine_item *ditems;
  float *dlogits;
  uint32_t cap_dcand;
  /* Wall seconds of a decode step of the target and of one draft-model step (moving averages;
   * 0 until measured): what a draft-model token costs against what it may save. */
  double t_step, t_dstep;
};

double sched__now(void);

/* sched_tier.c, engine thread. */
void sched__session_link(struct sched *s, struct sched_session *ss);
void sched__session_unlink(struct sched *s, struct sched_session *ss);
/* Gives ss's blocks up: into a host copy within the tier's budget (older idle sessions' copies are
 * dropped for room when they can be recomputed), else, if ss can be recomputed from its tokens,
 * nothing kept. KVD_E_KV_EXHAUSTED when neither (a shifted session with no room in the tier):
 * nothing changed. */
int sched__swap_out(struct sched *s, struct sched_session *ss);
/* Gives ss a sequence again from its host copy, sharing what the prefix cache still holds of it.
 * KVD_E_KV_EXHAUSTED (nothing changed) when its blocks do not fit now. */
int sched__swap_in(struct sched *s, struct sched_session *ss);
/* Swaps idle sessions out, least recently used first, until `need` blocks are available.
 * Returns whether any was. */
bool sched__evict_idle(struct sched *s, uint32_t need);
/* session.save's request: fills r->snapshot from its idle session. */
int sched__snapshot(struct sched *s, struct sched_req *r);
void sched__copy_free(struct sched *s, struct sched_kv_copy *c);
/* The disk tier: extends seq (its len a multiple of the block size, its chain hashed up to it)
 * with the blocks of tokens the tier holds, while they follow on; returns the tokens added.
 * Writes up to max registered blocks it lacks; returns how many were looked at. */
uint32_t sched__disk_extend(struct sched *s, struct engine_seq *seq, const int32_t *tokens,
                            uint32_t n_tokens);
uint32_t sched__disk_flush(struct sched *s, uint32_t max);
/* Before a step that may evict: the cached blocks next in line that no lower tier has yet are
 * copied to the host tier (one submission), so evicting them loses nothing. */
void sched__spill(struct sched *s, uint32_t ahead);
/* Drops the oldest prefix blocks of the host tier (to the disk tier when it lacks them) until
 * `need` more bytes fit its budget; false when it holds none. */
bool sched__ram_shrink(struct sched *s, uint64_t need);
void sched__ram_free(struct sched *s);

/* sched_spec.c, engine thread. Drafts for the step's decode items [0, n_decode) within what is
 * left of its token budget, logits rows and free blocks (each taken from), extending the items
 * in place; a draft that cannot be made is simply not made. */
void sched__spec_plan(struct sched *s, uint32_t n_decode, uint32_t *budget, uint32_t *rows,
                      uint32_t *reserved);
/* Takes drafts back out of the step's decode items (a step that did not fit). */
void sched__spec_strip(struct sched *s, uint32_t n_decode);
/* After verification kept `keep` tokens of r's sequence: its draft sequence follows, and the
 * acceptance counts take in `accepted` of r->n_draft. */
void sched__spec_settle(struct sched *s, struct sched_req *r, uint32_t keep, uint32_t accepted);
/* Frees r's draft sequence (its request ends or gives its blocks up). */
void sched__spec_drop(struct sched *s, struct sched_req *r);
void sched__spec_free(struct sched *s);

#endif
