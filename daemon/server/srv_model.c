/* Loaded models: file, tokenizer, chat template, engine and scheduler, and the uv_async through
 * which their engine thread wakes the loop. */
#include "srv.h"
#include "store.h"

#include "kvd_error.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The engine events of one model: drained in one go however many sends coalesced. */
static void model_on_async(uv_async_t *a) {
  struct srv_model *m = a->data;
  struct sched_event ev[64];
  uint32_t n;
  /* The last request's end may free the model (an unload, or the drain at exit): m->sched is
   * NULL from then on and nothing of it is left to drain. */
  while (m->sched && (n = sched_drain(m->sched, ev, 64)) > 0)
    for (uint32_t i = 0; i < n && m->sched; i++)
      srv_gen_event(m, &ev[i]);
}

static void model_notify(void *ud) {
  struct srv_model *m = ud;
  uv_async_send(&m->async);
}

static void model_free_now(struct srv_model *m);

static void model_on_close(uv_handle_t *h) {
  struct srv_model *m = h->data;
  struct srv *s = m->srv;
  free(m);
  srv_maybe_finish(s);
}

static void model_free_now(struct srv_model *m) {
  sched_free(m->sched); /* joins the engine thread and frees the engine */
  m->sched = NULL;
  tok_free(m->tok);
  gguf_close(m->f);
  gguf_close(m->draft_f); /* after sched_free, which freed the draft engine reading it */
  free(m->path);
  free(m->draft_path);
  if (m->async_open)
    uv_close((uv_handle_t *)&m->async, model_on_close);
  else
    free(m);
}

/* The slow part, safe off the loop thread: file, tokenizer, weights upload, KV pool, and the
 * draft model's when m has one (*ret_draft, else NULL). On failure neither engine is left. */
static int model_open(struct srv *s, struct srv_model *m, const char *path, struct engine **ret,
                      struct engine **ret_draft, char *err, size_t errlen) {
  *ret_draft = NULL;
  const struct kvd_config *cfg = s->cfg;
  struct gguf_error gerr = {0};
  int rc = gguf_open(path, &m->f, &gerr);
  if (rc < 0) {
    snprintf(err, errlen, "%s: %s (offset %llu)", path, gerr.msg, (unsigned long long)gerr.offset);
    return rc;
  }
  /* Saved sessions name the model by content, not by path or name. */
  store_model_hash(m->f->base, m->f->size, m->hash);
  char terr[160] = "";
  rc = tok_new(m->f, &m->tok, terr, sizeof terr);
  if (rc < 0) {
    snprintf(err, errlen, "%s: tokenizer: %s", path, terr);
    return rc;
  }
  if (m->chat_forced)
    m->chat_source = CHAT_SRC_OVERRIDE;
  else
    m->chat = chat_detect(m->f, &m->chat_source);
  uint64_t kv_bytes = 0;
  double kv_frac = 0;
  config_parse_budget(cfg->kv_budget, &kv_bytes, &kv_frac);
  enum kv_type kvt;
  const char *kvt_name = m->kv_type ? m->kv_type : cfg->kv_type ? cfg->kv_type : "f16";
  if (kv_type_parse(kvt_name, &kvt) < 0) {
    snprintf(err, errlen, "KV type '%.16s' is not one of f32, f16, q8_0, q4_0", kvt_name);
    return KVD_EINVAL;
  }
  if (!m->overflow_set &&
      kv_overflow_parse(cfg->overflow ? cfg->overflow : "shift", &m->overflow) < 0)
    m->overflow = KV_OVERFLOW_SHIFT; /* config_load checked it */
  struct engine_opts eo = {
      .kv_type = kvt,
      .block_size = (uint32_t)cfg->block_size,
      .kv_bytes = kv_bytes,
      .kv_fraction = kv_frac,
      .max_step_tokens = (uint32_t)cfg->step_tokens,
      /* A row per running request, and rows for the drafts a step verifies (each drafted token
       * takes one); the scheduler fits its drafts into what is left. */
      .max_logits = (uint32_t)cfg->max_seqs + 4 * SCHED_SPEC_MAX,
  };
  struct model_error merr = {{0}};
  struct engine *e = NULL;
  rc = engine_new(s->device.dev, m->f, &eo, &e, &merr);
  if (rc < 0) {
    snprintf(err, errlen, "%s: %s", path, merr.msg[0] ? merr.msg : kvd_strerror(rc));
    return rc;
  }
  /* A model asked for with a draft loads with it or not at all. */
  if (m->draft_path && (rc = srv_draft_open(s, m, e, ret_draft, err, errlen)) < 0) {
    engine_free(e);
    return rc;
  }
  *ret = e;
  return 0;
}

