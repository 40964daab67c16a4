/* Speculative decoding, the drafting side: which requests draft in a step, how many tokens, and
 * where the drafts come from (the request's own history, or the draft model's greedy
 * continuation). Verification is the ordinary sampler run over the step's rows in order
 * (scheduler.c: sched_verify), so what a request emits never depends on its drafts; a draft only
 * decides how many of those tokens one step yields. The drafts are deterministic (a point mass),
 * for which "sample from the target, keep the draft while it equals the sample" is exactly
 * speculative sampling's accept-with-probability-p(d), resample-from-the-residual rule.
 *
 * Drafting is advisory throughout: a draft that cannot be made (no match, no memory, the draft
 * model's pool full) is not made, and the request decodes one token as it would without. */
#include "sched_internal.h"

#include "kvd_error.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Prompt lookup matches the last SPEC_NGRAM_MAX down to SPEC_NGRAM_MIN tokens; a single token
 * recurs too often by chance to predict what follows it. */
#define SPEC_NGRAM_MAX 4
#define SPEC_NGRAM_MIN 2
/* k grows while the chance that the k-th draft survives (alpha^k) is at least this: a drafted
 * token costs a position of the step whether or not it is kept. */
#define SPEC_MARGIN 0.3
/* AUTO pauses a request's drafting for SPEC_PAUSE decode steps when under SPEC_POOR of its
 * drafts are accepted (over at least SPEC_POOR_MIN tries). */
#define SPEC_POOR 0.2
#define SPEC_POOR_MIN 4.0f
#define SPEC_PAUSE 32
#define SPEC_DECAY 0.9f /* weight of earlier steps in the acceptance counts */

/* The latest earlier occurrence of h's last g tokens (longest g first) whose continuation is in
 * h; up to `most` tokens of that continuation go to out. Returns how many. */
static uint32_t spec_lookup(const int32_t *h, uint32_t n, int32_t *out, uint32_t most) {
  for (uint32_t g = SPEC_NGRAM_MAX; g >= SPEC_NGRAM_MIN; g--) {
    if (n < g + 1) continue;
    const int32_t *tail = h + n - g;
    for (uint32_t i = n - g; i-- > 0;) {
      if (h[i] != tail[0] || memcmp(h + i, tail, g * sizeof *h) != 0) continue;
      uint32_t avail = n - (i + g), k = avail < most ? avail : most;
      memcpy(out, h + i + g, k * sizeof *h);
      return k;
    }
  }
  return 0;
}

static uint32_t min_u32(uint32_t a, uint32_t b) {
  return a < b ? a : b;
}

/* The chance a draft of r is kept, from its decayed counts (two pseudo-tries at 0.6 before any
 * are seen). */
static double spec_alpha(const struct sched_req *r) {
  return ((double)r->spec_hit + 1.2) / ((double)r->spec_try + 2.0);
}

/* How many lookup drafts r's acceptance so far pays for (a lookup draft costs only its position
 * in the step): the largest k with alpha^k >= SPEC_MARGIN. */
static uint32_t spec_k(const struct sched_req *r, uint32_t most) {
  double a = spec_alpha(r);
  if (a >= 0.999) return most;
  double k = a > 0 ? log(SPEC_MARGIN) / log(a) : 1;
  if (k < 1) k = 1;
  return k >= most ? most : (uint32_t)k;
}

/* The most tokens r may draft this step: what its mode, acceptance, events window, max_tokens,
 * context and history buffer leave room for. */
