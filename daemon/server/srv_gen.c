/* generate: parameters, tokenization, submission to the model's engine thread, and the way back:
 * tokens to text (never half a UTF-8 character), stop strings (never sent), streamed chunks,
 * log-probs and the final response. */
#include "srv.h"

#include "kvd_error.h"
#include "log.h"

#include <stdlib.h>
#include <string.h>

struct gen_lp {
  int32_t id;
  float logprob;
  uint32_t n_top;
  int32_t top_id[SCHED_MAX_TOP];
  float top_lp[SCHED_MAX_TOP];
  size_t text_off, text_len; /* the token's own bytes in text (may be 0 inside a character) */
};

struct srv_gen {
  struct srv_gen *next;  /* in conn->gens */
  struct srv_conn *conn; /* NULL once the client is gone */
  struct srv_model *m;
  struct srv_session *sess;
  uint32_t id;
  struct sched_req *req;
  bool stream;
  uint32_t logprobs;
  char **stops; /* may hold NUL bytes: compared by length (stop_len), never as C strings */
  size_t *stop_len;
  size_t n_stops, max_stop;
  struct tok_stream ts;
  char *piece; /* tok_stream_bound() bytes */
  char *text;
  size_t len, cap, sent;
  int32_t *chunk_tok; /* tokens not yet in a chunk */
  uint32_t n_chunk_tok, cap_chunk_tok;
  struct gen_lp *lps;
  uint32_t n_lps, cap_lps;
  bool answered;    /* the final response went out (a stop string ends it early) */
  bool stop_string; /* ended by a stop string: finish_reason "stop" */
  uint32_t prompt_tokens;
  uint32_t n_seen; /* token events received: the loop's own count for status */
  double t_recv, t_first_seen;
};

static void gen_free(struct srv_gen *g) {
  for (size_t i = 0; i < g->n_stops; i++)
    free(g->stops[i]);
  free(g->stops);
  free(g->stop_len);
  free(g->piece);
  free(g->text);
  free(g->chunk_tok);
  free(g->lps);
  sched_req_free(g->req);
  free(g);
}

static int gen_append(struct srv_gen *g, const char *p, size_t n) {
  if (g->len + n + 1 > g->cap) {
    size_t cap = g->cap ? g->cap * 2 : 256;
    while (cap < g->len + n + 1)
      cap *= 2;
    char *t = realloc(g->text, cap);
    if (!t) return KVD_ENOMEM;
    g->text = t;
    g->cap = cap;
  }
  memcpy(g->text + g->len, p, n);
  g->len += n;
  g->text[g->len] = '\0';
  return 0;
}

/* How far text may be streamed: anything that could still turn out to begin a stop string is
 * held back, and the cut never falls inside a UTF-8 character. */
static size_t gen_safe_end(const struct srv_gen *g, bool final) {
  if (final || g->max_stop == 0) return g->len;
  size_t hold = g->max_stop - 1;
  size_t end = g->len > hold ? g->len - hold : 0;
  while (end > g->sent && end < g->len && ((unsigned char)g->text[end] & 0xC0) == 0x80)
    end--;
  return end < g->sent ? g->sent : end;
}

/* One token's log-probs map; its text clipped to the first `limit` bytes (what was sent). */
static void gen_write_lp(struct ipc_w *w, const struct srv_gen *g, const struct gen_lp *lp,
                         size_t limit) {
  ipc_w_map(w, 4);
  ipc_w_kv_i64(w, "id", lp->id);
  size_t off = lp->text_off < limit ? lp->text_off : limit;
  size_t n = lp->text_len < limit - off ? lp->text_len : limit - off;
  ipc_w_kv_str(w, "text", g->text ? g->text + off : "", n);
  ipc_w_kv_f64(w, "logprob", lp->logprob);
  ipc_w_key(w, "top");
  ipc_w_array(w, lp->n_top);
  for (uint32_t k = 0; k < lp->n_top; k++) {
    ipc_w_map(w, 2);
    ipc_w_kv_i64(w, "id", lp->top_id[k]);
    ipc_w_kv_f64(w, "logprob", lp->top_lp[k]);
  }
}

static void gen_send_chunk(struct srv_gen *g, bool final) {
  struct srv_conn *c = g->conn;
  if (!c || !g->stream) return;
  size_t end = gen_safe_end(g, final);
  if (end == g->sent && g->n_chunk_tok == 0) return;
  ipc_w_notification(&c->w, "generate.chunk");
  ipc_w_map_open(&c->w);
  ipc_w_kv_u64(&c->w, "id", g->id);
  ipc_w_kv_str(&c->w, "text", g->text ? g->text + g->sent : "", end - g->sent);
  ipc_w_key(&c->w, "tokens");
  ipc_w_array(&c->w, g->n_chunk_tok);
  for (uint32_t i = 0; i < g->n_chunk_tok; i++)
    ipc_w_u64(&c->w, (uint64_t)g->chunk_tok[i]);
  if (g->logprobs) { /* the chunk's tokens are the last n_chunk_tok of lps */
    uint32_t n = g->n_chunk_tok < g->n_lps ? g->n_chunk_tok : g->n_lps;
    ipc_w_key(&c->w, "logprobs");
    ipc_w_array(&c->w, n);
    for (uint32_t i = g->n_lps - n; i < g->n_lps; i++)
      gen_write_lp(&c->w, g, &g->lps[i], end);
  }
  ipc_w_close(&c->w);
  if (ipc_w_end(&c->w) == 0) {
    g->sent = end;
    g->n_chunk_tok = 0;
    g->n_lps = 0; /* sent: a stream's result does not repeat them */
    srv_conn_flush(c);
  }
}

