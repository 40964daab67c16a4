/* One client connection: reading frames through the resumable decoder, dispatching them, and
 * writing replies with backpressure for clients that read slowly. */
#include "srv.h"

#include "kvd_error.h"
#include "log.h"

#include <malloc.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* A client that stops reading stops being read: past HIGH bytes queued for it we pause reading
 * its requests, and resume under LOW. Streams already running still queue their chunks, up to
 * MAX: a client that far behind is not reading at all, and holding its output would let a few
 * such clients take the machine's memory, so it is dropped (its requests are cancelled). */
#define WRITE_HIGH (1u << 20)
#define WRITE_LOW (256u << 10)
#define WRITE_MAX ((size_t)c->srv->cfg->client_backlog) /* --client-backlog, 4 MiB */

struct write_req {
  uv_write_t req;
  char *data;
};

static void conn_on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  struct srv_conn *c = h->data;
  char *p;
  size_t n;
  if (ipc_dec_reserve(&c->dec, suggested < 65536 ? 65536 : suggested, &p, &n) < 0) {
    buf->base = NULL;
    buf->len = 0; /* libuv reports UV_ENOBUFS and we close */
    return;
  }
  buf->base = p;
  buf->len = n;
}

static void conn_start_reading(struct srv_conn *c);

static void conn_on_write(uv_write_t *req, int status) {
  struct write_req *wr = (struct write_req *)req;
  struct srv_conn *c = req->handle->data;
  free(wr->data);
  free(wr);
  if (status < 0 && status != UV_ECANCELED) {
    log_debug("client %llu: write: %s", (unsigned long long)c->serial, uv_strerror(status));
    srv_conn_close(c);
    return;
  }
  if (!c->closing && !c->reading && !c->srv->draining &&
      uv_stream_get_write_queue_size((uv_stream_t *)&c->pipe) < WRITE_LOW)
    conn_start_reading(c);
}

void srv_conn_flush(struct srv_conn *c) {
  if (c->closing) {
    ipc_w_reset(&c->w);
    return;
  }
  size_t len;
  char *data = ipc_w_steal(&c->w, &len);
  if (!data) return;
  struct write_req *wr = malloc(sizeof *wr);
  if (!wr) {
    free(data);
    srv_conn_close(c); /* a reply we cannot send would leave the client waiting forever */
    return;
  }
  wr->data = data;
  uv_buf_t buf = uv_buf_init(data, (unsigned)len);
  int rc = uv_write(&wr->req, (uv_stream_t *)&c->pipe, &buf, 1, conn_on_write);
  if (rc < 0) {
    free(data);
    free(wr);
    srv_conn_close(c);
    return;
  }
  size_t queued = uv_stream_get_write_queue_size((uv_stream_t *)&c->pipe);
  if (queued > WRITE_MAX) {
    log_warn("client %llu: %zu bytes of output it does not read; dropping it",
             (unsigned long long)c->serial, queued);
    srv_conn_close(c);
    malloc_trim(0); /* give the memory its output held back to the system */
    return;
  }
  if (c->reading && (queued > WRITE_HIGH || queued > WRITE_MAX / 2)) {
    uv_read_stop((uv_stream_t *)&c->pipe);
    c->reading = false;
  }
}

static bool conn_tracks(const struct srv_conn *c, uint32_t id) {
  for (uint32_t i = 0; i < c->inflight; i++)
    if (c->inflight_ids[i] == id) return true;
  return false;
}

/* Writes the error response for id into c->w (fmt NULL: the code's own text). */
static void conn_write_error(struct srv_conn *c, uint32_t id, int code, const char *fmt,
                             va_list ap) {
  char msg[256];
  if (fmt) vsnprintf(msg, sizeof msg, fmt, ap);
  c->srv->stats.errors++;
  ipc_w_error(&c->w, id, code, fmt ? msg : NULL);
  ipc_w_end(&c->w);
}

/* An error for a msgid that is not (or not again) in flight on its own: the reply does not
 * end the request that holds that msgid. */
