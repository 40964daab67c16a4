/* libkvd's blocking methods besides generate: tokens, models, sessions, status. Each one is the
 * same four steps: kvd__begin, the params map, kvd__call (which checks the result's shape against
 * api.json), then copying the result into the caller's types. */
#include "kvd_internal.h"

#include <stdlib.h>
#include <string.h>

/* ---- Tokens ------------------------------------------------------------------------------ */

int kvd_tokenize(struct kvd_client *c, const char *model, const char *text, unsigned flags,
                 uint32_t **ret_tokens, size_t *ret_n) {
  if (!c) return KVD_EINVAL;
  if (!text || !ret_tokens || !ret_n)
    return kvd__error(c, KVD_EINVAL, "kvd_tokenize: text, ret_tokens and ret_n are required");
  int rc;
  struct kvd__req *req = kvd__begin(c, "tokenize", IPC_M_TOKENIZE, KVD__REQ_CALL, true, &rc);
  if (!req) return rc;
  ipc_w_map_open(&c->w);
  ipc_w_kv_cstr(&c->w, "text", text);
  if (model) ipc_w_kv_cstr(&c->w, "model", model);
  ipc_w_kv_bool(&c->w, "add_special", flags & KVD_TOKENIZE_ADD_SPECIAL);
  ipc_w_kv_bool(&c->w, "parse_special", flags & KVD_TOKENIZE_PARSE_SPECIAL);
  ipc_w_close(&c->w);
  struct ipc_msg *m;
  rc = kvd__call(c, req, &m);
  if (rc < 0) return rc;
  const msgpack_object *items = NULL;
  size_t n = 0;
  ipc_get_uints(m->result, "tokens", &items, &n, NULL);
  uint32_t *t = malloc((n ? n : 1) * sizeof *t);
  if (!t) rc = kvd__error(c, KVD_ENOMEM, "out of memory");
  for (size_t i = 0; t && i < n; i++) {
    if (items[i].via.u64 > UINT32_MAX) {
      rc = kvd__error(c, KVD_EPROTO, "tokenize: token id out of range");
      break;
    }
    t[i] = (uint32_t)items[i].via.u64;
  }
  ipc_msg_free(m);
  if (rc < 0) {
    free(t);
    return rc;
  }
  *ret_tokens = t;
  *ret_n = n;
  return 0;
}

int kvd_detokenize(struct kvd_client *c, const char *model, const uint32_t *tokens, size_t n,
                   char **ret_text) {
  if (!c) return KVD_EINVAL;
  if ((n && !tokens) || !ret_text)
    return kvd__error(c, KVD_EINVAL, "kvd_detokenize: tokens and ret_text are required");
  if (n > UINT32_MAX) return kvd__error(c, KVD_E2BIG, "kvd_detokenize: too many tokens");
  int rc;
  struct kvd__req *req = kvd__begin(c, "detokenize", IPC_M_DETOKENIZE, KVD__REQ_CALL, true, &rc);
  if (!req) return rc;
  ipc_w_map_open(&c->w);
  ipc_w_key(&c->w, "tokens");
  ipc_w_array(&c->w, (uint32_t)n);
  for (size_t i = 0; i < n; i++)
    ipc_w_u64(&c->w, tokens[i]);
  if (model) ipc_w_kv_cstr(&c->w, "model", model);
  ipc_w_close(&c->w);
  struct ipc_msg *m;
  rc = kvd__call(c, req, &m);
  if (rc < 0) return rc;
  const char *s = "";
  size_t len = 0;
  ipc_get_str(m->result, "text", &s, &len, NULL);
  char *text = kvd__strndup(s, len);
  ipc_msg_free(m);
  if (!text) return kvd__error(c, KVD_ENOMEM, "out of memory");
  *ret_text = text;
  return 0;
}

/* ---- Models ------------------------------------------------------------------------------ */

/* A string key as a heap copy: NULL when absent (0) or out of memory (KVD_ENOMEM). */
static int dup_key(const msgpack_object *map, const char *key, char **ret) {
  const char *s;
  size_t len;
  struct ipc_err err;
  *ret = NULL;
  if (ipc_get_str(map, key, &s, &len, &err) != 1) return 0;
  *ret = kvd__strndup(s, len);
  return *ret ? 0 : KVD_ENOMEM;
}

void kvd__model_info_clear(struct kvd_model_info *m) {
  free(m->name);
  free(m->path);
  free(m->arch);
  free(m->chat_template);
  free(m->chat_template_warning);
  free(m->kv_type);
  memset(m, 0, sizeof *m);
}