static uint32_t spec_most(struct sched *s, struct sched_req *r, uint32_t budget, uint32_t rows) {
  if (r->spec == SCHED_SPEC_OFF) return 0;
  if (r->spec == SCHED_SPEC_AUTO && r->spec_pause) {
    r->spec_pause--;
    return 0;
  }
  uint32_t most = s->o.spec_max && s->o.spec_max < SCHED_SPEC_MAX ? s->o.spec_max : SCHED_SPEC_MAX;
  most = min_u32(most, min_u32(budget, rows));
  /* k + 1 tokens and a DONE must fit the events window (sched_has_room checked 2). */
  uint32_t out = atomic_load(&r->ev_out);
  most = min_u32(most, out + 2 <= SCHED_EV_WINDOW ? SCHED_EV_WINDOW - 2 - out : 0);
  if (r->max_tokens) {
    uint32_t left = r->max_tokens > r->n_generated ? r->max_tokens - r->n_generated : 0;
    most = min_u32(most, left > 0 ? left - 1 : 0);
  }
  uint32_t n_ctx = engine_hparams(s->e)->n_ctx_train, len = engine_seq_len(r->seq);
  most = min_u32(most, n_ctx > len + 2 ? n_ctx - len - 2 : 0);
  most = min_u32(most, r->cap_hist > r->n_hist + 1 ? r->cap_hist - r->n_hist - 1 : 0);
  /* hist must end with the token decoded next (it does unless a session outgrew it). */
  if (!r->n_hist || r->hist[r->n_hist - 1] != r->next) return 0;
  if (!most) return 0;
  if (r->logits_rows < most + 1) {
    uint32_t v = engine_hparams(s->e)->n_vocab;
    float *l = realloc(r->logits, (size_t)(SCHED_SPEC_MAX + 1) * v * sizeof *l);
    if (!l) return 0;
    r->logits = l;
    r->logits_rows = SCHED_SPEC_MAX + 1;
  }
  return most;
}

void sched__spec_drop(struct sched *s, struct sched_req *r) {
  if (r->dseq) engine_seq_free(s->o.draft, r->dseq);
  r->dseq = NULL;
}

static int32_t spec_argmax(const float *l, uint32_t n) {
  uint32_t best = 0;
  for (uint32_t i = 1; i < n; i++)
    if (l[i] > l[best]) best = i;
  return (int32_t)best;
}

/* Room for n requests drafting from the draft model; false (no drafting) when there is none. */
static bool spec_reserve(struct sched *s, uint32_t n) {
  if (n <= s->cap_dcand) return true;
  uint32_t v = engine_hparams(s->o.draft)->n_vocab;
  struct sched_draft *c = realloc(s->dcand, n * sizeof *c);
  if (!c) return false;
  s->dcand = c;
  uint32_t *map = realloc(s->dmap, n * sizeof *map);
  if (!map) return false;
  s->dmap = map;
  struct engine_item *it = realloc(s->ditems, n * sizeof *it);
  if (!it) return false;
  s->ditems = it;
  float *l = realloc(s->dlogits, (size_t)n * v * sizeof *l);
  if (!l) return false;
  s->dlogits = l;
  s->cap_dcand = n;
  return true;
}

/* One step of the draft model over its items [0, q), timed. */
static int spec_forward(struct sched *s, uint32_t q) {
  double t0 = sched__now();
  int rc = engine_forward(s->o.draft, s->ditems, q);
  double t = sched__now() - t0;
  if (rc == 0) s->t_dstep = s->t_dstep > 0 ? 0.8 * s->t_dstep + 0.2 * t : t;
  return rc;
}

/* Runs the draft model's items [0, q) and takes each one's greedy token as the next draft of its
 * request; false when the step failed (nothing changed). */
static bool spec_model_round(struct sched *s, uint32_t q) {
  struct engine *d = s->o.draft;
  uint32_t v = engine_hparams(d)->n_vocab;
  if (spec_forward(s, q) < 0) return false;
  for (uint32_t i = 0; i < q; i++) {
    struct sched_req *r = s->dcand[s->dmap[i]].r;
    r->spec_tok[1 + r->n_draft] = spec_argmax(s->dlogits + (size_t)i * v, v);
    r->n_draft++;
  }
  return true;
}

/* The draft model drafts for s->dcand[0, n) (r->n_draft set to what it drafted): one batched
 * step runs what each draft sequence lacks of its request's history (the next token at least; a
 * long catch-up, such as the prompt on first use, goes in chunks and drafts nothing until it is
 * in), then one step per further draft token. */
