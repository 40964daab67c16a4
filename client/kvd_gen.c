/* libkvd's generate: params to the wire, generate.chunk notifications to chunk callbacks, the
 * final response to a struct kvd_gen_result, for the blocking and the async API alike.
 *
 * A generate request accumulates what its chunks carried (text, token ids, logprobs) so that its
 * result holds the whole completion even when streamed (the server's result text is then
 * empty): result text = the chunks' text + the result's text. */
#include "kvd_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void kvd_gen_params_init(struct kvd_gen_params *p) {
  if (!p) return;
  memset(p, 0, sizeof *p);
  p->max_tokens = -1;
  p->temperature = NAN;
  p->top_k = -1;
  p->top_p = NAN;
  p->min_p = NAN;
  p->repeat_penalty = NAN;
  p->frequency_penalty = NAN;
  p->presence_penalty = NAN;
  p->seed = -1;
  p->session = -1;
  p->thinking = -1;
  p->keep = -1;
  p->sinks = -1;
}

static void logprob_clear(struct kvd_logprob *lp) {
  free(lp->text);
  free(lp->top);
}

/* Frees what r points to (r itself is the caller's). */
static void result_clear(struct kvd_gen_result *r) {
  free(r->text);
  free(r->finish_reason);
  free(r->tokens);
  for (size_t i = 0; i < r->n_logprobs; i++)
    logprob_clear(&r->logprobs[i]);
  free(r->logprobs);
  free(r->error_message);
}

void kvd_gen_result_free(struct kvd_gen_result *r) {
  if (!r) return;
  result_clear(r);
  free(r);
}

void kvd__gen_release(struct kvd__req *req) {
  kvd__buf_destroy(&req->text);
  free(req->tokens);
  req->tokens = NULL;
  req->n_tokens = req->cap_tokens = 0;
  for (size_t i = 0; i < req->n_logprobs; i++)
    logprob_clear(&req->logprobs[i]);
  free(req->logprobs);
  req->logprobs = NULL;
  req->n_logprobs = req->cap_logprobs = 0;
}

/* ---- Params ------------------------------------------------------------------------------ */

/* What the server would refuse anyway, caught before anything is sent so the message says which
 * field of the struct is wrong. */
static int check_params(struct kvd_client *c, const struct kvd_gen_params *p) {
  if (!p) return kvd__error(c, KVD_EINVAL, "generate: params is NULL");
  if (!p->prompt == !p->messages)
    return kvd__error(c, KVD_EINVAL, "generate: give exactly one of prompt and messages");
  for (size_t i = 0; p->messages && i < p->n_messages; i++)
    if (!p->messages[i].role || !p->messages[i].content)
      return kvd__error(c, KVD_EINVAL, "generate: message %zu has no role or content", i);
  if (p->n_stop && !p->stop) return kvd__error(c, KVD_EINVAL, "generate: n_stop without stop");
  for (size_t i = 0; i < p->n_stop; i++)
    if (!p->stop[i]) return kvd__error(c, KVD_EINVAL, "generate: stop string %zu is NULL", i);
  return 0;
}

static void put_f64(struct ipc_w *w, const char *key, double v) {
  if (!isnan(v)) ipc_w_kv_f64(w, key, v);
}