int kvd__model_info(const msgpack_object *map, struct kvd_model_info *m) {
  struct ipc_err err;
  memset(m, 0, sizeof *m);
  /* Keys of the wrong type read as absent: one odd field should not hide the whole list. */
  ipc_get_u64(map, "n_ctx", &m->n_ctx, &err);
  ipc_get_u64(map, "n_vocab", &m->n_vocab, &err);
  ipc_get_u64(map, "n_params", &m->n_params, &err);
  ipc_get_u64(map, "bytes", &m->bytes, &err);
  ipc_get_bool(map, "default", &m->is_default, &err);
  ipc_get_u64(map, "kv_bytes_per_token", &m->kv_bytes_per_token, &err);
  if (dup_key(map, "name", &m->name) < 0 || dup_key(map, "path", &m->path) < 0 ||
      dup_key(map, "arch", &m->arch) < 0 || dup_key(map, "chat_template", &m->chat_template) < 0 ||
      dup_key(map, "chat_template_warning", &m->chat_template_warning) < 0 ||
      dup_key(map, "kv_type", &m->kv_type) < 0) {
    kvd__model_info_clear(m);
    return KVD_ENOMEM;
  }
  return 0;
}

/* An array of model maps into a new array; 0 or KVD_ENOMEM. */
static int model_array(const msgpack_object *items, size_t n, struct kvd_model_info **ret) {
  struct kvd_model_info *a = calloc(n ? n : 1, sizeof *a);
  if (!a) return KVD_ENOMEM;
  for (size_t i = 0; i < n; i++) {
    if (kvd__model_info(&items[i], &a[i]) < 0) {
      for (size_t j = 0; j < i; j++)
        kvd__model_info_clear(&a[j]);
      free(a);
      return KVD_ENOMEM;
    }
  }
  *ret = a;
  return 0;
}

void kvd_model_list_free(struct kvd_model_list *l) {
  if (!l) return;
  for (size_t i = 0; i < l->n; i++)
    kvd__model_info_clear(&l->models[i]);
  free(l->models);
  free(l);
}

int kvd_models_list(struct kvd_client *c, struct kvd_model_list **ret) {
  if (!c) return KVD_EINVAL;
  if (!ret) return kvd__error(c, KVD_EINVAL, "kvd_models_list: ret is NULL");
  int rc;
  struct kvd__req *req = kvd__begin(c, "models.list", IPC_M_MODELS_LIST, KVD__REQ_CALL, true, &rc);
  if (!req) return rc;
  ipc_w_map(&c->w, 0);
  struct ipc_msg *m;
  rc = kvd__call(c, req, &m);
  if (rc < 0) return rc;
  const msgpack_object *items = NULL;
  size_t n = 0;
  ipc_get_maps(m->result, "models", &items, &n, NULL);
  struct kvd_model_list *l = calloc(1, sizeof *l);
  if (!l || model_array(items, n, &l->models) < 0) {
    free(l);
    ipc_msg_free(m);
    return kvd__error(c, KVD_ENOMEM, "out of memory");
  }
  l->n = n;
  ipc_msg_free(m);
  *ret = l;
  return 0;
}

void kvd_model_info_free(struct kvd_model_info *m) {
  if (!m) return;
  kvd__model_info_clear(m);
  free(m);
}

int kvd_models_load(struct kvd_client *c, const char *path, const char *name,
                    struct kvd_model_info **ret) {
  return kvd_models_load_template(c, path, name, NULL, ret);
}

int kvd_models_load_template(struct kvd_client *c, const char *path, const char *name,
                             const char *chat_template, struct kvd_model_info **ret) {
  return kvd_models_load_opts(
      c, path, &(struct kvd_load_opts){.name = name, .chat_template = chat_template}, ret);
}