static const char *gen_finish_name(const struct srv_gen *g, enum sched_finish f) {
  if (g->stop_string) return "stop";
  switch (f) {
  case SCHED_FINISH_STOP:
    return "stop";
  case SCHED_FINISH_LENGTH:
    return "length";
  case SCHED_FINISH_CANCELLED:
    return "cancelled";
  default:
    return "error";
  }
}

static double ms(double a, double b) {
  return a > 0 && b > 0 && b >= a ? (b - a) * 1e3 : 0;
}

static void gen_send_result(struct srv_gen *g, enum sched_finish f, int error) {
  struct srv_conn *c = g->conn;
  g->answered = true;
  if (!c) return;
  const struct sched_req *r = g->req;
  double end = r->t_end > 0 ? r->t_end : srv_now();
  gen_send_chunk(g, true);
  ipc_w_result(&c->w, g->id);
  ipc_w_map_open(&c->w);
  ipc_w_kv_str(&c->w, "text", g->stream ? "" : (g->text ? g->text : ""), g->stream ? 0 : g->len);
  ipc_w_kv_cstr(&c->w, "finish_reason", gen_finish_name(g, f));
  ipc_w_kv_u64(&c->w, "prompt_tokens", g->prompt_tokens);
  ipc_w_kv_u64(&c->w, "completion_tokens", r->n_generated);
  ipc_w_kv_u64(&c->w, "cached_tokens", r->cached_tokens);
  if (r->n_shifts) ipc_w_kv_u64(&c->w, "context_shifts", r->n_shifts);
  ipc_w_key(&c->w, "timings");
  ipc_w_map_open(&c->w);
  double decode_ms = ms(r->t_first, end);
  ipc_w_kv_f64(&c->w, "queue_ms", ms(r->t_submit, r->t_start));
  ipc_w_kv_f64(&c->w, "prefill_ms", ms(r->t_start, r->t_first));
  ipc_w_kv_f64(&c->w, "decode_ms", decode_ms);
  ipc_w_kv_f64(&c->w, "ttft_ms", ms(g->t_recv, r->t_first));
  ipc_w_kv_f64(&c->w, "tokens_per_s",
               decode_ms > 0 && r->n_generated > 1 ? (r->n_generated - 1) / (decode_ms / 1e3) : 0);
  /* Read after DONE, or while the engine may still write them (a stop string answered early):
   * then they are the counts so far, which is what was used of them. */
  ipc_w_kv_u64(&c->w, "draft_tokens", r->draft_tokens);
  ipc_w_kv_u64(&c->w, "accepted_tokens", r->accepted_tokens);
  ipc_w_close(&c->w);
  if (g->logprobs && !g->stream) { /* a stream had them in its chunks (api.json) */
    ipc_w_key(&c->w, "logprobs");
    ipc_w_array(&c->w, g->n_lps);
    for (uint32_t i = 0; i < g->n_lps; i++)
      gen_write_lp(&c->w, g, &g->lps[i], g->len);
  }
  if (f == SCHED_FINISH_ERROR) ipc_w_kv_error(&c->w, "error", error, NULL);
  ipc_w_close(&c->w);
  int rc = ipc_w_end(&c->w);
  if (rc < 0) {
    srv_reply_error(c, g->id, rc, "cannot encode the result");
    return;
  }
  srv_reply_done(c, g->id);
  c->srv->stats.generated_tokens += r->n_generated;
  c->srv->stats.prompt_tokens += g->prompt_tokens;
  c->srv->stats.cached_tokens += r->cached_tokens;
  c->srv->stats.last_ttft_ms = ms(g->t_recv, r->t_first);
  c->srv->stats.last_tpot_ms = r->n_generated > 1 ? decode_ms / (r->n_generated - 1) : 0;
}

static void gen_unlink(struct srv_gen *g) {
  if (!g->conn) return;
  for (struct srv_gen **p = &g->conn->gens; *p; p = &(*p)->next)
    if (*p == g) {
      *p = g->next;
      break;
    }
  g->conn = NULL;
}