static void put_params(struct ipc_w *w, const struct kvd_gen_params *p, bool stream) {
  ipc_w_map_open(w);
  if (p->prompt) ipc_w_kv_cstr(w, "prompt", p->prompt);
  if (p->messages) {
    ipc_w_key(w, "messages");
    ipc_w_array(w, (uint32_t)p->n_messages);
    for (size_t i = 0; i < p->n_messages; i++) {
      ipc_w_map(w, 2);
      ipc_w_kv_cstr(w, "role", p->messages[i].role);
      ipc_w_kv_cstr(w, "content", p->messages[i].content);
    }
  }
  if (p->model) ipc_w_kv_cstr(w, "model", p->model);
  if (p->max_tokens >= 0) ipc_w_kv_u64(w, "max_tokens", (uint64_t)p->max_tokens);
  put_f64(w, "temperature", p->temperature);
  if (p->top_k >= 0) ipc_w_kv_u64(w, "top_k", (uint64_t)p->top_k);
  put_f64(w, "top_p", p->top_p);
  put_f64(w, "min_p", p->min_p);
  put_f64(w, "repeat_penalty", p->repeat_penalty);
  put_f64(w, "frequency_penalty", p->frequency_penalty);
  put_f64(w, "presence_penalty", p->presence_penalty);
  if (p->seed >= 0) ipc_w_kv_u64(w, "seed", (uint64_t)p->seed);
  if (p->n_stop) {
    ipc_w_key(w, "stop");
    ipc_w_array(w, (uint32_t)p->n_stop);
    for (size_t i = 0; i < p->n_stop; i++)
      ipc_w_cstr(w, p->stop[i]);
  }
  if (stream) ipc_w_kv_bool(w, "stream", true);
  if (p->logprobs) ipc_w_kv_u64(w, "logprobs", p->logprobs);
  if (p->session >= 0) ipc_w_kv_u64(w, "session", (uint64_t)p->session);
  if (p->thinking >= 0) ipc_w_kv_bool(w, "thinking", p->thinking != 0);
  if (p->overflow) ipc_w_kv_cstr(w, "overflow", p->overflow);
  if (p->keep >= 0) ipc_w_kv_u64(w, "keep", (uint64_t)p->keep);
  if (p->sinks >= 0) ipc_w_kv_u64(w, "sinks", (uint64_t)p->sinks);
  if (p->speculative) ipc_w_kv_cstr(w, "speculative", p->speculative);
  ipc_w_close(w);
}

/* Sends a generate; the request is in flight on success. */
static int start(struct kvd_client *c, const struct kvd_gen_params *p, kvd_chunk_fn on_chunk,
                 kvd_done_fn on_done, void *ud, bool sync, struct kvd__req **ret) {
  int rc = check_params(c, p);
  if (rc < 0) return rc;
  /* A count over UINT32_MAX cannot be encoded; the server's limits are far below anyway. */
  if (p->n_messages > UINT32_MAX || p->n_stop > UINT32_MAX)
    return kvd__error(c, KVD_E2BIG, "generate: too many messages or stop strings");
  struct kvd__req *req = kvd__begin(c, "generate", IPC_M_GENERATE, KVD__REQ_GEN, sync, &rc);
  if (!req) return rc;
  req->on_chunk = on_chunk;
  req->on_done = on_done;
  req->ud = ud;
  put_params(&c->w, p, p->stream || on_chunk);
  rc = kvd__send(c, req);
  if (rc < 0) return rc;
  *ret = req;
  return 0;
}

/* ---- Chunks ------------------------------------------------------------------------------ */

/* Appends items (unsigned integers, checked by the caller) to req's token ids. */
static bool add_tokens(struct kvd__req *req, const msgpack_object *items, size_t n) {
  if (req->cap_tokens - req->n_tokens < n) {
    size_t cap = req->cap_tokens ? req->cap_tokens : 64;
    while (cap - req->n_tokens < n)
      cap *= 2;
    uint32_t *t = realloc(req->tokens, cap * sizeof *t);
    if (!t) return false;
    req->tokens = t;
    req->cap_tokens = cap;
  }
  for (size_t i = 0; i < n; i++)
    req->tokens[req->n_tokens++] = (uint32_t)items[i].via.u64;
  return true;
}

/* One logprobs map {id, text, logprob, top: [{id, logprob}]}; 0, KVD_EPROTO or KVD_ENOMEM. Keys
 * this version does not know are ignored; missing ones read as 0. */