int kvd_models_load_opts(struct kvd_client *c, const char *path, const struct kvd_load_opts *opts,
                         struct kvd_model_info **ret) {
  static const struct kvd_load_opts none;
  if (!opts) opts = &none;
  const char *name = opts->name;
  if (!c) return KVD_EINVAL;
  if (!path) return kvd__error(c, KVD_EINVAL, "kvd_models_load: path is NULL");
  int rc;
  struct kvd__req *req = kvd__begin(c, "models.load", IPC_M_MODELS_LOAD, KVD__REQ_CALL, true, &rc);
  if (!req) return rc;
  ipc_w_map_open(&c->w);
  ipc_w_kv_cstr(&c->w, "path", path);
  if (name) ipc_w_kv_cstr(&c->w, "name", name);
  if (opts->chat_template) ipc_w_kv_cstr(&c->w, "chat_template", opts->chat_template);
  if (opts->kv_type) ipc_w_kv_cstr(&c->w, "kv_type", opts->kv_type);
  ipc_w_close(&c->w);
  struct ipc_msg *m;
  rc = kvd__call(c, req, &m);
  if (rc < 0) return rc;
  struct kvd_model_info *info = NULL;
  if (ret) {
    info = calloc(1, sizeof *info);
    if (!info || kvd__model_info(m->result, info) < 0 || !(info->path = strdup(path))) {
      kvd_model_info_free(info);
      ipc_msg_free(m);
      return kvd__error(c, KVD_ENOMEM, "out of memory");
    }
    *ret = info;
  }
  ipc_msg_free(m);
  return 0;
}

int kvd_models_unload(struct kvd_client *c, const char *name) {
  if (!c) return KVD_EINVAL;
  if (!name) return kvd__error(c, KVD_EINVAL, "kvd_models_unload: name is NULL");
  int rc;
  struct kvd__req *req =
      kvd__begin(c, "models.unload", IPC_M_MODELS_UNLOAD, KVD__REQ_CALL, true, &rc);
  if (!req) return rc;
  ipc_w_map(&c->w, 1);
  ipc_w_kv_cstr(&c->w, "name", name);
  struct ipc_msg *m;
  rc = kvd__call(c, req, &m);
  if (rc < 0) return rc;
  ipc_msg_free(m);
  return 0;
}

/* ---- Sessions ---------------------------------------------------------------------------- */

/* A session method taking {model} or {session} and answering {session}. */
static int session_call(struct kvd_client *c, const char *method, enum ipc_method mid,
                        const char *model, int64_t session, uint64_t *ret_session) {
  if (!c) return KVD_EINVAL;
  int rc;
  struct kvd__req *req = kvd__begin(c, method, mid, KVD__REQ_CALL, true, &rc);
  if (!req) return rc;
  ipc_w_map_open(&c->w);
  if (model) ipc_w_kv_cstr(&c->w, "model", model);
  if (session >= 0) ipc_w_kv_u64(&c->w, "session", (uint64_t)session);
  ipc_w_close(&c->w);
  struct ipc_msg *m;
  rc = kvd__call(c, req, &m);
  if (rc < 0) return rc;
  uint64_t id = 0;
  ipc_get_u64(m->result, "session", &id, NULL);
  ipc_msg_free(m);
  if (id > INT64_MAX) return kvd__error(c, KVD_EPROTO, "%s: session id out of range", method);
  if (ret_session) *ret_session = id;
  return 0;
}

int kvd_session_open(struct kvd_client *c, const char *model, uint64_t *ret_session) {
  return session_call(c, "session.open", IPC_M_SESSION_OPEN, model, -1, ret_session);
}

int kvd_session_close(struct kvd_client *c, uint64_t session) {
  if (session > INT64_MAX) return c ? kvd__error(c, KVD_ERANGE, "no such session") : KVD_EINVAL;
  return session_call(c, "session.close", IPC_M_SESSION_CLOSE, NULL, (int64_t)session, NULL);
}

int kvd_session_fork(struct kvd_client *c, uint64_t session, uint64_t *ret_session) {
  if (session > INT64_MAX) return c ? kvd__error(c, KVD_ERANGE, "no such session") : KVD_EINVAL;
  return session_call(c, "session.fork", IPC_M_SESSION_FORK, NULL, (int64_t)session, ret_session);
}

/* A saved-session method: {session?, name, model?}, answering {session?, tokens?}. */
static int store_call(struct kvd_client *c, const char *method, enum ipc_method mid,
                      int64_t session, const char *name, const char *model, uint64_t *ret_session,
                      uint64_t *ret_tokens) {
  if (!c) return KVD_EINVAL;
  if (!name) return kvd__error(c, KVD_EINVAL, "%s: a name is required", method);
  int rc;
  struct kvd__req *req = kvd__begin(c, method, mid, KVD__REQ_CALL, true, &rc);
  if (!req) return rc;
  ipc_w_map_open(&c->w);
  if (session >= 0) ipc_w_kv_u64(&c->w, "session", (uint64_t)session);
  ipc_w_kv_cstr(&c->w, "name", name);
  if (model) ipc_w_kv_cstr(&c->w, "model", model);
  ipc_w_close(&c->w);
  struct ipc_msg *m;
  rc = kvd__call(c, req, &m);
  if (rc < 0) return rc;
  uint64_t id = 0, tokens = 0;
  ipc_get_u64(m->result, "session", &id, NULL);
  ipc_get_u64(m->result, "tokens", &tokens, NULL);
  ipc_msg_free(m);
  if (id > INT64_MAX) return kvd__error(c, KVD_EPROTO, "%s: session id out of range", method);
  if (ret_session) *ret_session = id;
  if (ret_tokens) *ret_tokens = tokens;
  return 0;
}