void srv_model_default_name(const char *path, char *out, size_t n) {
  const char *base = strrchr(path, '/');
  base = base ? base + 1 : path;
  snprintf(out, n, "%s", base);
  size_t len = strlen(out);
  if (len > 5 && strcmp(out + len - 5, ".gguf") == 0) out[len - 5] = '\0';
}

/* The host-RAM tier's bytes per model: --kv-host as bytes, or a share of physical memory. */
static uint64_t srv_host_budget(const struct kvd_config *cfg) {
  uint64_t bytes = 0;
  double frac = 0;
  if (!cfg->kv_host || config_parse_budget(cfg->kv_host, &bytes, &frac) < 0) return 0;
  if (frac > 0) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    bytes = pages > 0 && page > 0 ? (uint64_t)((double)pages * (double)page * frac) : 0;
  }
  return bytes;
}

/* The prefix cache's disk tier for this model: a folder named by everything its blocks depend on
 * (the file's content hash, KV type, block size, bytes per block), so another model's or KV
 * type's blocks are never looked at. NULL when off or when it cannot be opened (logged). */
static struct tier_disk *srv_open_disk_tier(const struct kvd_config *cfg, const struct srv_model *m,
                                            const struct engine *e) {
  uint64_t bytes = 0;
  double frac = 0;
  if (!cfg->kv_disk || !cfg->kv_disk_dir || config_parse_budget(cfg->kv_disk, &bytes, &frac) < 0 ||
      bytes == 0)
    return NULL;
  struct kv_pool_stats kv;
  engine_kv_stats(e, &kv);
  char id[128];
  snprintf(id, sizeof id, "%016llx%016llx-%s-b%u-%llu", (unsigned long long)m->hash[1],
           (unsigned long long)m->hash[0], kv_type_name(engine_kv_type(e)), kv.block_size,
           (unsigned long long)engine_kv_block_bytes(e));
  struct tier_disk *t = NULL;
  int rc = tier_disk_open(cfg->kv_disk_dir, id, engine_kv_block_bytes(e), bytes, &t);
  if (rc < 0) {
    log_warn("model %s: no disk tier in %s: %s", m->name, cfg->kv_disk_dir, kvd_strerror(rc));
    return NULL;
  }
  struct tier_disk_stats st;
  tier_disk_stats(t, &st);
  log_info("model %s: disk tier %s/%s, %llu blocks from before", m->name, cfg->kv_disk_dir, id,
           (unsigned long long)st.blocks);
  return t;
}

/* Loop thread: the async handle and the engine thread (which takes e and draft over), then the
 * model is visible to clients. On failure both engines are freed. */
static int model_start(struct srv *s, struct srv_model *m, struct engine *e, struct engine *draft,
                       char *err, size_t errlen) {
  int rc = uv_async_init(s->loop, &m->async, model_on_async);
  if (rc < 0) {
    engine_free(draft);
    engine_free(e);
    snprintf(err, errlen, "uv_async_init: %s", uv_strerror(rc));
    return KVD_EIO;
  }
  m->async.data = m;
  m->async_open = true;
  struct sched_opts so = {.step_tokens = (uint32_t)s->cfg->step_tokens,
                          .max_running = (uint32_t)s->cfg->max_seqs,
                          .notify = model_notify,
                          .notify_ud = m,
                          .host_bytes = srv_host_budget(s->cfg),
                          .disk = srv_open_disk_tier(s->cfg, m, e),
                          .draft = draft};
  rc = sched_new(e, &so, &m->sched);
  if (rc < 0) { /* a failed sched_new took neither engine */
    engine_free(draft);
    engine_free(e);
    snprintf(err, errlen, "starting the engine thread: %s", kvd_strerror(rc));
    return rc;
  }
  /* Appended: the first model loaded stays the default (api.json, models.load). */
  struct srv_model **tail = &s->models;
  while (*tail)
    tail = &(*tail)->next;
  m->next = NULL;
  *tail = m;
  const struct model_hparams *hp = engine_hparams(e);
  log_info("model %s loaded: %s, %u layers, dim %u, vocab %u, chat template %s (%s)", m->name,
           model_arch_name(hp->arch), hp->n_layer, hp->n_embd, hp->n_vocab,
           chat_family_name(m->chat), chat_source_name(m->chat_source));
  if (draft) log_info("model %s drafts with %s (%s)", m->name, m->draft_name, m->draft_path);
  return 0;
}

