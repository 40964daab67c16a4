/* session.save, session.restore, session.list, session.delete: sessions written to and read back
 * from files (store.h) in the sessions folder (--sessions-dir). The KV copy is taken on the engine
 * thread between steps (a snapshot request); files are written and read on libuv's threadpool,
 * never on the loop thread. */
#include "srv.h"

#include "kvd_error.h"
#include "log.h"
#include "store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Most entries session.list returns (a folder is listed in name order). */
#define SRV_MAX_SESSION_FILES 1024

struct store_work {
  uv_work_t work;
  struct srv *srv;
  uint64_t serial; /* the connection, found again when the work is done */
  uint32_t msgid;
  struct srv_model *m;    /* referenced (n_active) until the work is done */
  struct srv_session *ss; /* save: the session, busy until the file is written */
  char name[STORE_NAME_MAX + 1];
  struct store_identity id;
  uint32_t n_vocab;
  struct store_session st;
  struct sched_req *req; /* save: the snapshot request */
  int rc;
  uint64_t bytes;
  double t0;
  char err[160];
};

static const char *store_dir(struct srv_conn *c, uint32_t msgid) {
  const char *d = c->srv->cfg->sessions_dir;
  if (!d) srv_reply_error(c, msgid, KVD_ENOTSUP, "no sessions folder (give --sessions-dir)");
  return d;
}

/* The "name" param, checked: a file name in the sessions folder, nothing more. */
static bool store_name_param(struct srv_conn *c, const struct ipc_msg *msg, char *out) {
  struct ipc_err e = {0};
  const char *s;
  size_t len;
  if (ipc_get_str(msg->params, "name", &s, &len, &e) != 1) {
    srv_reply_error(c, msg->id, e.code ? e.code : KVD_EINVAL, "%s",
                    e.code ? e.message : "name is required");
    return false;
  }
  if (store_name_check(s, len) < 0) {
    srv_reply_error(c, msg->id, KVD_EINVAL,
                    "a session name is 1 to %d of A-Z a-z 0-9 . _ - and does not start with '.'",
                    STORE_NAME_MAX);
    return false;
  }
  memcpy(out, s, len);
  out[len] = 0;
  return true;
}

void srv_store_identity(const struct srv_model *m, struct store_identity *ret) {
  const struct engine *e = sched_engine(m->sched);
  struct kv_pool_stats kv;
  engine_kv_stats(e, &kv);
  memset(ret, 0, sizeof *ret);
  ret->model_hash[0] = m->hash[0];
  ret->model_hash[1] = m->hash[1];
  ret->kv_type = (uint32_t)engine_kv_type(e);
  ret->block_size = kv.block_size;
  ret->block_bytes = engine_kv_block_bytes(e);
}

static void store_work_free(struct store_work *w) {
  sched_snapshot_clear(&w->st.snap);
  if (w->req) {
    w->req->snapshot = NULL;
    sched_req_free(w->req);
  }
  if (w->m) srv_model_release(w->m);
  free(w);
}

/* ---- session.save ---- */

static void save_work_cb(uv_work_t *req) {
  struct store_work *w = req->data;
  w->rc = store_session_write(w->srv->cfg->sessions_dir, w->name, &w->st, &w->bytes);
}

static void save_after_cb(uv_work_t *req, int status) {
  struct store_work *w = req->data;
  struct srv *s = w->srv;
  struct srv_session *ss = w->ss;
  ss->busy = false;
  if (ss->closing) srv_session_release(ss);
  struct srv_conn *c = srv_conn_find(s, w->serial);
  int rc = status < 0 ? KVD_ECANCELED : w->rc;
  if (rc < 0)
    log_warn("session.save %s: %s", w->name, kvd_strerror(rc));
  else
    log_info("session %s saved: %u tokens, %llu bytes", w->name, w->st.snap.n_hist,
             (unsigned long long)w->bytes);
  if (c && rc < 0) {
    srv_reply_error(c, w->msgid, rc, "writing the session file: %s", kvd_strerror(rc));
  } else if (c) {
    ipc_w_result(&c->w, w->msgid);
    ipc_w_map(&c->w, 5);
    ipc_w_kv_cstr(&c->w, "name", w->name);
    ipc_w_kv_u64(&c->w, "tokens", w->st.snap.n_hist + (w->st.snap.pending >= 0 ? 1u : 0u));
    ipc_w_kv_u64(&c->w, "kv_bytes", (uint64_t)w->st.snap.kv.n_blocks * w->st.snap.kv.block_bytes);
    ipc_w_kv_u64(&c->w, "bytes", w->bytes);
    ipc_w_kv_f64(&c->w, "ms", (srv_now() - w->t0) * 1e3);
    if (ipc_w_end(&c->w) < 0)
      srv_reply_error(c, w->msgid, KVD_ENOMEM, NULL);
    else
      srv_reply_done(c, w->msgid);
  }
  store_work_free(w);
  srv_maybe_finish(s);
}