int kvd_session_save(struct kvd_client *c, uint64_t session, const char *name,
                     uint64_t *ret_tokens) {
  if (session > INT64_MAX) return c ? kvd__error(c, KVD_ERANGE, "no such session") : KVD_EINVAL;
  return store_call(c, "session.save", IPC_M_SESSION_SAVE, (int64_t)session, name, NULL, NULL,
                    ret_tokens);
}

int kvd_session_restore(struct kvd_client *c, const char *name, const char *model,
                        uint64_t *ret_session, uint64_t *ret_tokens) {
  return store_call(c, "session.restore", IPC_M_SESSION_RESTORE, -1, name, model, ret_session,
                    ret_tokens);
}

int kvd_session_delete(struct kvd_client *c, const char *name) {
  return store_call(c, "session.delete", IPC_M_SESSION_DELETE, -1, name, NULL, NULL, NULL);
}

void kvd_saved_list_free(struct kvd_saved_list *l) {
  if (!l) return;
  for (size_t i = 0; i < l->n; i++) {
    free(l->sessions[i].name);
    free(l->sessions[i].model);
    free(l->sessions[i].kv_type);
  }
  free(l->sessions);
  free(l);
}

int kvd_sessions_list(struct kvd_client *c, struct kvd_saved_list **ret) {
  if (!c) return KVD_EINVAL;
  if (!ret) return kvd__error(c, KVD_EINVAL, "kvd_sessions_list: ret is NULL");
  int rc;
  struct kvd__req *req =
      kvd__begin(c, "session.list", IPC_M_SESSION_LIST, KVD__REQ_CALL, true, &rc);
  if (!req) return rc;
  ipc_w_map(&c->w, 0);
  struct ipc_msg *m;
  rc = kvd__call(c, req, &m);
  if (rc < 0) return rc;
  const msgpack_object *items = NULL;
  size_t n = 0;
  ipc_get_maps(m->result, "sessions", &items, &n, NULL);
  struct kvd_saved_list *l = calloc(1, sizeof *l);
  if (l && n) l->sessions = calloc(n, sizeof *l->sessions);
  rc = l && (!n || l->sessions) ? 0 : KVD_ENOMEM;
  for (size_t i = 0; rc == 0 && i < n; i++) {
    struct kvd_saved_session *s = &l->sessions[i];
    l->n = i + 1;
    rc = dup_key(&items[i], "name", &s->name);
    if (rc == 0) rc = dup_key(&items[i], "model", &s->model);
    if (rc == 0) rc = dup_key(&items[i], "kv_type", &s->kv_type);
    ipc_get_u64(&items[i], "tokens", &s->tokens, NULL);
    ipc_get_u64(&items[i], "bytes", &s->bytes, NULL);
    ipc_get_u64(&items[i], "saved", &s->saved, NULL);
    ipc_get_bool(&items[i], "loadable", &s->loadable, NULL);
  }
  ipc_msg_free(m);
  if (rc < 0) {
    kvd_saved_list_free(l);
    return kvd__error(c, KVD_ENOMEM, "out of memory");
  }
  *ret = l;
  return 0;
}

/* ---- Status ------------------------------------------------------------------------------ */

void kvd_server_status_free(struct kvd_server_status *s) {
  if (!s) return;
  free(s->version);
  for (size_t i = 0; i < s->n_devices; i++) {
    free(s->devices[i].name);
    free(s->devices[i].type);
  }
  free(s->devices);
  for (size_t i = 0; i < s->n_models; i++)
    kvd__model_info_clear(&s->models[i]);
  free(s->models);
  for (size_t i = 0; i < s->n_requests; i++) {
    free(s->requests[i].model);
    free(s->requests[i].state);
  }
  free(s->requests);
  free(s->json);
  free(s);
}