/* Looks for a stop string that ends in the bytes just added; truncates the text before it. */
static bool gen_check_stops(struct srv_gen *g, size_t added) {
  if (!g->n_stops) return false;
  size_t from = g->len - added;
  from = from > g->max_stop ? from - g->max_stop : 0;
  size_t best = SIZE_MAX;
  for (size_t i = 0; i < g->n_stops; i++) {
    /* By length on both sides: a stop string or generated text with a NUL byte (a <0x00> token)
     * must neither match at once nor hide what follows it. */
    const char *hit = memmem(g->text + from, g->len - from, g->stops[i], g->stop_len[i]);
    if (hit && (size_t)(hit - g->text) < best) best = (size_t)(hit - g->text);
  }
  if (best == SIZE_MAX) return false;
  g->len = best < g->sent ? g->sent : best;
  g->text[g->len] = '\0';
  return true;
}

static void gen_on_token(struct srv_gen *g, const struct sched_event *ev) {
  if (g->answered) return; /* a stop string already ended it; the engine is catching up */
  if (!g->n_seen++) g->t_first_seen = srv_now();
  int n = tok_stream_feed(&g->ts, ev->token, g->piece, tok_stream_bound(g->m->tok));
  size_t before = g->len;
  if (n > 0 && gen_append(g, g->piece, (size_t)n) < 0) n = 0;
  if (g->n_chunk_tok == g->cap_chunk_tok) {
    uint32_t cap = g->cap_chunk_tok ? g->cap_chunk_tok * 2 : 16;
    int32_t *t = realloc(g->chunk_tok, cap * sizeof *t);
    if (t) {
      g->chunk_tok = t;
      g->cap_chunk_tok = cap;
    }
  }
  if (g->n_chunk_tok < g->cap_chunk_tok) g->chunk_tok[g->n_chunk_tok++] = ev->token;
  if (g->logprobs) {
    if (g->n_lps == g->cap_lps) {
      uint32_t cap = g->cap_lps ? g->cap_lps * 2 : 16;
      struct gen_lp *l = realloc(g->lps, cap * sizeof *l);
      if (l) {
        g->lps = l;
        g->cap_lps = cap;
      }
    }
    if (g->n_lps < g->cap_lps) {
      struct gen_lp *lp = &g->lps[g->n_lps++];
      lp->id = ev->token;
      lp->logprob = ev->logprob;
      lp->n_top = ev->n_top;
      memcpy(lp->top_id, ev->top_id, sizeof lp->top_id);
      memcpy(lp->top_lp, ev->top_logprob, sizeof lp->top_lp);
      lp->text_off = before;
      lp->text_len = g->len - before;
    }
  }
  if (gen_check_stops(g, g->len - before)) {
    g->stop_string = true;
    sched_cancel(g->req);
    gen_send_result(g, SCHED_FINISH_STOP, 0);
    return;
  }
  gen_send_chunk(g, false);
}

static void gen_on_done(struct srv_gen *g, const struct sched_event *ev) {
  int n = tok_stream_flush(&g->ts, g->piece, tok_stream_bound(g->m->tok));
  if (n > 0 && !g->answered) gen_append(g, g->piece, (size_t)n);
  if (!g->answered) {
    if (ev->finish == SCHED_FINISH_ERROR && g->req->n_generated == 0) {
      g->answered = true;
      if (g->conn) srv_reply_error(g->conn, g->id, ev->error, "%s", kvd_strerror(ev->error));
    } else {
      gen_send_result(g, ev->finish, ev->error);
    }
  }
  if (ev->finish == SCHED_FINISH_ERROR)
    log_warn("generate %u on %s ended: %s", g->id, g->m->name, kvd_strerror(ev->error));
  if (g->sess) {
    g->sess->busy = false;
    /* A first turn that rolled back (failed before its first token) leaves the session empty:
     * the next prompt starts the conversation, BOS and all. */
    if (sched_session_len(g->sess->ss) == 0) g->sess->started = false;
    if (g->sess->closing) srv_session_release(g->sess);
  }
  gen_unlink(g);
  struct srv_model *m = g->m;
  struct srv *s = m->srv;
  gen_free(g);
  srv_model_release(m);
  srv_maybe_finish(s);
}

void srv_gen_event(struct srv_model *model, const struct sched_event *ev) {
  if (ev->req->snapshot) { /* a session.save's copy */
    srv_store_event(model, ev);
    return;
  }
  struct srv_gen *g = ev->req->ud;
  if (ev->done)
    gen_on_done(g, ev);
  else
    gen_on_token(g, ev);
}

void srv_gen_cancel_id(struct srv_conn *c, uint32_t id, bool *ret_found) {
  *ret_found = false;
  for (struct srv_gen *g = c->gens; g; g = g->next)
    if (g->id == id && !g->answered) {
      sched_cancel(g->req);
      *ret_found = true;
    }
}

void srv_gen_detach_all(struct srv_conn *c) {
  while (c->gens) {
    struct srv_gen *g = c->gens;
    c->gens = g->next;
    g->conn = NULL;
    sched_cancel(g->req);
  }
}

void srv_gen_cancel_model(struct srv *s, struct srv_model *m) {
  for (struct srv_conn *c = s->conns; c; c = c->next)
    for (struct srv_gen *g = c->gens; g; g = g->next)
      if (g->m == m) sched_cancel(g->req);
}

/* ---- the request ---- */