/* The engine thread answered the snapshot request: the copy is in w->st.snap. */
void srv_store_event(struct srv_model *m, const struct sched_event *ev) {
  (void)m;
  struct store_work *w = ev->req->ud;
  if (!ev->done) return;
  int rc = ev->finish == SCHED_FINISH_ERROR ? ev->error : 0;
  sched_req_free(w->req);
  w->req = NULL;
  if (rc == 0) rc = uv_queue_work(w->srv->loop, &w->work, save_work_cb, save_after_cb);
  if (rc == 0) return;
  w->rc = rc < 0 && rc > -1000 && rc != KVD_EBUSY && rc != KVD_ENOMEM ? KVD_EIO : rc;
  save_after_cb(&w->work, 0);
}

void srv_h_session_save(struct srv_conn *c, const struct ipc_msg *msg) {
  struct ipc_err e = {0};
  uint32_t id;
  if (ipc_get_u32(msg->params, "session", &id, &e) != 1) {
    srv_reply_error(c, msg->id, e.code ? e.code : KVD_EINVAL, "%s", e.message);
    return;
  }
  struct srv_session *ss = NULL;
  for (struct srv_session *s = c->sessions; s; s = s->next)
    if (s->id == id && !s->closing) ss = s;
  if (!ss) {
    srv_reply_error(c, msg->id, KVD_ENOENT, "no session %u on this connection", id);
    return;
  }
  char name[STORE_NAME_MAX + 1];
  if (!store_name_param(c, msg, name) || !store_dir(c, msg->id)) return;
  if (ss->busy) {
    srv_reply_error(c, msg->id, KVD_EBUSY, "session %u is generating", ss->id);
    return;
  }
  struct store_work *w = calloc(1, sizeof *w);
  if (!w || sched_req_new(NULL, 0, &w->req) < 0) {
    free(w);
    srv_reply_error(c, msg->id, KVD_ENOMEM, NULL);
    return;
  }
  w->work.data = w;
  w->srv = c->srv;
  w->serial = c->serial;
  w->msgid = msg->id;
  w->ss = ss;
  w->t0 = srv_now();
  memcpy(w->name, name, sizeof name);
  srv_store_identity(ss->m, &w->st.id);
  snprintf(w->st.model_name, sizeof w->st.model_name, "%s", ss->m->name);
  w->st.keep = ss->keep;
  w->st.keep_set = ss->keep_set;
  w->st.started = ss->started;
  w->st.saved = (uint64_t)time(NULL);
  w->st.snap.pending = -1;
  w->req->session = ss->ss;
  w->req->snapshot = &w->st.snap;
  w->req->ud = w;
  if (sched_submit(ss->m->sched, w->req) < 0) {
    sched_req_free(w->req);
    free(w);
    srv_reply_error(c, msg->id, KVD_ENOMEM, NULL);
    return;
  }
  ss->busy = true; /* no generate (or close) runs on it until the file is written */
  w->m = ss->m;
  w->m->n_active++;
}

/* ---- session.restore ---- */

static void restore_work_cb(uv_work_t *req) {
  struct store_work *w = req->data;
  w->rc = store_session_read(w->srv->cfg->sessions_dir, w->name, &w->id, w->n_vocab, &w->st, w->err,
                             sizeof w->err);
}

static void restore_after_cb(uv_work_t *req, int status) {
  struct store_work *w = req->data;
  struct srv *s = w->srv;
  struct srv_conn *c = srv_conn_find(s, w->serial);
  int rc = status < 0 ? KVD_ECANCELED : w->rc;
  if (!c) {
    store_work_free(w);
    srv_maybe_finish(s);
    return;
  }
  if (rc == KVD_ENOENT) {
    srv_reply_error(c, w->msgid, rc, "no saved session %s", w->name);
  } else if (rc == KVD_E_MISMATCH) {
    srv_reply_error(c, w->msgid, rc, "session %s cannot be restored on %s: %s", w->name, w->m->name,
                    w->err);
  } else if (rc < 0) {
    srv_reply_error(c, w->msgid, rc, "session %s: %s", w->name, kvd_strerror(rc));
  } else if (w->m->unloading || c->n_sessions >= IPC_MAX_SESSIONS) {
    srv_reply_error(c, w->msgid, KVD_EBUSY, "%s",
                    w->m->unloading ? "the model is unloading" : "too many sessions");
  } else {
    struct sched_session *sched_ss = NULL;
    uint32_t tokens = w->st.snap.n_hist + (w->st.snap.pending >= 0 ? 1u : 0u);
    struct srv_session *ss = NULL;
    rc = sched_session_restore(w->m->sched, &w->st.snap, &sched_ss);
    if (rc == 0 && !(ss = srv_session_add(c, w->m, sched_ss))) {
      sched_session_free(w->m->sched, sched_ss);
      rc = KVD_ENOMEM;
    }
    if (rc < 0) {
      srv_reply_error(c, w->msgid, rc, "session %s: %s", w->name, kvd_strerror(rc));
    } else {
      ss->started = w->st.started;
      ss->keep = w->st.keep;
      ss->keep_set = w->st.keep_set;
      log_info("session %s restored: %u tokens", w->name, tokens);
      ipc_w_result(&c->w, w->msgid);
      ipc_w_map(&c->w, 4);
      ipc_w_kv_u64(&c->w, "session", ss->id);
      ipc_w_kv_cstr(&c->w, "model", w->m->name);
      ipc_w_kv_u64(&c->w, "tokens", tokens);
      ipc_w_kv_f64(&c->w, "ms", (srv_now() - w->t0) * 1e3);
      if (ipc_w_end(&c->w) < 0)
        srv_reply_error(c, w->msgid, KVD_ENOMEM, NULL);
      else
        srv_reply_done(c, w->msgid);
    }
  }
  store_work_free(w);
  srv_maybe_finish(s);
}