/* The configured family, if any, onto m. KVD_EINVAL for a name that is not one. */
static int model_force_chat(struct srv_model *m, const char *chat_template) {
  if (!chat_template || !*chat_template) return 0;
  if (chat_family_parse(chat_template, &m->chat) < 0) return KVD_EINVAL;
  m->chat_forced = true;
  return 0;
}

int srv_model_load(struct srv *s, const char *path, const char *name, const char *chat_template,
                   const char *draft, struct srv_model **ret, char *err, size_t errlen) {
  struct srv_model *m = calloc(1, sizeof *m);
  if (!m) return KVD_ENOMEM;
  if (model_force_chat(m, chat_template) < 0) {
    snprintf(err, errlen, "chat template '%.40s' is not one of %s", chat_template,
             chat_family_list());
    free(m);
    return KVD_EINVAL;
  }
  m->srv = s;
  m->path = strdup(path);
  m->draft_path = draft && *draft ? strdup(draft) : NULL;
  if (name && *name)
    snprintf(m->name, sizeof m->name, "%s", name);
  else
    srv_model_default_name(path, m->name, sizeof m->name);
  if (srv_model_find(s, m->name, strlen(m->name))) {
    snprintf(err, errlen, "a model named %s is already loaded", m->name);
    free(m->path);
    free(m->draft_path);
    free(m);
    return KVD_EEXIST;
  }
  struct engine *e = NULL, *de = NULL;
  bool copied = m->path && (!draft || !*draft || m->draft_path);
  int rc = copied ? model_open(s, m, path, &e, &de, err, errlen) : KVD_ENOMEM;
  if (rc == 0) rc = model_start(s, m, e, de, err, errlen);
  if (rc < 0) {
    model_free_now(m);
    return rc;
  }
  *ret = m;
  return 0;
}

struct srv_model *srv_model_find(struct srv *s, const char *name, size_t len) {
  if (!name) return s->models; /* the default: the first loaded that is still there */
  for (struct srv_model *m = s->models; m; m = m->next)
    if (strlen(m->name) == len && memcmp(m->name, name, len) == 0) return m;
  return NULL;
}

void srv_model_unload(struct srv_model *m) {
  struct srv *s = m->srv;
  for (struct srv_model **p = &s->models; *p; p = &(*p)->next)
    if (*p == m) {
      *p = m->next;
      break;
    }
  m->unloading = true;
  /* Running generations end as cancelled; the model goes when the last one has. */
  srv_gen_cancel_model(s, m);
  if (m->n_active == 0) model_free_now(m);
}

void srv_model_release(struct srv_model *m) {
  if (m->n_active) m->n_active--;
  if (m->unloading && m->n_active == 0) model_free_now(m);
}

void srv_models_free(struct srv *s) {
  while (s->models) {
    struct srv_model *m = s->models;
    s->models = m->next;
    m->unloading = true;
    model_free_now(m);
  }
}

/* ---- models.load on the threadpool ---- */

struct load_work {
  uv_work_t req;
  struct srv *srv;
  uint64_t conn_serial; /* the connection may be gone when the load finishes */
  uint32_t id;
  struct srv_model *m;
  struct engine *e, *draft;
  int rc;
  char err[256];
};

static void load_work_cb(uv_work_t *req) {
  struct load_work *w = req->data;
  w->rc = model_open(w->srv, w->m, w->m->path, &w->e, &w->draft, w->err, sizeof w->err);
}