struct gen_params {
  enum chat_thinking thinking; /* reasoning models: think before answering (chat.h) */
  const char *prompt;
  size_t prompt_len;
  const msgpack_object *messages;
  size_t n_messages;
  const char *model;
  size_t model_len;
  uint32_t session;
  bool has_session;
  struct sample_params sp;
  uint32_t max_tokens;
  bool stream;
  uint32_t logprobs;
  const msgpack_object *stops;
  size_t n_stops;
  /* Past the context: the policy (absent: the model's, else --overflow), the tokens shift keeps
   * (absent: the system prompt, else BOS) and the sinks window keeps (default 4). */
  bool has_overflow;
  enum kv_overflow overflow;
  uint32_t keep, sinks;
  bool has_keep;
  bool has_spec; /* speculative given; else the daemon's --speculative */
  enum sched_spec spec;
};

#define GEN_DEFAULT_SINKS 4 /* StreamingLLM's: four leading tokens carry the attention sink */

static int gen_read_params(const msgpack_object *p, struct gen_params *gp, struct ipc_err *e) {
  memset(gp, 0, sizeof *gp);
  sample_params_default(&gp->sp);
  gp->max_tokens = 256;
  double d;
  int rc;
  if ((rc = ipc_get_str(p, "prompt", &gp->prompt, &gp->prompt_len, e)) < 0) return rc;
  if ((rc = ipc_get_maps(p, "messages", &gp->messages, &gp->n_messages, e)) < 0) return rc;
  if (!gp->prompt && !gp->messages)
    return ipc_err_set(e, KVD_EINVAL, "generate needs 'prompt' or 'messages'");
  if (gp->prompt && gp->messages)
    return ipc_err_set(e, KVD_EINVAL, "generate takes 'prompt' or 'messages', not both");
  if ((rc = ipc_get_str(p, "model", &gp->model, &gp->model_len, e)) < 0) return rc;
  if ((rc = ipc_get_u32(p, "session", &gp->session, e)) < 0) return rc;
  gp->has_session = rc == 1;
  if ((rc = ipc_get_u32(p, "max_tokens", &gp->max_tokens, e)) < 0) return rc;
  if ((rc = ipc_get_f64(p, "temperature", &d, e)) < 0) return rc;
  if (rc == 1) gp->sp.temperature = (float)d;
  if ((rc = ipc_get_u32(p, "top_k", &gp->sp.top_k, e)) < 0) return rc;
  if ((rc = ipc_get_f64(p, "top_p", &d, e)) < 0) return rc;
  if (rc == 1) gp->sp.top_p = (float)d;
  if ((rc = ipc_get_f64(p, "min_p", &d, e)) < 0) return rc;
  if (rc == 1) gp->sp.min_p = (float)d;
  if ((rc = ipc_get_f64(p, "repeat_penalty", &d, e)) < 0) return rc;
  if (rc == 1) gp->sp.repeat_penalty = (float)d;
  if ((rc = ipc_get_f64(p, "frequency_penalty", &d, e)) < 0) return rc;
  if (rc == 1) gp->sp.freq_penalty = (float)d;
  if ((rc = ipc_get_f64(p, "presence_penalty", &d, e)) < 0) return rc;
  if (rc == 1) gp->sp.presence_penalty = (float)d;
  uint64_t seed;
  if ((rc = ipc_get_u64(p, "seed", &seed, e)) < 0) return rc;
  if (rc == 1)
    gp->sp.seed = seed;
  else
    gp->sp.seed = (uint64_t)(srv_now() * 1e6); /* fresh text each call unless asked */
  if ((rc = ipc_get_bool(p, "stream", &gp->stream, e)) < 0) return rc;
  bool think;
  if ((rc = ipc_get_bool(p, "thinking", &think, e)) < 0) return rc;
  gp->thinking = rc == 1 ? (think ? CHAT_THINK_ON : CHAT_THINK_OFF) : CHAT_THINK_DEFAULT;
  if ((rc = ipc_get_u32(p, "logprobs", &gp->logprobs, e)) < 0) return rc;
  if (gp->logprobs > IPC_MAX_LOGPROBS)
    return ipc_err_set(e, KVD_ERANGE, "'logprobs' is at most %d", IPC_MAX_LOGPROBS);
  if ((rc = ipc_get_strs(p, "stop", &gp->stops, &gp->n_stops, e)) < 0) return rc;
  if (gp->n_stops > IPC_MAX_STOP_STRINGS)
    return ipc_err_set(e, KVD_E2BIG, "at most %d stop strings", IPC_MAX_STOP_STRINGS);
  for (size_t i = 0; i < gp->n_stops; i++) {
    size_t n = gp->stops[i].via.str.size;
    if (n == 0 || n > IPC_MAX_STOP_BYTES)
      return ipc_err_set(e, KVD_E2BIG, "stop strings are 1 to %d bytes", IPC_MAX_STOP_BYTES);
  }
  const char *ov;
  size_t ov_len;
  if ((rc = ipc_get_str(p, "overflow", &ov, &ov_len, e)) < 0) return rc;
  gp->has_overflow = rc == 1;
  if (gp->has_overflow && (strlen(ov) != ov_len || kv_overflow_parse(ov, &gp->overflow) < 0))
    return ipc_err_set(e, KVD_EINVAL, "'overflow' must be shift, window or error");
  if ((rc = ipc_get_u32(p, "keep", &gp->keep, e)) < 0) return rc;
  gp->has_keep = rc == 1;
  gp->sinks = GEN_DEFAULT_SINKS;
  if ((rc = ipc_get_u32(p, "sinks", &gp->sinks, e)) < 0) return rc;
  const char *sm;
  size_t sm_len;
  if ((rc = ipc_get_str(p, "speculative", &sm, &sm_len, e)) < 0) return rc;
  gp->has_spec = rc == 1;
  if (gp->has_spec && srv_spec_parse(sm, sm_len, &gp->spec) < 0)
    return ipc_err_set(e, KVD_EINVAL, "'speculative' must be " SRV_SPEC_NAMES);
  if (sample_params_check(&gp->sp) < 0)
    return ipc_err_set(e, KVD_ERANGE,
                       "sampling parameters out of range (temperature >= 0, "
                       "0 < top_p <= 1, 0 <= min_p <= 1, repeat_penalty > 0)");
  return 0;
}