void srv_h_session_restore(struct srv_conn *c, const struct ipc_msg *msg) {
  char name[STORE_NAME_MAX + 1];
  if (!store_name_param(c, msg, name) || !store_dir(c, msg->id)) return;
  struct srv_model *m = srv_model_param(c, msg);
  if (!m) return;
  if (c->n_sessions >= IPC_MAX_SESSIONS) {
    srv_reply_error(c, msg->id, KVD_EBUSY, "at most %d sessions per connection", IPC_MAX_SESSIONS);
    return;
  }
  struct store_work *w = calloc(1, sizeof *w);
  if (!w) {
    srv_reply_error(c, msg->id, KVD_ENOMEM, NULL);
    return;
  }
  w->work.data = w;
  w->srv = c->srv;
  w->serial = c->serial;
  w->msgid = msg->id;
  w->t0 = srv_now();
  memcpy(w->name, name, sizeof name);
  srv_store_identity(m, &w->id);
  w->n_vocab = engine_hparams(sched_engine(m->sched))->n_vocab;
  int rc = uv_queue_work(c->srv->loop, &w->work, restore_work_cb, restore_after_cb);
  if (rc < 0) {
    free(w);
    srv_reply_error(c, msg->id, KVD_EIO, "cannot queue the read");
    return;
  }
  w->m = m;
  m->n_active++;
}

/* ---- session.list, session.delete ---- */

struct list_ctx {
  struct srv_conn *c;
  const char *dir;
  uint32_t n;
};

static int list_one(void *ud, const char *name) {
  struct list_ctx *l = ud;
  struct store_session st;
  uint64_t bytes;
  if (store_session_stat(l->dir, name, &st, &bytes) < 0) return 0; /* not a session file */
  struct ipc_w *w = &l->c->w;
  ipc_w_map(w, 7);
  ipc_w_kv_cstr(w, "name", name);
  ipc_w_kv_cstr(w, "model", st.model_name);
  ipc_w_kv_cstr(w, "kv_type",
                st.id.kv_type < KV_TYPE_COUNT ? kv_type_name((enum kv_type)st.id.kv_type)
                                              : "unknown");
  ipc_w_kv_u64(w, "tokens", st.snap.n_hist + (st.snap.pending >= 0 ? 1u : 0u));
  ipc_w_kv_u64(w, "bytes", bytes);
  ipc_w_kv_u64(w, "saved", st.saved);
  /* Whether a loaded model can take it now. */
  struct srv_model *m = NULL;
  for (struct srv_model *x = l->c->srv->models; x; x = x->next)
    if (!x->unloading && x->hash[0] == st.id.model_hash[0] && x->hash[1] == st.id.model_hash[1])
      m = x;
  struct store_identity id;
  if (m) srv_store_identity(m, &id);
  ipc_w_kv_bool(w, "loadable",
                m && id.kv_type == st.id.kv_type && id.block_size == st.id.block_size &&
                    id.block_bytes == st.id.block_bytes);
  l->n++;
  return l->n >= SRV_MAX_SESSION_FILES;
}

void srv_h_session_list(struct srv_conn *c, const struct ipc_msg *msg) {
  const char *dir = store_dir(c, msg->id);
  if (!dir) return;
  /* Headers only, of a local folder: small reads, done here. */
  struct list_ctx l = {c, dir, 0};
  ipc_w_result(&c->w, msg->id);
  ipc_w_map(&c->w, 1);
  ipc_w_key(&c->w, "sessions");
  ipc_w_array_open(&c->w);
  int rc = store_session_list(dir, list_one, &l);
  ipc_w_close(&c->w);
  if (rc < 0 || ipc_w_end(&c->w) < 0) {
    srv_reply_error(c, msg->id, rc < 0 ? rc : KVD_ENOMEM, "cannot list %s", "the sessions folder");
    return;
  }
  srv_reply_done(c, msg->id);
}

void srv_h_session_delete(struct srv_conn *c, const struct ipc_msg *msg) {
  char name[STORE_NAME_MAX + 1];
  const char *dir;
  if (!store_name_param(c, msg, name) || !(dir = store_dir(c, msg->id))) return;
  int rc = store_session_delete(dir, name);
  if (rc < 0) {
    srv_reply_error(c, msg->id, rc, rc == KVD_ENOENT ? "no saved session %s" : "deleting %s", name);
    return;
  }
  ipc_w_result(&c->w, msg->id);
  ipc_w_map(&c->w, 1);
  ipc_w_kv_cstr(&c->w, "name", name);
  ipc_w_end(&c->w);
  srv_reply_done(c, msg->id);
}