static void load_after_cb(uv_work_t *req, int status) {
  struct load_work *w = req->data;
  struct srv *s = w->srv;
  if (status < 0 && w->rc == 0) w->rc = KVD_ECANCELED;
  if (w->rc == 0 && srv_model_find(s, w->m->name, strlen(w->m->name))) {
    w->rc = KVD_EEXIST;
    snprintf(w->err, sizeof w->err, "a model named %s is already loaded", w->m->name);
  }
  if (w->rc == 0) {
    w->rc = model_start(s, w->m, w->e, w->draft, w->err, sizeof w->err);
  } else {
    engine_free(w->draft);
    engine_free(w->e);
  }
  struct srv_conn *c = srv_conn_find(s, w->conn_serial);
  if (w->rc < 0) {
    log_warn("models.load: %s", w->err);
    model_free_now(w->m);
    if (c) srv_reply_error(c, w->id, w->rc, "%s", w->err);
  } else if (c) {
    const struct model_hparams *hp = engine_hparams(sched_engine(w->m->sched));
    ipc_w_result(&c->w, w->id);
    ipc_w_map_open(&c->w);
    ipc_w_kv_cstr(&c->w, "name", w->m->name);
    ipc_w_kv_cstr(&c->w, "arch", model_arch_name(hp->arch));
    ipc_w_kv_u64(&c->w, "n_ctx", hp->n_ctx_train);
    ipc_w_kv_u64(&c->w, "n_vocab", hp->n_vocab);
    ipc_w_kv_cstr(&c->w, "chat_template", chat_family_name(w->m->chat));
    ipc_w_kv_cstr(&c->w, "kv_type", kv_type_name(engine_kv_type(sched_engine(w->m->sched))));
    ipc_w_kv_cstr(&c->w, "overflow", kv_overflow_name(w->m->overflow));
    ipc_w_kv_u64(&c->w, "kv_bytes_per_token", engine_kv_bytes_per_token(sched_engine(w->m->sched)));
    if (w->m->draft_f) ipc_w_kv_cstr(&c->w, "draft_model", w->m->draft_name);
    ipc_w_close(&c->w);
    ipc_w_end(&c->w);
    srv_reply_done(c, w->id);
  }
  free(w);
  srv_maybe_finish(s);
}

void srv_model_load_async(struct srv_conn *c, uint32_t id, const struct srv_load_args *a) {
  struct load_work *w = calloc(1, sizeof *w);
  struct srv_model *m = w ? calloc(1, sizeof *m) : NULL;
  if (!m) {
    free(w);
    srv_reply_error(c, id, KVD_ENOMEM, NULL);
    return;
  }
  if (model_force_chat(m, a->chat_template) < 0) { /* checked by the handler already */
    free(m);
    free(w);
    srv_reply_error(c, id, KVD_EINVAL, NULL);
    return;
  }
  m->srv = c->srv;
  m->path = strdup(a->path);
  m->draft_path = a->draft ? strdup(a->draft) : NULL;
  /* A static name: the handler checked it is one of them. */
  enum kv_type kvt;
  if (a->kv_type && kv_type_parse(a->kv_type, &kvt) == 0) m->kv_type = kv_type_name(kvt);
  m->overflow_set = a->overflow && kv_overflow_parse(a->overflow, &m->overflow) == 0;
  if (a->name && *a->name)
    snprintf(m->name, sizeof m->name, "%s", a->name);
  else
    srv_model_default_name(a->path, m->name, sizeof m->name);
  w->req.data = w;
  w->srv = c->srv;
  w->conn_serial = c->serial;
  w->id = id;
  w->m = m;
  if (!m->path || (a->draft && !m->draft_path) ||
      uv_queue_work(c->srv->loop, &w->req, load_work_cb, load_after_cb) < 0) {
    model_free_now(m);
    free(w);
    srv_reply_error(c, id, KVD_ENOMEM, NULL);
  }
}

/* ---- the models.load and models.unload handlers ---- */