/* The prompt text: as given, or the messages through the model's chat template. */
static int gen_prompt_text(struct srv_model *m, const struct gen_params *gp, char **ret,
                           size_t *ret_len, char **ret_sys, size_t *ret_sys_len,
                           struct ipc_err *e) {
  *ret_sys = NULL;
  *ret_sys_len = 0;
  if (gp->prompt) {
    if (gp->prompt_len > IPC_MAX_PROMPT_BYTES)
      return ipc_err_set(e, KVD_E2BIG, "prompt of %zu bytes; the limit is %d", gp->prompt_len,
                         IPC_MAX_PROMPT_BYTES);
    *ret = malloc(gp->prompt_len + 1);
    if (!*ret) return KVD_ENOMEM;
    memcpy(*ret, gp->prompt, gp->prompt_len);
    *ret_len = gp->prompt_len;
    return 0;
  }
  struct chat_msg *msgs = calloc(gp->n_messages ? gp->n_messages : 1, sizeof *msgs);
  if (!msgs) return KVD_ENOMEM;
  size_t total = 0;
  int rc = 0;
  for (size_t i = 0; i < gp->n_messages && rc == 0; i++) {
    const char *role = NULL, *content = NULL;
    size_t rlen = 0, clen = 0;
    if (ipc_get_str(&gp->messages[i], "role", &role, &rlen, e) != 1 ||
        ipc_get_str(&gp->messages[i], "content", &content, &clen, e) != 1)
      rc = ipc_err_set(e, KVD_EINVAL, "messages[%zu] needs string 'role' and 'content'", i);
    else if (chat_role_parse(role, rlen, &msgs[i].role) < 0)
      rc = ipc_err_set(e, KVD_EINVAL, "messages[%zu]: role must be system, user or assistant", i);
    msgs[i].content = content;
    msgs[i].len = clen;
    total += clen;
  }
  if (rc == 0 && total > IPC_MAX_PROMPT_BYTES)
    rc = ipc_err_set(e, KVD_E2BIG, "messages of %zu bytes; the limit is %d", total,
                     IPC_MAX_PROMPT_BYTES);
  struct chat_opts co = {.add_generation_prompt = true, .thinking = gp->thinking};
  if (rc == 0) rc = chat_render_opts(m->chat, msgs, gp->n_messages, &co, ret, ret_len);
  /* The system message alone, for what a context shift keeps: its tokens are the leading ones
   * the whole rendering shares with it (gen_tokenize). */
  if (rc == 0 && gp->n_messages > 1 && msgs[0].role == CHAT_ROLE_SYSTEM) {
    struct chat_opts so = {.add_generation_prompt = false, .thinking = gp->thinking};
    if (chat_render_opts(m->chat, msgs, 1, &so, ret_sys, ret_sys_len) < 0) *ret_sys = NULL;
  }
  free(msgs);
  return rc;
}

/* A generate between its params and its tokens: what srv_h_generate copied out of the message,
 * and what tokenizing produced. */
struct gen_prep {
  uv_work_t work;
  struct srv *srv;
  uint64_t conn_serial; /* the connection may be gone when tokenizing ends */
  struct srv_gen *g;    /* not yet in any connection's list; owns the stop strings */
  struct sample_params sp;
  uint32_t max_tokens;
  char *text; /* the prompt (chat template applied) */
  size_t text_len;
  char *sys; /* the system message rendered alone, or NULL */
  size_t sys_len;
  uint32_t sys_tokens; /* the prompt's leading tokens that are the system message's */
  unsigned flags;
  int32_t *ids;
  int n; /* ids, or a negative code */
  bool has_overflow;
  enum kv_overflow overflow;
  uint32_t keep, sinks;
  bool has_keep;
  enum sched_spec spec;
};