/* Fills s from status's result map; 0 or KVD_ENOMEM (s is then freed by the caller). */
static int parse_status(const msgpack_object *res, struct kvd_server_status *s) {
  struct ipc_err err;
  const msgpack_object *map, *items;
  size_t n;
  if (dup_key(res, "version", &s->version) < 0) return KVD_ENOMEM;
  ipc_get_u64(res, "uptime_ms", &s->uptime_ms, &err);
  ipc_get_u64(res, "connections", &s->connections, &err);
  ipc_get_u64(res, "queue_depth", &s->queue_depth, &err);
  ipc_get_u64(res, "running", &s->running, &err);
  if (ipc_get_map(res, "memory", &map, &err) == 1) {
    ipc_get_u64(map, "host", &s->memory.host, &err);
    ipc_get_u64(map, "device", &s->memory.device, &err);
    ipc_get_u64(map, "weights", &s->memory.weights, &err);
    ipc_get_u64(map, "kv", &s->memory.kv, &err);
  }
  if (ipc_get_map(res, "kv", &map, &err) == 1) {
    ipc_get_u64(map, "block_tokens", &s->kv.block_tokens, &err);
    ipc_get_u64(map, "blocks_total", &s->kv.blocks_total, &err);
    ipc_get_u64(map, "blocks_used", &s->kv.blocks_used, &err);
    ipc_get_u64(map, "blocks_free", &s->kv.blocks_free, &err);
    ipc_get_u64(map, "blocks_cached", &s->kv.blocks_cached, &err);
  }
  if (ipc_get_maps(res, "devices", &items, &n, &err) == 1 && n) {
    if (!(s->devices = calloc(n, sizeof *s->devices))) return KVD_ENOMEM;
    s->n_devices = n; /* zeroed, so kvd_server_status_free copes with a half-filled array */
    for (size_t i = 0; i < n; i++) {
      struct kvd_device_info *d = &s->devices[i];
      ipc_get_u64(&items[i], "index", &d->index, &err);
      ipc_get_u64(&items[i], "memory_total", &d->memory_total, &err);
      ipc_get_u64(&items[i], "memory_used", &d->memory_used, &err);
      if (dup_key(&items[i], "name", &d->name) < 0 || dup_key(&items[i], "type", &d->type) < 0)
        return KVD_ENOMEM;
    }
  }
  if (ipc_get_maps(res, "models", &items, &n, &err) == 1 && n) {
    if (model_array(items, n, &s->models) < 0) return KVD_ENOMEM;
    s->n_models = n;
  }
  if (ipc_get_maps(res, "requests", &items, &n, &err) == 1 && n) {
    if (!(s->requests = calloc(n, sizeof *s->requests))) return KVD_ENOMEM;
    s->n_requests = n;
    for (size_t i = 0; i < n; i++) {
      struct kvd_request_info *q = &s->requests[i];
      ipc_get_u32(&items[i], "id", &q->id, &err);
      ipc_get_u64(&items[i], "prompt_tokens", &q->prompt_tokens, &err);
      ipc_get_u64(&items[i], "completion_tokens", &q->completion_tokens, &err);
      ipc_get_u64(&items[i], "cached_tokens", &q->cached_tokens, &err);
      ipc_get_f64(&items[i], "queue_ms", &q->queue_ms, &err);
      ipc_get_f64(&items[i], "prefill_ms", &q->prefill_ms, &err);
      ipc_get_f64(&items[i], "decode_ms", &q->decode_ms, &err);
      ipc_get_f64(&items[i], "tokens_per_s", &q->tokens_per_s, &err);
      if (dup_key(&items[i], "model", &q->model) < 0 || dup_key(&items[i], "state", &q->state) < 0)
        return KVD_ENOMEM;
    }
  }
  struct kvd__buf b = {0};
  kvd__json(&b, res);
  s->json = kvd__buf_steal(&b, NULL);
  return s->json ? 0 : KVD_ENOMEM;
}

int kvd_status(struct kvd_client *c, struct kvd_server_status **ret) {
  if (!c) return KVD_EINVAL;
  if (!ret) return kvd__error(c, KVD_EINVAL, "kvd_status: ret is NULL");
  int rc;
  struct kvd__req *req = kvd__begin(c, "status", IPC_M_STATUS, KVD__REQ_CALL, true, &rc);
  if (!req) return rc;
  ipc_w_map(&c->w, 0);
  struct ipc_msg *m;
  rc = kvd__call(c, req, &m);
  if (rc < 0) return rc;
  struct kvd_server_status *s = calloc(1, sizeof *s);
  rc = s ? parse_status(m->result, s) : KVD_ENOMEM;
  ipc_msg_free(m);
  if (rc < 0) {
    kvd_server_status_free(s);
    return kvd__error(c, rc, "out of memory");
  }
  *ret = s;
  return 0;
}