static int parse_logprob(const msgpack_object *map, struct kvd_logprob *lp) {
  struct ipc_err err;
  const char *s = "";
  size_t len = 0, n_top = 0;
  const msgpack_object *top = NULL;
  memset(lp, 0, sizeof *lp);
  if (map->type != MSGPACK_OBJECT_MAP || ipc_get_u32(map, "id", &lp->id, &err) < 0 ||
      ipc_get_str(map, "text", &s, &len, &err) < 0 ||
      ipc_get_f64(map, "logprob", &lp->logprob, &err) < 0 ||
      ipc_get_maps(map, "top", &top, &n_top, &err) < 0)
    return KVD_EPROTO;
  lp->text = kvd__strndup(s, len);
  if (n_top) lp->top = calloc(n_top, sizeof *lp->top);
  if (!lp->text || (n_top && !lp->top)) {
    logprob_clear(lp);
    return KVD_ENOMEM;
  }
  for (size_t i = 0; i < n_top; i++) {
    if (ipc_get_u32(&top[i], "id", &lp->top[i].id, &err) < 0 ||
        ipc_get_f64(&top[i], "logprob", &lp->top[i].logprob, &err) < 0) {
      logprob_clear(lp);
      return KVD_EPROTO;
    }
  }
  lp->n_top = n_top;
  return 0;
}

/* Appends n logprobs maps to req's; 0 or a negative code (nothing half-added). */
static int add_logprobs(struct kvd__req *req, const msgpack_object *items, size_t n) {
  if (req->cap_logprobs - req->n_logprobs < n) {
    size_t cap = req->cap_logprobs ? req->cap_logprobs : 32;
    while (cap - req->n_logprobs < n)
      cap *= 2;
    struct kvd_logprob *l = realloc(req->logprobs, cap * sizeof *l);
    if (!l) return KVD_ENOMEM;
    req->logprobs = l;
    req->cap_logprobs = cap;
  }
  for (size_t i = 0; i < n; i++) {
    int rc = parse_logprob(&items[i], &req->logprobs[req->n_logprobs]);
    if (rc < 0) return rc;
    req->n_logprobs++;
  }
  return 0;
}

int kvd__gen_chunk(struct kvd_client *c, const struct ipc_msg *m) {
  struct ipc_err err;
  uint32_t id = 0;
  const char *text = "";
  size_t len = 0, n_tokens = 0, n_lp = 0;
  const msgpack_object *tokens = NULL, *lps = NULL;
  /* A chunk we cannot read would silently lose text: better to report the server as broken. */
  if (ipc_validate_params(m, &err) < 0 || ipc_get_u32(m->params, "id", &id, &err) < 0) {
    kvd__error(c, KVD_EPROTO, "malformed generate.chunk from kvd: %s", err.message);
    return KVD_EPROTO;
  }
  ipc_get_str(m->params, "text", &text, &len, NULL);
  ipc_get_uints(m->params, "tokens", &tokens, &n_tokens, NULL);
  ipc_get_maps(m->params, "logprobs", &lps, &n_lp, NULL);
  for (size_t i = 0; i < n_tokens; i++)
    if (tokens[i].via.u64 > UINT32_MAX)
      return kvd__error(c, KVD_EPROTO, "generate.chunk: token id out of range");

  struct kvd__req *req = kvd__find(c, id);
  if (!req || req->kind != KVD__REQ_GEN) return 0; /* a generate we no longer track */
  if (req->abandoned) return 0;
  size_t tok0 = req->n_tokens, lp0 = req->n_logprobs;
  kvd__buf_add(&req->text, text, len);
  if (req->text.oom || !add_tokens(req, tokens, n_tokens)) req->oom = true;
  int rc = n_lp ? add_logprobs(req, lps, n_lp) : 0;
  if (rc == KVD_ENOMEM) req->oom = true;
  if (rc == KVD_EPROTO) return kvd__error(c, rc, "generate.chunk: malformed logprobs");
  if (req->oom || req->cancelled || !req->on_chunk) return 0;

  struct kvd_chunk ch = {
      .id = id,
      .text = text,
      .text_len = len,
      .tokens = req->tokens + tok0,
      .n_tokens = req->n_tokens - tok0,
      .logprobs = req->logprobs + lp0,
      .n_logprobs = req->n_logprobs - lp0,
  };
  /* req stays valid through the callback: what it may call neither frees requests nor runs a
   * dispatch (see kvd.h, Callbacks). */
  c->cb_depth++;
  int stop = req->on_chunk(req->ud, &ch);
  c->cb_depth--;
  if (stop) kvd__cancel_req(c, req);
  return 0;
}