/* Tokenizes p->text into p->ids. Any thread: the tokenizer is read-only. One pass: a text
 * encodes to at most one id per byte, plus the space SPM prepends and the BOS/EOS it may add
 * (a second pass only if that bound were ever wrong). */
static void gen_tokenize(struct gen_prep *p) {
  const struct tok *t = p->g->m->tok;
  size_t cap = p->text_len + 4;
  p->ids = malloc(cap * sizeof *p->ids);
  p->n = p->ids ? tok_encode(t, p->text, p->text_len, p->flags, p->ids, cap) : KVD_ENOMEM;
  if (p->n > 0 && (size_t)p->n > cap) {
    int32_t *more = realloc(p->ids, (size_t)p->n * sizeof *more);
    if (more) p->ids = more;
    p->n = more ? tok_encode(t, p->text, p->text_len, p->flags, more, (size_t)p->n) : KVD_ENOMEM;
  }
  free(p->text);
  p->text = NULL;
  if (p->sys && p->n > 0) {
    int32_t *sid = malloc((p->sys_len + 4) * sizeof *sid);
    int ns = sid ? tok_encode(t, p->sys, p->sys_len, p->flags, sid, p->sys_len + 4) : 0;
    uint32_t k = 0;
    while (ns > 0 && k < (uint32_t)ns && k < (uint32_t)p->n && sid[k] == p->ids[k])
      k++;
    p->sys_tokens = k;
    free(sid);
  }
  free(p->sys);
  p->sys = NULL;
}

static void gen_prep_free(struct gen_prep *p) {
  if (p->g) gen_free(p->g);
  free(p->text);
  free(p->sys);
  free(p->ids);
  free(p);
}

/* Tokens to a request on the engine thread, on the loop thread. Frees p; answers on error. */
static void gen_start(struct srv_conn *c, struct gen_prep *p) {
  struct srv_gen *g = p->g;
  struct srv_model *m = g->m;
  struct srv_session *sess = g->sess;
  uint32_t id = g->id;
  if (p->n <= 0 || !p->ids) {
    int n = p->n;
    gen_prep_free(p);
    srv_reply_error(c, id, n < 0 ? n : KVD_EINVAL,
                    n == 0 ? "the prompt is empty" : "cannot tokenize the prompt");
    return;
  }
  const struct model_hparams *hp = engine_hparams(sched_engine(m->sched));
  uint32_t have = sess ? sched_session_len(sess->ss) : 0;
  enum kv_overflow pol = p->has_overflow ? p->overflow : m->overflow;
  if (pol == KV_OVERFLOW_ERROR && (uint64_t)have + (uint32_t)p->n >= hp->n_ctx_train) {
    int n = p->n;
    gen_prep_free(p);
    srv_reply_error(c, id, KVD_E_CONTEXT,
                    "prompt of %d tokens (plus %u in the session) exceeds the context of %u", n,
                    have, hp->n_ctx_train);
    return;
  }
  if (sched_req_new(p->ids, (uint32_t)p->n, &g->req) < 0) {
    gen_prep_free(p);
    srv_reply_error(c, id, KVD_ENOMEM, NULL);
    return;
  }
  g->prompt_tokens = (uint32_t)p->n;
  g->req->sp = p->sp;
  g->req->max_tokens = p->max_tokens ? p->max_tokens : hp->n_ctx_train;
  g->req->logprobs = g->logprobs;
  g->req->n_eog = tok_eog_ids(m->tok, &g->req->eog); /* the model's tokenizer outlives g */
  g->req->session = sess ? sess->ss : NULL;
  g->req->overflow = pol;
  /* What a shift keeps: asked for, else the session's (fixed by its first turn), else the system
   * prompt's tokens, else BOS. The window keeps its sinks. */
  uint32_t keep = p->sys_tokens ? p->sys_tokens : (p->ids[0] == tok_bos(m->tok) ? 1 : 0);
  if (sess && sess->keep_set) keep = sess->keep;
  if (p->has_keep) keep = p->keep;
  if (sess && !sess->keep_set) {
    sess->keep = keep;
    sess->keep_set = true;
  }
  g->req->keep = pol == KV_OVERFLOW_WINDOW ? p->sinks : keep;
  g->req->spec = p->spec;
  g->req->ud = g;
  if (sched_submit(m->sched, g->req) < 0) { /* the session is as it was */
    gen_prep_free(p);
    srv_reply_error(c, id, KVD_ENOMEM, NULL);
    return;
  }
  p->g = NULL; /* the request's now */
  gen_prep_free(p);
  if (sess) {
    sess->busy = true;
    sess->started = true;
  }
  g->conn = c;
  g->next = c->gens;
  c->gens = g;
  m->n_active++;
}

static void gen_tokenize_work(uv_work_t *w) {
  gen_tokenize(w->data);
}

