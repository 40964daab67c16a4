/* Sessions: a conversation's KV kept on the engine thread between generate requests of one
 * connection (session.open, session.fork, session.close). */
#include "srv.h"

#include "kvd_error.h"
#include "log.h"

#include <stdlib.h>
#include <string.h>

static struct srv_session *session_find(struct srv_conn *c, const struct ipc_msg *msg) {
  struct ipc_err e = {0};
  uint32_t id;
  if (ipc_get_u32(msg->params, "session", &id, &e) != 1) {
    srv_reply_error(c, msg->id, e.code ? e.code : KVD_EINVAL, "%s", e.message);
    return NULL;
  }
  for (struct srv_session *ss = c->sessions; ss; ss = ss->next)
    if (ss->id == id && !ss->closing) return ss;
  srv_reply_error(c, msg->id, KVD_ENOENT, "no session %u on this connection", id);
  return NULL;
}

static void session_reply(struct srv_conn *c, uint32_t msgid, uint32_t session) {
  ipc_w_result(&c->w, msgid);
  ipc_w_map(&c->w, 1);
  ipc_w_kv_u64(&c->w, "session", session);
  ipc_w_end(&c->w);
  srv_reply_done(c, msgid);
}

struct srv_session *srv_session_add(struct srv_conn *c, struct srv_model *m,
                                    struct sched_session *ss) {
  struct srv_session *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  s->id = c->next_session_id++;
  s->conn = c;
  s->m = m;
  s->ss = ss;
  s->next = c->sessions;
  c->sessions = s;
  c->n_sessions++;
  m->n_active++;
  return s;
}

void srv_h_session_open(struct srv_conn *c, const struct ipc_msg *msg) {
  struct srv_model *m = srv_model_param(c, msg);
  if (!m) return;
  if (c->n_sessions >= IPC_MAX_SESSIONS) {
    srv_reply_error(c, msg->id, KVD_EBUSY, "at most %d sessions per connection", IPC_MAX_SESSIONS);
    return;
  }
  struct sched_session *ss;
  struct srv_session *s = NULL;
  if (sched_session_new(m->sched, &ss) == 0 && !(s = srv_session_add(c, m, ss)))
    sched_session_free(m->sched, ss);
  if (!s) {
    srv_reply_error(c, msg->id, KVD_ENOMEM, NULL);
    return;
  }
  session_reply(c, msg->id, s->id);
}

void srv_h_session_fork(struct srv_conn *c, const struct ipc_msg *msg) {
  struct srv_session *src = session_find(c, msg);
  if (!src) return;
  if (src->busy) {
    srv_reply_error(c, msg->id, KVD_EBUSY, "session %u is generating", src->id);
    return;
  }
  if (c->n_sessions >= IPC_MAX_SESSIONS) {
    srv_reply_error(c, msg->id, KVD_EBUSY, "at most %d sessions per connection", IPC_MAX_SESSIONS);
    return;
  }
  struct sched_session *ss;
  struct srv_session *s = NULL;
  if (sched_session_fork(src->m->sched, src->ss, &ss) == 0 && !(s = srv_session_add(c, src->m, ss)))
    sched_session_free(src->m->sched, ss);
  if (!s) {
    srv_reply_error(c, msg->id, KVD_ENOMEM, NULL);
    return;
  }
  s->started = src->started;
  session_reply(c, msg->id, s->id);
}

/* Frees a session now (nothing of it runs): its KV goes back on the engine thread. */
void srv_session_release(struct srv_session *ss) {
  struct srv_conn *c = ss->conn;
  if (c) {
    for (struct srv_session **p = &c->sessions; *p; p = &(*p)->next)
      if (*p == ss) {
        *p = ss->next;
        break;
      }
    c->n_sessions--;
  }
  sched_session_free(ss->m->sched, ss->ss);
  srv_model_release(ss->m);
  free(ss);
}

static void session_close(struct srv_session *ss) {
  if (ss->busy) {
    ss->closing = true; /* its generate is cancelled by the caller; freed when it ends */
    return;
  }
  srv_session_release(ss);
}

void srv_h_session_close(struct srv_conn *c, const struct ipc_msg *msg) {
  struct srv_session *ss = session_find(c, msg);
  if (!ss) return;
  uint32_t id = ss->id;
  if (ss->busy) srv_gen_cancel_session(c, ss);
  session_close(ss);
  session_reply(c, msg->id, id);
}

void srv_sessions_close_all(struct srv_conn *c) {
  while (c->sessions) {
    struct srv_session *ss = c->sessions;
    c->sessions = ss->next;
    c->n_sessions--;
    ss->conn = NULL;
    if (ss->busy)
      ss->closing = true;
    else
      srv_session_release(ss);
  }
}