/* ---- The result -------------------------------------------------------------------------- */

static enum kvd_finish finish_of(const char *s) {
  if (!strcmp(s, "stop")) return KVD_FINISH_STOP;
  if (!strcmp(s, "length")) return KVD_FINISH_LENGTH;
  if (!strcmp(s, "cancelled")) return KVD_FINISH_CANCELLED;
  if (!strcmp(s, "error")) return KVD_FINISH_ERROR;
  return KVD_FINISH_OTHER;
}

/* Fills r from a generate response's result map (validated against api.json) and what req
 * accumulated; 0 or a negative code with c->err set. */
static int parse_result(struct kvd_client *c, struct kvd__req *req, const msgpack_object *res,
                        struct kvd_gen_result *r) {
  const char *s = "";
  size_t len = 0, n = 0;
  const msgpack_object *map = NULL, *items = NULL;
  struct ipc_err err;
  if (ipc_validate_result(IPC_M_GENERATE, res, &err) < 0)
    return kvd__error(c, KVD_EPROTO, "malformed generate result from kvd: %s", err.message);
  ipc_get_str(res, "text", &s, &len, NULL);
  kvd__buf_add(&req->text, s, len);
  ipc_get_str(res, "finish_reason", &s, &len, NULL);
  r->finish_reason = kvd__strndup(s, len);
  if (!r->finish_reason) return kvd__error(c, KVD_ENOMEM, "out of memory");
  r->finish = finish_of(r->finish_reason);
  ipc_get_u64(res, "prompt_tokens", &r->prompt_tokens, NULL);
  ipc_get_u64(res, "completion_tokens", &r->completion_tokens, NULL);
  ipc_get_u64(res, "cached_tokens", &r->cached_tokens, NULL);
  ipc_get_u64(res, "context_shifts", &r->context_shifts, NULL);
  if (ipc_get_map(res, "timings", &map, NULL) == 1) {
    /* A timing of the wrong type is left at 0 rather than failing a finished generation. */
    ipc_get_f64(map, "queue_ms", &r->timings.queue_ms, &err);
    ipc_get_f64(map, "prefill_ms", &r->timings.prefill_ms, &err);
    ipc_get_f64(map, "decode_ms", &r->timings.decode_ms, &err);
    ipc_get_f64(map, "ttft_ms", &r->timings.ttft_ms, &err);
    ipc_get_f64(map, "tokens_per_s", &r->timings.tokens_per_s, &err);
    ipc_get_u64(map, "draft_tokens", &r->draft_tokens, &err);
    ipc_get_u64(map, "accepted_tokens", &r->accepted_tokens, &err);
  }
  if (ipc_get_maps(res, "logprobs", &items, &n, NULL) == 1) {
    int rc = add_logprobs(req, items, n);
    if (rc < 0)
      return kvd__error(c, rc, rc == KVD_ENOMEM ? "out of memory" : "malformed logprobs from kvd");
  }
  if (ipc_get_map(res, "error", &map, NULL) == 1) {
    uint64_t code = 0;
    const char *msg = "error";
    size_t mlen = 5;
    ipc_get_u64(map, "code", &code, &err);
    ipc_get_str(map, "message", &msg, &mlen, &err);
    r->error = code && code <= INT32_MAX ? kvd_error_from_wire((int)code) : KVD_EPROTO;
    r->error_message = kvd__strndup(msg, mlen);
    if (!r->error_message) return kvd__error(c, KVD_ENOMEM, "out of memory");
  } else if (r->finish == KVD_FINISH_ERROR) {
    r->error = KVD_EPROTO; /* the server forgot to say why */
    r->error_message = kvd__strndup("generation failed", 17);
    if (!r->error_message) return kvd__error(c, KVD_ENOMEM, "out of memory");
  }
  return 0;
}