static void gen_tokenize_done(uv_work_t *w, int status) {
  struct gen_prep *p = w->data;
  struct srv *s = p->srv;
  struct srv_model *m = p->g->m;
  struct srv_session *sess = p->g->sess;
  if (status < 0 && p->n >= 0) p->n = KVD_ECANCELED;
  if (sess) sess->busy = false; /* gen_start takes it again */
  struct srv_conn *c = srv_conn_find(s, p->conn_serial);
  if (sess && sess->closing) { /* closed (or its connection gone) while this was tokenized */
    uint32_t id = p->g->id;
    gen_prep_free(p);
    if (c) srv_reply_error(c, id, KVD_ENOENT, "the session was closed before the prompt ran");
    srv_session_release(sess);
  } else if (!c) {
    gen_prep_free(p);
  } else {
    gen_start(c, p);
  }
  srv_model_release(m); /* the pin; after gen_start, which holds its own */
  srv_maybe_finish(s);
}

void srv_h_generate(struct srv_conn *c, const struct ipc_msg *msg) {
  struct ipc_err e = {0};
  struct gen_params gp;
  int rc = gen_read_params(msg->params, &gp, &e);
  if (rc < 0) {
    srv_reply_error(c, msg->id, rc, "%s", e.message);
    return;
  }
  /* A msgid already in flight never gets here (srv_conn refuses it), and one answered early by
   * a stop string is free again even while its engine work winds down. */
  struct srv_session *sess = NULL;
  if (gp.has_session) {
    for (sess = c->sessions; sess && sess->id != gp.session; sess = sess->next) {
    }
    if (!sess || sess->closing) {
      srv_reply_error(c, msg->id, KVD_ENOENT, "no session %u on this connection", gp.session);
      return;
    }
    if (sess->busy) {
      srv_reply_error(c, msg->id, KVD_EBUSY, "session %u is already generating", gp.session);
      return;
    }
  }
  struct srv_model *m = sess ? sess->m : srv_model_find(c->srv, gp.model, gp.model_len);
  if (!m || m->unloading) {
    srv_reply_error(c, msg->id, KVD_E_NO_MODEL,
                    gp.model ? "no model named %.*s is loaded" : "no model is loaded%.*s",
                    (int)gp.model_len, gp.model ? gp.model : "");
    return;
  }
  /* A queue, not a backlog: past SRV_MAX_QUEUED requests waiting for their first token on this
   * model, new ones are told to come back rather than left to wait minutes. */
  uint32_t queued = 0;
  for (struct srv_conn *o = c->srv->conns; o; o = o->next)
    for (struct srv_gen *q = o->gens; q; q = q->next)
      queued += q->m == m && q->n_seen == 0;
  if (queued >= SRV_MAX_QUEUED) {
    srv_reply_error(c, msg->id, KVD_EBUSY, "%u requests are already waiting for %s; try again",
                    queued, m->name);
    return;
  }
  /* Asked for by name, a draft model that is not there is an error (the scheduler would refuse
   * it too, but only after tokenizing, and without the model's name); the daemon's default of
   * draft means "where there is one" and leaves the other models on auto. */
  enum sched_spec spec = gp.spec;
  const char *dflt = c->srv->cfg->speculative; /* checked by config_load */
  if (!gp.has_spec && (!dflt || srv_spec_parse(dflt, strlen(dflt), &spec) < 0))
    spec = SCHED_SPEC_AUTO;
  if (spec == SCHED_SPEC_DRAFT && !m->draft_f) {
    if (gp.has_spec) {
      srv_reply_error(c, msg->id, KVD_E_UNSUPPORTED, "model %s has no draft model", m->name);
      return;
    }
    spec = SCHED_SPEC_AUTO;
  }
  char *text = NULL, *sys = NULL;
  size_t text_len = 0, sys_len = 0;
  rc = gen_prompt_text(m, &gp, &text, &text_len, &sys, &sys_len, &e);
  if (rc < 0) {
    srv_reply_error(c, msg->id, rc, "%s", e.message[0] ? e.message : kvd_strerror(rc));
    return;
  }
  /* Everything the request needs is copied out of the message now (it is freed when this
   * returns): the srv_gen with its stop strings, and the prep with the prompt text. */
  struct gen_prep *p = calloc(1, sizeof *p);
  struct srv_gen *g = p ? calloc(1, sizeof *g) : NULL;
  if (g) g->piece = malloc(tok_stream_bound(m->tok));
  if (g && g->piece && gp.n_stops) {
    g->stops = calloc(gp.n_stops, sizeof *g->stops);
    g->stop_len = calloc(gp.n_stops, sizeof *g->stop_len);
  }
  for (size_t i = 0; g && i < gp.n_stops && g->stops && g->stop_len; i++) {
    size_t len = gp.stops[i].via.str.size;
    g->stops[i] = malloc(len + 1);
    if (!g->stops[i]) break;
    memcpy(g->stops[i], gp.stops[i].via.str.ptr, len);
    g->stops[i][len] = '\0';
    g->stop_len[i] = len;
    g->n_stops = i + 1;
    if (len > g->max_stop) g->max_stop = len;
  }
  if (!g || !g->piece || g->n_stops != gp.n_stops) {
    if (g) gen_free(g);
    free(p);
    free(text);
    free(sys);
    srv_reply_error(c, msg->id, KVD_ENOMEM, NULL);
    return;
  }
  g->m = m;
  g->sess = sess;
  g->id = msg->id;
  g->stream = gp.stream;
  g->logprobs = gp.logprobs;
  g->t_recv = srv_now();
  tok_stream_init(&g->ts, m->tok, 0);
  p->srv = c->srv;
  p->conn_serial = c->serial;
  p->g = g;
  p->sp = gp.sp;
  p->max_tokens = gp.max_tokens;
  p->text = text;
  p->text_len = text_len;
  p->sys = sys;
  p->sys_len = sys_len;
  p->has_overflow = gp.has_overflow;
  p->overflow = gp.overflow;
  p->keep = gp.keep;
  p->has_keep = gp.has_keep;
  p->sinks = gp.sinks;
  p->spec = spec;
  /* BOS only at the start of a conversation; chat text may hold the template's special tokens. */
  p->flags = (sess && sess->started) ? 0 : TOK_ADD_SPECIAL;
  if (gp.messages) p->flags |= TOK_PARSE_SPECIAL;
  if (text_len <= SRV_TOKENIZE_INLINE) {
    gen_tokenize(p);
    gen_start(c, p);
    return;
  }
  /* A long prompt (up to IPC_MAX_PROMPT_BYTES) is tokenized on libuv's threadpool, so the loop
   * keeps serving everyone else meanwhile. The model and the session are pinned until then: an
   * unload is refused (n_active), the session is busy, the drain waits. */
  m->n_active++;
  if (sess) sess->busy = true;
  p->work.data = p;
  if (uv_queue_work(c->srv->loop, &p->work, gen_tokenize_work, gen_tokenize_done) < 0) {
    m->n_active--;
    if (sess) sess->busy = false;
    gen_tokenize(p);
    gen_start(c, p);
  }
}

