/* scheduler.h, not sched.h: that name is the C library's, which pthread.h includes. */
/* The scheduler: one engine thread per loaded model, fed through a queue, batching every running
 * request into one forward step (continuous batching).
 *
 * The loop thread submits requests (already tokenized) and session commands; the engine thread
 * admits them, builds each step from the decode tokens of all running requests plus prefill
 * chunks of waiting prompts under a per-step token budget, samples, and posts events (a token, or
 * the end of a request) back through a mutex-protected queue, calling `notify` (uv_async_send in
 * the daemon) so the loop drains them in one go. Every engine call happens on the engine thread;
 * the loop never blocks on the GPU.
 *
 * Ownership: a request belongs to the loop thread except between sched_submit() and the DONE event
 * that ends it, when the engine thread may read its inputs and write its private fields. After
 * DONE the engine thread never touches it again, so the loop may free it. */
#ifndef KVD_SCHED_H
#define KVD_SCHED_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "engine.h"
#include "sample.h"
#include "tier.h"

#define SCHED_MAX_TOP 20 /* most alternatives reported per token (IPC_MAX_LOGPROBS) */
/* Event slots reserved per request at submission: a request with this many events not yet
 * drained is left out of steps until the loop drains (backpressure on a slow reader), so the
 * engine thread never allocates, sleeps or drops an event to emit one. */
#define SCHED_EV_WINDOW 64

enum sched_finish {
  SCHED_FINISH_STOP,      /* the model's end-of-generation token */
  SCHED_FINISH_LENGTH,    /* max_tokens reached, or the context is full */
  SCHED_FINISH_CANCELLED, /* sched_cancel(), a client gone, or a stop string (the loop knows) */
  SCHED_FINISH_ERROR,     /* see the event's error */
};

enum sched_state { SCHED_STATE_QUEUED, SCHED_STATE_PREFILL, SCHED_STATE_DECODE };

/* Speculative decoding (sched_spec.c): a decode step of a request may carry up to SCHED_SPEC_MAX
 * drafted tokens after its next one, verified in the same step by the logits after each of them;
 * the tokens it emits are exactly those decoding one at a time would (the same sampler draws in
 * the same order), so greedy and seeded output never change, only the steps they take.
 *   AUTO    prompt lookup where the history repeats, else the draft model if one is loaded; the
 *           scheduler pauses it for a request whose drafts are mostly rejected
 *   OFF     one token per step
 *   LOOKUP  drafts copied from the request's own history (prompt and output) after the latest
 *           earlier occurrence of its last few tokens
 *   DRAFT   drafts from the draft model's greedy continuation (KVD_E_UNSUPPORTED at admission
 *           without one) */
enum sched_spec { SCHED_SPEC_AUTO, SCHED_SPEC_OFF, SCHED_SPEC_LOOKUP, SCHED_SPEC_DRAFT };
#define SCHED_SPEC_MAX 8 /* drafted tokens per request and step */

/* A conversation's KV on the engine thread: its sequence persists between requests. */
struct sched_session;
struct inbox_item;

struct sched_req {
  /* Inputs, set before sched_submit and read-only afterwards. */
  int32_t *tokens; /* new prompt tokens (owned by the request, freed by sched_req_free) */
  uint32_t n_tokens;
  struct sched_session *session; /* NULL: a fresh sequence freed when the request ends */
  struct sample_params sp;
  uint32_t max_tokens;
  uint32_t logprobs; /* alternatives per token to report, <= SCHED_MAX_TOP */
  /* Ids that end the generation (the vocabulary's end-of-generation set: eos, <|eot_id|>,
   * <|im_end|>, <end_of_turn>...); not copied, must outlive the request. None: the request runs
   * to max_tokens or the context. */
  const int32_t *eog;
  uint32_t n_eog;
  /* Past the context (kv.h): KV_OVERFLOW_ERROR (the zero value) refuses a prompt that does not
   * fit and ends generation at the context (SCHED_FINISH_LENGTH); SHIFT and WINDOW drop tokens
   * after the first `keep` (window: the attention sinks) whenever the sequence is full, so the
   * request runs to max_tokens or its end of text, and a prompt longer than the context runs in
   * chunks under the same policy. On a model whose every layer is windowed keep is 0 (the
   * window gave the first blocks back already). */
  enum kv_overflow overflow;
  uint32_t keep;
  enum sched_spec spec;
  void *ud;                        /* the loop's request */
  struct sched_snapshot *snapshot; /* not NULL: a session.save, see sched_session_restore */
  atomic_bool cancel;
  struct sched *sched;     /* set by sched_submit, so sched_cancel can wake the engine thread */
  _Atomic uint32_t ev_out; /* its events queued and not yet drained (<= SCHED_EV_WINDOW) */
  /* Published by the engine thread for status (any thread may read them). */
  _Atomic uint32_t pub_state;    /* enum sched_state */
  _Atomic uint32_t pub_cached;   /* cached_tokens once admitted */
  _Atomic uint64_t pub_queue_us; /* from sched_submit to admission */