/* Moves what req accumulated into r. */
static void take_acc(struct kvd__req *req, struct kvd_gen_result *r) {
  r->text = kvd__buf_steal(&req->text, &r->text_len);
  r->tokens = req->tokens;
  r->n_tokens = req->n_tokens;
  r->logprobs = req->logprobs;
  r->n_logprobs = req->n_logprobs;
  req->tokens = NULL;
  req->logprobs = NULL;
  req->n_tokens = req->cap_tokens = req->n_logprobs = req->cap_logprobs = 0;
}

void kvd__gen_end(struct kvd_client *c, struct kvd__req *req, struct ipc_msg *m, int rc) {
  struct kvd_gen_result r = {.id = req->id};
  if (rc == 0 && m) {
    const char *msg;
    rc = ipc_msg_error(m, &msg);
    if (rc < 0) kvd__error(c, rc, "%s", msg);
  }
  if (rc == 0 && m) rc = parse_result(c, req, m->result, &r);
  if (rc == 0 && req->oom) rc = kvd__error(c, KVD_ENOMEM, "out of memory keeping the chunks");
  take_acc(req, &r);
  if (rc == 0 && !r.text) rc = kvd__error(c, KVD_ENOMEM, "out of memory");
  if (rc < 0) {
    /* The failure as a result too, so on_done has one shape to look at. */
    free(r.finish_reason);
    free(r.error_message);
    r.finish = KVD_FINISH_ERROR;
    r.finish_reason = kvd__strndup("error", 5);
    r.error = rc;
    r.error_message = kvd__strndup(c->err, strlen(c->err));
  }
  ipc_msg_free(m);

  if (req->sync) {
    req->rc = rc;
    req->done = true;
    if (rc == 0) {
      req->result = malloc(sizeof *req->result);
      if (req->result) {
        *req->result = r;
        return;
      }
      req->rc = kvd__error(c, KVD_ENOMEM, "out of memory");
    }
    result_clear(&r);
    return;
  }
  c->cb_depth++;
  req->on_done(req->ud, rc, &r);
  c->cb_depth--;
  result_clear(&r);
  kvd__req_free(req);
}

/* ---- Public entry points ----------------------------------------------------------------- */

int kvd_generate(struct kvd_client *c, const struct kvd_gen_params *p, kvd_chunk_fn on_chunk,
                 void *ud, struct kvd_gen_result **ret) {
  if (!c) return KVD_EINVAL;
  struct kvd__req *req;
  int rc = start(c, p, on_chunk, NULL, ud, true, &req);
  if (rc < 0) return rc;
  rc = kvd__wait(c, req);
  if (req->abandoned) return rc;
  if (rc == 0 && ret) {
    *ret = req->result;
    req->result = NULL;
  }
  kvd__req_free(req);
  return rc;
}

int kvd_chat(struct kvd_client *c, const struct kvd_message *messages, size_t n_messages,
             const struct kvd_gen_params *p, kvd_chunk_fn on_chunk, void *ud,
             struct kvd_gen_result **ret) {
  struct kvd_gen_params q;
  if (p)
    q = *p;
  else
    kvd_gen_params_init(&q);
  q.prompt = NULL;
  q.messages = messages;
  q.n_messages = n_messages;
  return kvd_generate(c, &q, on_chunk, ud, ret);
}

int kvd_generate_async(struct kvd_client *c, const struct kvd_gen_params *p, kvd_chunk_fn on_chunk,
                       kvd_done_fn on_done, void *ud, uint32_t *ret_id) {
  if (!c) return KVD_EINVAL;
  if (!on_done) return kvd__error(c, KVD_EINVAL, "kvd_generate_async: on_done is required");
  struct kvd__req *req;
  int rc = start(c, p, on_chunk, on_done, ud, false, &req);
  if (rc < 0) return rc;
  if (ret_id) *ret_id = req->id;
  return 0;
}