static void conn_reply_untracked(struct srv_conn *c, uint32_t id, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void conn_reply_untracked(struct srv_conn *c, uint32_t id, int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  conn_write_error(c, id, code, fmt, ap);
  va_end(ap);
  srv_conn_flush(c);
}

void srv_reply_error(struct srv_conn *c, uint32_t id, int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  conn_write_error(c, id, code, fmt, ap);
  va_end(ap);
  srv_reply_done(c, id);
}

/* --check-results: decodes what is about to be written and checks the response to id against
 * api.json's declaration of its method (required keys present, declared types). A difference
 * is logged as "api drift", which the tests look for in kvd's log. */
static void conn_check_result(struct srv_conn *c, uint32_t id, int method) {
  struct ipc_dec d;
  ipc_dec_init(&d, IPC_MAX_REPLY_BYTES);
  if (ipc_dec_feed(&d, ipc_w_data(&c->w), ipc_w_len(&c->w)) == 0) {
    struct ipc_msg *m;
    struct ipc_dec_err derr;
    while (ipc_dec_next(&d, &m, &derr) == 1) {
      if (m->type == IPC_RESPONSE && m->id == id && !m->error) {
        struct ipc_err e = {0};
        if (ipc_validate_result((enum ipc_method)method, m->result, &e) < 0)
          log_err("api drift: the result of %s (msgid %u): %s", ipc_methods[method].name, id,
                  e.message);
      }
      ipc_msg_free(m);
    }
  }
  ipc_dec_destroy(&d);
}

void srv_reply_done(struct srv_conn *c, uint32_t id) {
  for (uint32_t i = 0; i < c->inflight; i++)
    if (c->inflight_ids[i] == id) {
      if (c->srv->cfg->check_results && c->inflight_methods[i] >= 0)
        conn_check_result(c, id, c->inflight_methods[i]);
      c->inflight_ids[i] = c->inflight_ids[c->inflight - 1];
      c->inflight_methods[i] = c->inflight_methods[c->inflight - 1];
      c->inflight--;
      break;
    }
  srv_conn_flush(c);
  /* A half-closed client has had every answer: close once they are written. */
  if (c->eof && !c->inflight && !c->closing) srv_conn_finish(c);
}

static void conn_handle(struct srv_conn *c, struct ipc_msg *m) {
  if (m->type != IPC_REQUEST) {
    /* Clients have nothing to notify or answer in protocol 1: ignore, as PROTOCOL.md says. */
    ipc_msg_free(m);
    return;
  }
  c->srv->stats.requests++;
  c->t_active = srv_now();
  if (conn_tracks(c, m->id)) {
    conn_reply_untracked(c, m->id, KVD_EEXIST, "msgid %u is already in flight", m->id);
    ipc_msg_free(m);
    return;
  }
  if (c->inflight == IPC_MAX_INFLIGHT) {
    conn_reply_untracked(c, m->id, KVD_EBUSY, "more than %d requests in flight on this connection",
                         IPC_MAX_INFLIGHT);
    ipc_msg_free(m);
    return;
  }
  c->inflight_methods[c->inflight] = (int16_t)m->method_id;
  c->inflight_ids[c->inflight++] = m->id;
  if (c->srv->draining) {
    srv_reply_error(c, m->id, KVD_EBUSY, "kvd is shutting down");
  } else {
    srv_dispatch(c, m);
  }
  ipc_msg_free(m);
}

static void conn_on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  struct srv_conn *c = stream->data;
  (void)buf;
  if (nread == UV_EOF && c->inflight) {
    /* Half-closed (shutdown(SHUT_WR) after the last request): what it asked for is still
     * answered; the connection closes when the last answer is written. */
    uv_read_stop(stream);
    c->reading = false;
    c->eof = true;
    return;
  }
  if (nread < 0) {
    if (nread != UV_EOF)
      log_debug("client %llu: read: %s", (unsigned long long)c->serial, uv_strerror((int)nread));
    srv_conn_close(c);
    return;
  }
  ipc_dec_commit(&c->dec, (size_t)nread);
  for (;;) {
    struct ipc_msg *m;
    struct ipc_dec_err err;
    int rc = ipc_dec_next(&c->dec, &m, &err);
    if (rc == 0) break;
    if (rc == 1) {
      conn_handle(c, m);
      if (c->closing) return;
      continue;
    }
    if (!err.fatal && err.has_id) {
      conn_reply_untracked(c, err.id, err.code, "%s", err.message);
      continue;
    }
    log_info("client %llu: %s; closing the connection", (unsigned long long)c->serial, err.message);
    srv_conn_close(c);
    return;
  }
}