void srv_h_models_load(struct srv_conn *c, const struct ipc_msg *msg) {
  struct ipc_err e = {0};
  const char *path = NULL, *name = NULL, *tmpl = NULL, *kvt = NULL, *ov = NULL, *draft = NULL;
  size_t plen, nlen, tlen, klen, olen, dlen;
  if (ipc_get_str(msg->params, "path", &path, &plen, &e) < 0 ||
      ipc_get_str(msg->params, "name", &name, &nlen, &e) < 0 ||
      ipc_get_str(msg->params, "chat_template", &tmpl, &tlen, &e) < 0 ||
      ipc_get_str(msg->params, "kv_type", &kvt, &klen, &e) < 0 ||
      ipc_get_str(msg->params, "overflow", &ov, &olen, &e) < 0 ||
      ipc_get_str(msg->params, "draft", &draft, &dlen, &e) < 0) {
    srv_reply_error(c, msg->id, e.code, "%s", e.message);
    return;
  }
  enum chat_family fam;
  if (tmpl && (strlen(tmpl) != tlen || chat_family_parse(tmpl, &fam) < 0)) {
    /* The client's string is not echoed: it names one of the families or it is wrong. */
    srv_reply_error(c, msg->id, KVD_EINVAL, "chat_template must be one of %s", chat_family_list());
    return;
  }
  if (name && nlen > IPC_MAX_NAME_BYTES) {
    srv_reply_error(c, msg->id, KVD_E2BIG, "model names are at most %d bytes", IPC_MAX_NAME_BYTES);
    return;
  }
  /* The daemon opens the file with its own rights for whoever asks, so only what a path can
   * name unambiguously: absolute (no dependence on kvd's working directory). gguf_open then
   * refuses anything but a regular file, without blocking. Strings from the decoder are
   * NUL-terminated; one with a NUL inside is not the path it looks like. */
  if (path[0] != '/' || strlen(path) != plen) {
    srv_reply_error(c, msg->id, KVD_EINVAL, "path must be an absolute path to a GGUF file");
    return;
  }
  if (draft && (draft[0] != '/' || strlen(draft) != dlen)) { /* the same rule, the same reasons */
    srv_reply_error(c, msg->id, KVD_EINVAL, "draft must be an absolute path to a GGUF file");
    return;
  }
  enum kv_type kt;
  if (kvt && (strlen(kvt) != klen || kv_type_parse(kvt, &kt) < 0)) {
    srv_reply_error(c, msg->id, KVD_EINVAL, "kv_type must be one of f32, f16, q8_0, q4_0");
    return;
  }
  enum kv_overflow ovp;
  if (ov && (strlen(ov) != olen || kv_overflow_parse(ov, &ovp) < 0)) {
    srv_reply_error(c, msg->id, KVD_EINVAL, "overflow must be shift, window or error");
    return;
  }
  srv_model_load_async(c, msg->id,
                       &(struct srv_load_args){.path = path,
                                               .name = name,
                                               .chat_template = tmpl,
                                               .kv_type = kvt,
                                               .overflow = ov,
                                               .draft = draft});
}

void srv_h_models_unload(struct srv_conn *c, const struct ipc_msg *msg) {
  struct ipc_err e = {0};
  const char *name;
  size_t len;
  if (ipc_get_str(msg->params, "name", &name, &len, &e) != 1) {
    srv_reply_error(c, msg->id, e.code ? e.code : KVD_EINVAL, "%s", e.message);
    return;
  }
  struct srv_model *m = srv_model_find(c->srv, name, len);
  if (!m) {
    srv_reply_error(c, msg->id, KVD_E_NO_MODEL, "no model named %.*s is loaded", (int)len, name);
    return;
  }
  /* Unloading never takes work away from anyone: a model with requests in flight or sessions
   * open stays until they are done (each owner ends its own). */
  uint32_t n_sessions = 0;
  for (struct srv_conn *o = c->srv->conns; o; o = o->next)
    for (struct srv_session *ss = o->sessions; ss; ss = ss->next)
      n_sessions += ss->m == m && !ss->closing;
  if (m->n_active || n_sessions) {
    srv_reply_error(c, msg->id, KVD_EBUSY,
                    "model %s is in use (%u requests or sessions); try again when they end",
                    m->name, m->n_active > n_sessions ? m->n_active : n_sessions);
    return;
  }
  log_info("unloading model %s", m->name);
  ipc_w_result(&c->w, msg->id);
  ipc_w_map(&c->w, 1);
  ipc_w_kv_str(&c->w, "name", name, len);
  ipc_w_end(&c->w);
  srv_model_unload(m);
  srv_reply_done(c, msg->id);
}