static void spec_model_draft(struct sched *s, uint32_t n) {
  struct engine *d = s->o.draft;
  uint32_t v = engine_hparams(d)->n_vocab;
  uint32_t bud = engine_max_step_tokens(d), rows = engine_max_logits(d), q = 0, k_most = 0;
  for (uint32_t i = 0; i < n; i++) {
    struct sched_req *r = s->dcand[i].r;
    r->n_draft = 0;
    if (!r->dseq) {
      uint32_t cached = 0;
      if (engine_seq_new_prefix(d, r->hist, r->n_hist, &r->dseq, &cached) < 0) r->dseq = NULL;
    }
    if (!r->dseq) continue;
    uint32_t dlen = engine_seq_len(r->dseq);
    if (dlen >= r->n_hist) { /* cannot happen: settle keeps it behind the history */
      sched__spec_drop(s, r);
      continue;
    }
    uint32_t c = min_u32(r->n_hist - dlen, bud);
    if (!c || !rows) continue;
    if (dlen + c < r->n_hist) s->dcand[i].want = 0; /* catching up: no drafts this step */
    s->ditems[q] = (struct engine_item){r->dseq, r->hist + dlen, c, s->dlogits + (size_t)q * v, 1};
    s->dmap[q++] = i;
    bud -= c;
    rows--;
    if (s->dcand[i].want > k_most) k_most = s->dcand[i].want;
  }
  if (!q) return;
  if (spec_forward(s, q) < 0) {
    /* The draft model's pool is full (or worse): these sequences start over from its prefix
     * cache later; nothing is drafted now. */
    for (uint32_t i = 0; i < q; i++)
      sched__spec_drop(s, s->dcand[s->dmap[i]].r);
    return;
  }
  for (uint32_t i = 0; i < q; i++) {
    struct sched_draft *c = &s->dcand[s->dmap[i]];
    if (!c->want) continue;
    c->r->spec_tok[1] = spec_argmax(s->dlogits + (size_t)i * v, v);
    c->r->n_draft = 1;
  }
  for (uint32_t round = 1; round < k_most; round++) {
    q = 0;
    for (uint32_t i = 0; i < n; i++) {
      struct sched_req *r = s->dcand[i].r;
      if (r->n_draft != round || s->dcand[i].want <= round) continue;
      s->ditems[q] =
          (struct engine_item){r->dseq, &r->spec_tok[round], 1, s->dlogits + (size_t)q * v, 1};
      s->dmap[q++] = i;
    }
    if (!q || !spec_model_round(s, q)) break; /* what is drafted stays drafted */
  }
}

/* How many draft-model tokens pay for r: a draft-model token costs a draft step (they run one
 * after another), so of k in [1, most] the one with the most expected tokens per second,
 * (1 - alpha^(k+1)) / (1 - alpha) over the target step plus k draft steps; 0 when none beats
 * decoding one token per target step by SPEC_GAIN, a margin for the noise in both timings (then AUTO leaves the draft model alone; a
 * request that asked for it drafts at least 1). Before both costs are measured: the lookup's
 * rule, so they get measured. */
#define SPEC_GAIN 1.25
static uint32_t spec_model_k(const struct sched *s, const struct sched_req *r, uint32_t most) {
  double a = spec_alpha(r), tt = s->t_step, td = s->t_dstep;
  if (tt <= 0 || td <= 0) return spec_k(r, most);
  uint32_t best_k = 0;
  double best = SPEC_GAIN / tt;
  for (uint32_t k = 1; k <= most; k++) {
    double e = a < 0.999 ? (1 - pow(a, k + 1)) / (1 - a) : k + 1;
    double rate = e / (tt + k * td);
    if (rate > best) {
      best = rate;
      best_k = k;
    }
  }
  return best_k || r->spec != SCHED_SPEC_DRAFT ? best_k : 1;
}

/* Whether r drafts from the draft model this step: asked to, or AUTO where the lookup found
 * nothing; its sequence must follow the target's positions (no context shift, a history that
 * mirrors them). */
static bool spec_use_model(const struct sched *s, const struct sched_req *r) {
  if (!s->o.draft || r->n_shifts || r->hist_base != 0) return false;
  return r->spec == SCHED_SPEC_DRAFT || r->spec == SCHED_SPEC_AUTO;
}