  /* Engine-thread state (read by the loop only after DONE). */
  struct engine_seq *seq;
  struct sampler *smp;
  float *logits;        /* logits_rows rows of n_vocab: the last step's, one per verified token */
  uint32_t logits_rows;
  float *scratch;           /* unpenalised logits for log-probs */
  struct inbox_item *inbox; /* preallocated queue link */
  int32_t *hist;            /* prompt then generated ids, for the penalties */
  uint32_t n_hist, cap_hist;
  uint32_t n_prefilled; /* prompt tokens already run (or found in the prefix cache) */
  uint32_t n_prefix;    /* of those, the ones the prefix cache supplied at admission */
  uint32_t n_generated;
  uint32_t n_shifts;      /* context shifts this request ran (its sequence dropped tokens) */
  uint32_t hist_base;     /* the sequence position of hist[0] (a session's earlier turns) */
  uint32_t cached_tokens; /* tokens whose KV was reused at admission (a session's history, a
                             prefix-cache hit) rather than computed */
  uint32_t sess_base;     /* the session's history length when the turn began (its rewind point) */
  bool swapped;           /* preempted by swapping its KV to host memory: resumes decoding */
  int32_t sess_pending0;  /* the session's pending token before this turn took it */
  bool sess_taken;        /* the turn began on its session (rolled back if it yields nothing) */
  int32_t next;           /* sampled, not yet run through the model; -1 = none */
  bool admitted;
  /* Speculation: this step's item is spec_tok[0, 1 + n_draft) (next, then the drafts); the
   * acceptance seen so far (decayed counts of drafts accepted and tried), drafting paused for
   * spec_pause more tokens (AUTO after poor acceptance), the draft model's sequence, and the
   * totals the request reports. */
  int32_t spec_tok[SCHED_SPEC_MAX + 1];
  uint32_t n_draft;
  bool spec_model; /* this step's drafts came from the draft model (else the lookup) */
  float spec_hit, spec_try;
  uint32_t spec_pause;
  struct engine_seq *dseq;
  uint32_t draft_tokens, accepted_tokens;
  double t_submit, t_start, t_first, t_end; /* monotonic seconds */
  struct sched_req *next_req;               /* queue / running list link */
};

struct sched_event {
  struct sched_req *req;
  bool done;
  /* token events */
  int32_t token;
  float logprob;
  uint32_t n_top;
  int32_t top_id[SCHED_MAX_TOP];
  float top_logprob[SCHED_MAX_TOP];
  /* done events */
  enum sched_finish finish;
  int error; /* negative kvd code with SCHED_FINISH_ERROR */
};

struct sched_stats {
  struct kv_pool_stats kv;
  uint32_t running, waiting;
  uint64_t steps, prefill_tokens, decode_tokens, batch_tokens_max, preemptions;
  uint64_t shifts, shift_dropped; /* context shifts run, and the tokens they dropped */
  /* Sessions and the host tier: KV copied to host memory (swap_out), back (swap_in), sessions
   * recomputed from their tokens because no copy was kept, and what the copies hold now. */
  uint64_t swap_out, swap_in, swap_recomputed, swap_out_ms, swap_in_ms;
  uint64_t host_bytes, host_budget;
  uint32_t sessions, sessions_swapped;
  uint64_t disk_hits, disk_writes, disk_blocks, disk_bytes; /* the disk tier, in blocks */
  uint64_t ram_spills, ram_hits, ram_blocks;                /* prefix blocks in the host tier */
  /* Speculation: decode steps that carried drafts, tokens drafted and accepted (by the lookup
   * and by the draft model), and the draft model's KV pool. */
  uint64_t spec_steps, spec_drafted, spec_accepted;
  uint64_t lookup_drafted, lookup_accepted, draft_drafted, draft_accepted;
  bool has_draft;
  struct kv_pool_stats draft_kv;
  double last_step_ms;
};

typedef void (*sched_notify_fn)(void *ud);