static void conn_start_reading(struct srv_conn *c) {
  if (c->eof || c->finishing) return;
  if (uv_read_start((uv_stream_t *)&c->pipe, conn_on_alloc, conn_on_read) == 0) c->reading = true;
}

static void conn_on_close(uv_handle_t *h) {
  struct srv_conn *c = h->data;
  struct srv *s = c->srv;
  if (c->prev)
    c->prev->next = c->next;
  else
    s->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  s->n_conns--;
  ipc_dec_destroy(&c->dec);
  ipc_w_destroy(&c->w);
  free(c);
  srv_maybe_finish(s);
}

struct srv_conn *srv_conn_find(struct srv *s, uint64_t serial) {
  for (struct srv_conn *c = s->conns; c; c = c->next)
    if (c->serial == serial && !c->closing) return c;
  return NULL;
}

void srv_conn_close(struct srv_conn *c) {
  if (c->closing) return;
  c->closing = true;
  log_debug("client %llu: closed", (unsigned long long)c->serial);
  /* Its generations are cancelled at once, so their KV blocks go back at the next step. */
  srv_gen_detach_all(c);
  srv_sessions_close_all(c);
  uv_close((uv_handle_t *)&c->pipe, conn_on_close);
}

static void conn_on_shutdown(uv_shutdown_t *req, int status) {
  (void)status;
  srv_conn_close(req->data);
}

void srv_conn_finish(struct srv_conn *c) {
  if (c->closing || c->finishing) return;
  c->finishing = true;
  /* No request can come any more: its sessions go now, while their models are still there
   * (the drain frees the models next, before the writes complete). */
  srv_sessions_close_all(c);
  if (c->reading) uv_read_stop((uv_stream_t *)&c->pipe);
  c->reading = false;
  c->shutdown_req.data = c;
  if (uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->pipe, conn_on_shutdown) < 0)
    srv_conn_close(c);
}

/* At the connection limit, the connection idle longest (nothing in flight, no session, no
 * generate) makes room for the newcomer: idle connections must not lock everyone else out. */
static struct srv_conn *conn_evictable(struct srv *s, const struct srv_conn *except) {
  struct srv_conn *best = NULL;
  for (struct srv_conn *c = s->conns; c; c = c->next)
    if (c != except && !c->closing && !c->finishing && !c->inflight && !c->gens && !c->n_sessions &&
        (!best || c->t_active < best->t_active))
      best = c;
  return best;
}

void srv_conn_accept(struct srv *s) {
  struct srv_conn *c = calloc(1, sizeof *c);
  if (!c) return;
  c->srv = s;
  c->serial = ++s->conn_serial;
  c->protocol = IPC_PROTOCOL_VERSION;
  c->next_session_id = 1;
  c->t_active = srv_now();
  ipc_dec_init(&c->dec, IPC_MAX_FRAME_BYTES);
  ipc_w_init(&c->w, IPC_MAX_REPLY_BYTES);
  uv_pipe_init(s->loop, &c->pipe, 0);
  c->pipe.data = c;
  c->next = s->conns;
  if (s->conns) s->conns->prev = c;
  s->conns = c;
  s->n_conns++;
  s->stats.connections++;
  if (uv_accept((uv_stream_t *)&s->listener, (uv_stream_t *)&c->pipe) < 0) {
    srv_conn_close(c);
    return;
  }
  uv_os_fd_t fd;
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (uv_fileno((uv_handle_t *)&c->pipe, &fd) == 0 &&
      getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0)
    log_info("client %llu connected: pid %d uid %u gid %u", (unsigned long long)c->serial,
             (int)cred.pid, (unsigned)cred.uid, (unsigned)cred.gid);
  struct srv_conn *idle;
  if (s->n_conns > (uint32_t)s->cfg->max_clients && !s->draining && (idle = conn_evictable(s, c))) {
    log_info("client %llu: closing it, idle longest, to make room for client %llu",
             (unsigned long long)idle->serial, (unsigned long long)c->serial);
    srv_conn_close(idle); /* n_conns drops when its close completes */
  } else if (s->n_conns > (uint32_t)s->cfg->max_clients || s->draining) {
    log_warn("client %llu refused: %s", (unsigned long long)c->serial,
             s->draining ? "shutting down" : "too many connections");
    srv_conn_close(c);
    return;
  }
  conn_start_reading(c);
}