/* Extends decode item i with r->spec_tok[1, 1 + k) within what is left of the step. */
static void spec_commit(struct sched *s, uint32_t i, uint32_t k, uint32_t *budget, uint32_t *rows,
                        uint32_t *reserved) {
  struct sched_req *r = s->item_req[i];
  k = min_u32(k, min_u32(*budget, *rows));
  uint32_t extra = k ? engine_seq_step_blocks(s->e, r->seq, 1 + k) -
                           engine_seq_step_blocks(s->e, r->seq, 1)
                     : 0;
  if (k && *reserved + extra > engine_kv_available(s->e)) k = 0; /* drafts never evict */
  r->n_draft = k;
  if (!k) return;
  r->spec_tok[0] = r->next;
  s->items[i] = (struct engine_item){r->seq, r->spec_tok, 1 + k, r->logits, 1 + k};
  *budget -= k;
  *rows -= k;
  *reserved += extra;
}

void sched__spec_plan(struct sched *s, uint32_t n_decode, uint32_t *budget, uint32_t *rows,
                      uint32_t *reserved) {
  uint32_t nd = 0;
  bool model_ok = s->o.draft && spec_reserve(s, n_decode);
  for (uint32_t i = 0; i < n_decode; i++) {
    struct sched_req *r = s->item_req[i];
    r->n_draft = 0;
    r->spec_model = false;
    if (r->dseq && !spec_use_model(s, r)) sched__spec_drop(s, r); /* a shift moved it */
    uint32_t most = spec_most(s, r, *budget, *rows);
    s->items[i].logits = r->logits; /* spec_most may have moved it */
    if (!most) continue;
    uint32_t k = r->spec == SCHED_SPEC_DRAFT
                     ? 0
                     : spec_lookup(r->hist, r->n_hist, r->spec_tok + 1, spec_k(r, most));
    uint32_t km = k || !model_ok || !spec_use_model(s, r) ? 0 : spec_model_k(s, r, most);
    if (k) {
      spec_commit(s, i, k, budget, rows, reserved);
    } else if (km) {
      r->spec_model = true;
      s->dcand[nd++] = (struct sched_draft){r, km};
    }
  }
  if (!nd) return;
  spec_model_draft(s, nd);
  for (uint32_t i = 0; i < n_decode; i++) {
    struct sched_req *r = s->item_req[i];
    if (r->spec_model && r->n_draft) spec_commit(s, i, r->n_draft, budget, rows, reserved);
  }
}

void sched__spec_strip(struct sched *s, uint32_t n_decode) {
  for (uint32_t i = 0; i < n_decode; i++) {
    struct sched_req *r = s->item_req[i];
    if (!r->n_draft) continue;
    r->n_draft = 0;
    s->items[i] = (struct engine_item){r->seq, &r->next, 1, r->logits, 1};
  }
}

void sched__spec_settle(struct sched *s, struct sched_req *r, uint32_t keep, uint32_t accepted) {
  if (r->n_draft) {
    uint32_t tried = accepted + (accepted < r->n_draft ? 1 : 0);
    r->spec_hit = r->spec_hit * SPEC_DECAY + (float)accepted;
    r->spec_try = r->spec_try * SPEC_DECAY + (float)tried;
    r->draft_tokens += r->n_draft;
    r->accepted_tokens += accepted;
    s->local.spec_steps++;
    s->local.spec_drafted += r->n_draft;
    s->local.spec_accepted += accepted;
    if (r->spec_model) {
      s->local.draft_drafted += r->n_draft;
      s->local.draft_accepted += accepted;
    } else {
      s->local.lookup_drafted += r->n_draft;
      s->local.lookup_accepted += accepted;
    }
    if (r->spec == SCHED_SPEC_AUTO && r->spec_try >= SPEC_POOR_MIN &&
        r->spec_hit < SPEC_POOR * r->spec_try) {
      r->spec_pause = SPEC_PAUSE; /* then it tries again, from the prior */
      r->spec_hit = r->spec_try = 0;
    }
    r->n_draft = 0;
  }
  if (!r->dseq) return;
  struct engine *d = s->o.draft;
  if (engine_seq_len(r->dseq) > keep && engine_seq_truncate(d, r->dseq, keep) < 0) {
    sched__spec_drop(s, r);
    return;
  }
  if (r->hist_base == 0) engine_seq_register(d, r->dseq, r->hist, engine_seq_len(r->dseq));
  engine_seq_drop_window(d, r->dseq, UINT32_MAX);
}

void sched__spec_free(struct sched *s) {
  free(s->dcand);
  free(s->dmap);
  free(s->ditems);
  free(s->dlogits);
  engine_free(s->o.draft);
  s->o.draft = NULL;
}