struct sched_opts {
  uint32_t step_tokens; /* token budget per step; 0 = the engine's maximum */
  uint32_t max_running; /* requests decoding at once; 0 = the engine's logits rows */
  sched_notify_fn notify;
  void *notify_ud;
  /* The host-RAM tier: bytes of KV copies sessions swapped out of the pool may hold (0: none;
   * a session pushed out of the pool is then recomputed from its tokens when it runs again). */
  uint64_t host_bytes;
  /* The prefix cache's disk tier (tier.h), taken over (closed by sched_free) or NULL: registered
   * blocks are written there while the engine thread is idle and when it stops, and prompts look
   * there past the pool's hits. */
  struct tier_disk *disk;
  /* A draft model for speculative decoding, taken over (freed by sched_free) or NULL: same
   * vocabulary as e (the caller checks), its own KV pool, driven by the same engine thread. */
  struct engine *draft;
  uint32_t spec_max; /* most drafted tokens per request and step; 0 = SCHED_SPEC_MAX */
};

struct sched;

/* Starts the engine thread over e (which it then owns: freed by sched_free). */
int sched_new(struct engine *e, const struct sched_opts *opts, struct sched **ret);
/* Cancels everything, waits for the thread, frees the engine. Events not yet drained are lost. */
void sched_free(struct sched *s);
struct engine *sched_engine(struct sched *s); /* for read-only facts (hparams) */

/* A request: tokens are copied. The loop keeps ownership; see the header comment. */
int sched_req_new(const int32_t *tokens, uint32_t n_tokens, struct sched_req **ret);
void sched_req_free(struct sched_req *r); /* only when not submitted, or after its DONE */
/* Hands r to the engine thread after reserving its event slots; KVD_ENOMEM (and r stays the
 * caller's, never submitted) when they cannot be reserved. */
int sched_submit(struct sched *s, struct sched_req *r);
/* Asks a submitted request to end (DONE with SCHED_FINISH_CANCELLED follows) and wakes the engine
 * thread. Any thread; only between sched_submit and the request's DONE. */
void sched_cancel(struct sched_req *r);

/* Pops up to cap events in order; returns how many. Loop thread. */
uint32_t sched_drain(struct sched *s, struct sched_event *out, uint32_t cap);
void sched_get_stats(struct sched *s, struct sched_stats *ret);

/* A host copy of a sequence's KV (engine_seq_export): n_blocks units of block_bytes from logical
 * block `first` (those before it a sliding window gave back), holding len tokens. */
struct sched_kv_copy {
  uint32_t len, first, n_blocks;
  bool shifted; /* tokens were dropped from its middle: it cannot be recomputed from its ids */
  uint64_t block_bytes;
  uint8_t *data; /* malloc'd */
};

/* A session outside the engine: what session.save writes and session.restore reads back. Its
 * tokens are hist[0, n_hist) (the ids at those positions of its sequence) then pending (-1:
 * none), the last sampled token, not run yet. kv.n_blocks 0: no KV (the next turn recomputes
 * hist, which needs !kv.shifted). */
struct sched_snapshot {
  int32_t *hist; /* malloc'd */
  uint32_t n_hist;
  int32_t pending;
  struct sched_kv_copy kv;
};
void sched_snapshot_clear(struct sched_snapshot *sn); /* frees what it holds; safe twice */

/* Sessions: created at once; their sequence lives on the engine thread. Free only with no request
 * of theirs in flight; the sequence's KV goes back to the pool on the engine thread. */
int sched_session_new(struct sched *s, struct sched_session **ret);
/* A copy sharing the source's KV blocks (copy-on-write); the source must be idle. */
int sched_session_fork(struct sched *s, struct sched_session *src, struct sched_session **ret);
void sched_session_free(struct sched *s, struct sched_session *ss);
/* Tokens in the session's history (prompts and completions so far). */
uint32_t sched_session_len(const struct sched_session *ss);
/* session.save: r (no tokens, sched_req_new(NULL, 0)) with r->session and r->snapshot set is
 * submitted like a request; its DONE (SCHED_FINISH_STOP, or ERROR with the code) comes once
 * *r->snapshot holds a copy of the idle session (KV copied from the pool or its host copy).
 * The loop then owns the snapshot. */
/* session.restore: a new session holding sn's tokens and KV copy (taken over: sn is left empty,
 * also on failure), which the engine thread swaps into the pool on its first request (or
 * recomputes from its tokens if the copy does not fit the host tier). */
int sched_session_restore(struct sched *s, struct sched_snapshot *sn, struct sched_session **ret);

#endif