/* The requests array of `status`: what the loop knows, without reading engine-thread state. */
void srv_gen_count(struct srv *s, uint32_t *ret_queued, uint32_t *ret_running) {
  uint32_t n = 0, queued = 0;
  for (struct srv_conn *c = s->conns; c; c = c->next)
    for (struct srv_gen *g = c->gens; g; g = g->next) {
      if (g->answered) continue; /* its client has the answer; the engine is winding down */
      n++;
      queued += g->n_seen == 0 && atomic_load(&g->req->pub_state) == SCHED_STATE_QUEUED;
    }
  *ret_queued = queued;
  *ret_running = n - queued;
}

void srv_gen_write_status(struct srv *s, struct ipc_w *w, uint32_t *ret_queued,
                          uint32_t *ret_running) {
  uint32_t queued, started;
  srv_gen_count(s, &queued, &started);
  ipc_w_array(w, queued + started);
  double now = srv_now();
  for (struct srv_conn *c = s->conns; c; c = c->next)
    for (struct srv_gen *g = c->gens; g; g = g->next) {
      if (g->answered) continue;
      /* What the engine thread published (atomics), and what the loop saw itself. */
      uint32_t st = atomic_load(&g->req->pub_state);
      if (g->n_seen) st = SCHED_STATE_DECODE;
      static const char *const states[] = {"queued", "prefill", "decode"};
      double queue_ms = st == SCHED_STATE_QUEUED
                            ? (now - g->t_recv) * 1e3
                            : (double)atomic_load(&g->req->pub_queue_us) * 1e-3;
      double t_start = g->t_recv + queue_ms * 1e-3;
      ipc_w_map_open(w);
      ipc_w_kv_u64(w, "id", g->id);
      ipc_w_kv_u64(w, "connection", c->serial); /* ids are per connection */
      if (c->client[0]) ipc_w_kv_cstr(w, "client", c->client);
      ipc_w_kv_cstr(w, "model", g->m->name);
      ipc_w_kv_cstr(w, "state", states[st]);
      ipc_w_kv_u64(w, "prompt_tokens", g->prompt_tokens);
      ipc_w_kv_u64(w, "completion_tokens", g->n_seen);
      ipc_w_kv_u64(w, "cached_tokens", atomic_load(&g->req->pub_cached));
      ipc_w_kv_f64(w, "queue_ms", queue_ms);
      double dec = g->n_seen ? now - g->t_first_seen : 0;
      double pre_end = g->n_seen ? g->t_first_seen : now;
      ipc_w_kv_f64(w, "prefill_ms",
                   st == SCHED_STATE_QUEUED || pre_end < t_start ? 0 : (pre_end - t_start) * 1e3);
      ipc_w_kv_f64(w, "decode_ms", dec * 1e3);
      ipc_w_kv_f64(w, "tokens_per_s", dec > 0 ? (g->n_seen - 1) / dec : 0);
      ipc_w_close(w);
    }
  *ret_queued = queued;
  *ret_running = started;
}

void srv_gen_cancel_session(struct srv_conn *c, struct srv_session *ss) {
  for (struct srv_gen *g = c->gens; g; g = g->next)
    if (g->sess == ss) sched_cancel(g->req);
}
