/* libkvd's connection: connect and hello, the requests in flight, reading and dispatching the
 * server's messages, writing ours, and the blocking wait that the synchronous API is built on.
 *
 * The socket is always non-blocking. Both APIs drive the same machinery: kvd_client_process()
 * reads and dispatches whatever arrived; a blocking call does the same in a poll() loop until its
 * own answer has come. Every request in flight has a struct kvd__req in c->reqs, found by msgid
 * when its response (or a generate.chunk naming it) arrives.
 *
 * A lost connection (EOF, a write error, a malformed message) is sticky: c->broken keeps the code
 * and every request in flight ends with it. Requests end from the top level only (fail_all() runs
 * when no dispatch is under way), so a callback never finds its request freed beneath it. */
#include "kvd_internal.h"

#include "kvd_config.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* How long kvd_client_connect() waits for hello's answer: a daemon that accepts but never answers
 * (stopped in a debugger, wedged) should not hang a program that only wanted to connect. */
#define KVD__HELLO_TIMEOUT_MS 10000
/* Bytes read per recv(); messages are dispatched between reads, which bounds what is buffered. */
#define KVD__READ_CHUNK (64u << 10)

/* The message of the last failed connect, per thread: there is no client to hold it. */
static _Thread_local char connect_err[512];

static const char start_hint[] =
    "is kvd running? start it with `kvd --model FILE` or `systemctl --user start kvd`";

/* ---- Small helpers ----------------------------------------------------------------------- */

void kvd__buf_add(struct kvd__buf *b, const void *data, size_t n) {
  if (b->oom) return;
  if (b->cap - b->len <= n) { /* keep room for the NUL kvd__buf_steal() adds */
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len <= n) {
      if (cap > SIZE_MAX / 2) {
        b->oom = true;
        return;
      }
      cap *= 2;
    }
    char *p = realloc(b->p, cap);
    if (!p) {
      b->oom = true;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  if (n) memcpy(b->p + b->len, data, n);
  b->len += n;
}

void kvd__buf_puts(struct kvd__buf *b, const char *s) {
  kvd__buf_add(b, s, strlen(s));
}

void kvd__buf_printf(struct kvd__buf *b, const char *fmt, ...) {
  char tmp[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n < 0) {
    b->oom = true;
    return;
  }
  if ((size_t)n < sizeof tmp) {
    kvd__buf_add(b, tmp, (size_t)n);
    return;
  }
  char *big = malloc((size_t)n + 1);
  if (!big) {
    b->oom = true;
    return;
  }
  va_start(ap, fmt);
  vsnprintf(big, (size_t)n + 1, fmt, ap);
  va_end(ap);
  kvd__buf_add(b, big, (size_t)n);
  free(big);
}

char *kvd__buf_steal(struct kvd__buf *b, size_t *ret_len) {
  kvd__buf_add(b, "", 0); /* makes sure there is a buffer with room for the NUL */
  if (b->oom) {
    kvd__buf_destroy(b);
    return NULL;
  }
  char *p = b->p;
  p[b->len] = '\0';
  if (ret_len) *ret_len = b->len;
  b->p = NULL;
  b->len = b->cap = 0;
  return p;
}

void kvd__buf_destroy(struct kvd__buf *b) {
  free(b->p);
  b->p = NULL;
  b->len = b->cap = 0;
  b->oom = false;
}

char *kvd__strndup(const char *s, size_t n) {
  char *p = malloc(n + 1);
  if (!p) return NULL;
  if (n) memcpy(p, s, n);
  p[n] = '\0';
  return p;
}

int kvd__error(struct kvd_client *c, int rc, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(c->err, sizeof c->err, fmt, ap);
  va_end(ap);
  return rc;
}

/* ---- Requests in flight ------------------------------------------------------------------ */

struct kvd__req *kvd__find(struct kvd_client *c, uint32_t id) {
  for (struct kvd__req *r = c->reqs; r; r = r->next)
    if (r->id == id) return r;
  return NULL;
}

static void unlink_req(struct kvd_client *c, struct kvd__req *req) {
  for (struct kvd__req **p = &c->reqs; *p; p = &(*p)->next) {
    if (*p == req) {
      *p = req->next;
      req->next = NULL;
      c->n_reqs--;
      return;
    }
  }
}

void kvd__req_free(struct kvd__req *req) {
  if (!req) return;
  ipc_msg_free(req->resp);
  kvd__gen_release(req);
  kvd_gen_result_free(req->result);
  free(req);
}

/* Msgids count up from 1 and wrap, skipping any still in flight (PROTOCOL.md: never reuse one
 * while its request is in flight). */
static uint32_t new_id(struct kvd_client *c) {
  for (;;) {
    uint32_t id = c->next_id++;
    if (id != 0 && !kvd__find(c, id)) return id;
  }
}

/* Marks the connection lost (the first reason wins) and returns its code. The requests in flight
 * end later, in fail_all(), once no dispatch holds pointers to them. */
static int lose(struct kvd_client *c, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int lose(struct kvd_client *c, int rc, const char *fmt, ...) {
  if (!c->broken) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->lost, sizeof c->lost, fmt, ap);
    va_end(ap);
    c->broken = rc;
  }
  snprintf(c->err, sizeof c->err, "%s", c->lost);
  return c->broken;
}

/* Ends every request in flight with the lost connection's code. Async generations get their
 * on_done; blocking waiters find theirs done. */
static void fail_all(struct kvd_client *c) {
  if (!c->broken || c->busy) return;
  while (c->reqs) {
    struct kvd__req *r = c->reqs;
    unlink_req(c, r);
    snprintf(c->err, sizeof c->err, "%s", c->lost);
    if (r->kind == KVD__REQ_GEN && !r->abandoned) {
      kvd__gen_end(c, r, NULL, c->broken); /* frees r unless a waiter has it */
    } else if (r->sync && !r->abandoned) {
      r->rc = c->broken;
      r->done = true;
    } else {
      kvd__req_free(r);
    }
  }
  snprintf(c->err, sizeof c->err, "%s", c->lost);
}

/* ---- Writing ----------------------------------------------------------------------------- */

/* Writes pending output without blocking: 0 when all is out, 1 when the socket is full, or the
 * lost connection's code. */
static int flush_out(struct kvd_client *c) {
  if (c->broken) return c->broken;
  size_t len = ipc_w_len(&c->w);
  const char *data = ipc_w_data(&c->w);
  while (c->w_sent < len) {
    /* MSG_NOSIGNAL: a daemon that went away is an error return, never a SIGPIPE in the app. */
    ssize_t n = send(c->fd, data + c->w_sent, len - c->w_sent, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      c->w_sent += (size_t)n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 1;
    if (n < 0 && (errno == EPIPE || errno == ECONNRESET))
      return lose(c, KVD_EIO, "kvd closed the connection");
    return lose(c, KVD_EIO, "writing to kvd: %s", strerror(n < 0 ? errno : EIO));
  }
  ipc_w_reset(&c->w);
  c->w_sent = 0;
  return 0;
}

/* ---- Reading and dispatch ---------------------------------------------------------------- */

/* Handles one message from the server; takes m. A negative return (with c->err saying why) means
 * the server sent something unreadable: the caller gives up on the connection. */
static int dispatch(struct kvd_client *c, struct ipc_msg *m) {
  int rc = 0;
  switch (m->type) {
  case IPC_RESPONSE: {
    struct kvd__req *r = kvd__find(c, m->id);
    if (!r) break; /* nobody waits for it: the answer to an abandoned or closed request */
    unlink_req(c, r);
    if (r->abandoned || r->kind == KVD__REQ_IGNORE) {
      kvd__req_free(r);
      break;
    }
    if (r->kind == KVD__REQ_GEN) {
      kvd__gen_end(c, r, m, 0);
      return 0;
    }
    r->resp = m;
    r->done = true;
    return 0;
  }
  case IPC_NOTIFICATION:
    if (m->method_id == IPC_M_GENERATE_CHUNK) rc = kvd__gen_chunk(c, m);
    /* Other notifications are from a newer protocol: ignore them, as PROTOCOL.md asks. */
    break;
  case IPC_REQUEST:
    break; /* the protocol has no server-to-client requests */
  }
  ipc_msg_free(m);
  return rc;
}

/* Reads and dispatches until the socket has nothing more (or the connection is lost). Returns
 * the number of messages handled, or the lost connection's code. */
static int pump(struct kvd_client *c) {
  int count = 0;
  if (c->broken) return c->broken;
  c->busy++;
  for (;;) {
    char *buf;
    size_t len;
    int rc = ipc_dec_reserve(&c->dec, KVD__READ_CHUNK, &buf, &len);
    if (rc < 0) {
      lose(c, rc, "out of memory reading from kvd");
      break;
    }
    ssize_t n = recv(c->fd, buf, len, MSG_DONTWAIT);
    ipc_dec_commit(&c->dec, n > 0 ? (size_t)n : 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      lose(c, KVD_EIO, "reading from kvd: %s", strerror(errno));
      break;
    }
    struct ipc_msg *m;
    struct ipc_dec_err err;
    while (!c->broken && (rc = ipc_dec_next(&c->dec, &m, &err)) == 1) {
      count++;
      int drc = dispatch(c, m);
      if (drc < 0) lose(c, drc, "%s", c->err);
    }
    if (c->broken) break;
    if (rc < 0) {
      /* Whatever the decoder's verdict, a server that sends a malformed message cannot be
       * trusted to have kept the stream in step: give up on the connection. */
      lose(c, KVD_EPROTO, "malformed message from kvd: %s", err.message);
      break;
    }
    if (n == 0) {
      if (ipc_dec_buffered(&c->dec))
        lose(c, KVD_EIO, "kvd closed the connection in the middle of a message");
      else
        lose(c, KVD_EIO, "kvd closed the connection");
      break;
    }
  }
  c->busy--;
  if (c->broken) {
    fail_all(c);
    return c->broken;
  }
  return count;
}

/* ---- Sending requests and waiting -------------------------------------------------------- */

struct kvd__req *kvd__begin(struct kvd_client *c, const char *method, enum ipc_method mid,
                            enum kvd__req_kind kind, bool sync, int *ret_rc) {
  if (c->broken) {
    *ret_rc = kvd__error(c, c->broken, "the connection to kvd is lost: %s", c->lost);
    return NULL;
  }
  if (sync && c->cb_depth > 0) {
    *ret_rc = kvd__error(c, KVD_EBUSY,
                         "libkvd: a blocking call from inside a callback (use kvd_generate_async, "
                         "kvd_cancel, or call it after kvd_client_process returns)");
    return NULL;
  }
  struct kvd__req *req = calloc(1, sizeof *req);
  if (!req) {
    *ret_rc = kvd__error(c, KVD_ENOMEM, "out of memory");
    return NULL;
  }
  req->id = new_id(c);
  req->kind = kind;
  req->method = mid;
  req->sync = sync;
  ipc_w_request(&c->w, req->id, method);
  return req;
}

int kvd__send(struct kvd_client *c, struct kvd__req *req) {
  int rc = ipc_w_end(&c->w);
  if (rc < 0) {
    kvd__req_free(req);
    if (rc == KVD_E2BIG)
      return kvd__error(c, rc, "request larger than the protocol's limit of %u bytes",
                        (unsigned)IPC_MAX_FRAME_BYTES);
    return kvd__error(c, rc, "cannot encode the request: %s", kvd_strerror(rc));
  }
  req->next = c->reqs;
  c->reqs = req;
  c->n_reqs++;
  /* Write now when the socket takes it, so a loop needs no writability watch in the common case.
   * A failure here shows up at the next process or wait, which ends the request. */
  c->busy++;
  flush_out(c);
  c->busy--;
  return 0;
}

int kvd__cancel_req(struct kvd_client *c, struct kvd__req *req) {
  if (req->cancelled) return 0;
  req->cancelled = true;
  int rc;
  struct kvd__req *cr = kvd__begin(c, "cancel", IPC_M_CANCEL, KVD__REQ_IGNORE, false, &rc);
  if (!cr) return rc;
  ipc_w_map(&c->w, 1);
  ipc_w_kv_u64(&c->w, "id", req->id);
  return kvd__send(c, cr);
}

int kvd__wait(struct kvd_client *c, struct kvd__req *req) {
  while (!req->done) {
    if (c->broken) {
      fail_all(c); /* ends req too */
      if (req->done) break;
      return c->broken; /* not reached: req was in the list */
    }
    int wr = flush_out(c);
    if (wr < 0) continue;
    struct pollfd pfd = {.fd = c->fd, .events = POLLIN | (wr > 0 ? POLLOUT : 0)};
    int n = poll(&pfd, 1, c->timeout_ms > 0 ? c->timeout_ms : -1);
    if (n < 0) {
      if (errno == EINTR) continue; /* a signal the program handles itself */
      lose(c, KVD_EIO, "poll: %s", strerror(errno));
      continue;
    }
    if (n == 0) {
      /* Leave the request to the client: its answer may still come and must be recognised. */
      req->abandoned = true;
      if (req->kind == KVD__REQ_GEN) kvd__cancel_req(c, req);
      return kvd__error(c, KVD_EAGAIN, "no answer from kvd within %d ms", c->timeout_ms);
    }
    if (pfd.revents & (POLLIN | POLLHUP | POLLERR)) pump(c);
  }
  return req->rc;
}

int kvd__call(struct kvd_client *c, struct kvd__req *req, struct ipc_msg **ret_msg) {
  int rc = kvd__send(c, req);
  if (rc < 0) return rc;
  enum ipc_method mid = req->method;
  rc = kvd__wait(c, req);
  if (req->abandoned) return rc;
  struct ipc_msg *m = req->resp;
  req->resp = NULL;
  kvd__req_free(req);
  if (rc < 0) return rc;
  const char *msg;
  rc = ipc_msg_error(m, &msg);
  if (rc < 0) {
    kvd__error(c, rc, "%s", msg);
    ipc_msg_free(m);
    return rc;
  }
  /* Checked once here, so the parsers can read every declared key with its declared type. */
  struct ipc_err err;
  rc = ipc_validate_result(mid, m->result, &err);
  if (rc < 0) {
    kvd__error(c, KVD_EPROTO, "malformed answer from kvd: %s", err.message);
    ipc_msg_free(m);
    return KVD_EPROTO;
  }
  *ret_msg = m;
  return 0;
}

/* ---- Connecting -------------------------------------------------------------------------- */

static bool exists(const char *path) {
  struct stat st;
  return stat(path, &st) == 0;
}

int kvd_default_socket_path(char *buf, size_t size) {
  /* The library reads the environment here, at the application's request, like any client of a
   * socket-activated service; the daemon's own options come from its config table. */
  const char *env = getenv("KVD_SOCKET");
  const char *xdg = getenv("XDG_RUNTIME_DIR");
  const char *sys = "/run/kvd/kvd.sock";
  char user[4096] = "";
  int n;
  if (xdg && xdg[0]) snprintf(user, sizeof user, "%s/kvd/kvd.sock", xdg);
  if (env && env[0])
    n = snprintf(buf, size, "%s", env);
  else if (user[0] && (exists(user) || !exists(sys)))
    n = snprintf(buf, size, "%s", user); /* also the one to name when neither exists */
  else
    n = snprintf(buf, size, "%s", sys);
  if (n < 0 || (size_t)n >= size) return KVD_E2BIG;
  return n;
}

/* Connects the socket; a negative code with connect_err set on failure. */
static int open_socket(const char *path, int *ret_fd) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof sa.sun_path) {
    snprintf(connect_err, sizeof connect_err, "socket path too long (%zu bytes, at most %zu): %s",
             strlen(path), sizeof sa.sun_path - 1, path);
    return KVD_EINVAL;
  }
  memcpy(sa.sun_path, path, strlen(path) + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    int e = errno;
    snprintf(connect_err, sizeof connect_err, "socket: %s", strerror(e));
    return e == ENOMEM || e == ENOBUFS ? KVD_ENOMEM : KVD_EIO;
  }
  /* connect() while still blocking: a non-blocking Unix socket fails with EAGAIN when the
   * daemon's backlog is full instead of waiting its turn. */
  int rc;
  do {
    rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) {
    int e = errno;
    close(fd);
    if (e == ENOENT || e == ECONNREFUSED || e == ENOTDIR) {
      snprintf(connect_err, sizeof connect_err, "cannot connect to kvd at %s: %s; %s", path,
               strerror(e), start_hint);
      return KVD_ECONNREFUSED;
    }
    if (e == EACCES || e == EPERM) {
      snprintf(connect_err, sizeof connect_err,
               "cannot connect to kvd at %s: %s (the socket's owner, group and mode decide who "
               "may use kvd)",
               path, strerror(e));
      return KVD_EACCES;
    }
    snprintf(connect_err, sizeof connect_err, "cannot connect to kvd at %s: %s", path, strerror(e));
    return KVD_EIO;
  }
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
    snprintf(connect_err, sizeof connect_err, "fcntl: %s", strerror(errno));
    close(fd);
    return KVD_EIO;
  }
  *ret_fd = fd;
  return 0;
}

/* Parses hello's result into c. */
static int take_hello(struct kvd_client *c, const struct ipc_msg *m) {
  const msgpack_object *r = m->result, *caps = NULL;
  uint64_t proto = 0;
  const char *s;
  size_t len, n_caps = 0;
  ipc_get_u64(r, "protocol", &proto, NULL);
  if (proto < 1 || proto > IPC_PROTOCOL_VERSION)
    return kvd__error(c, KVD_ENOTSUP,
                      "kvd answered hello with protocol %llu; libkvd speaks 1 to %d",
                      (unsigned long long)proto, IPC_PROTOCOL_VERSION);
  if (ipc_get_str(r, "version", &s, &len, NULL) == 1) c->server_version = kvd__strndup(s, len);
  if (ipc_get_str(r, "model", &s, &len, NULL) == 1) c->default_model = kvd__strndup(s, len);
  ipc_get_strs(r, "capabilities", &caps, &n_caps, NULL);
  if (n_caps) c->caps = calloc(n_caps, sizeof *c->caps);
  if (!c->server_version || (n_caps && !c->caps)) return kvd__error(c, KVD_ENOMEM, "out of memory");
  for (size_t i = 0; i < n_caps; i++) {
    c->caps[i] = kvd__strndup(caps[i].via.str.ptr, caps[i].via.str.size);
    if (!c->caps[i]) return kvd__error(c, KVD_ENOMEM, "out of memory");
    c->n_caps++;
  }
  return 0;
}

static int say_hello(struct kvd_client *c) {
  int rc;
  struct kvd__req *req = kvd__begin(c, "hello", IPC_M_HELLO, KVD__REQ_CALL, true, &rc);
  if (!req) return rc;
  ipc_w_map(&c->w, 2);
  ipc_w_kv_u64(&c->w, "protocol", IPC_PROTOCOL_VERSION);
  ipc_w_kv_cstr(&c->w, "client", "libkvd " KVD_VERSION);
  c->timeout_ms = KVD__HELLO_TIMEOUT_MS;
  struct ipc_msg *m;
  rc = kvd__call(c, req, &m);
  c->timeout_ms = 0;
  if (rc < 0) return rc;
  rc = take_hello(c, m);
  ipc_msg_free(m);
  return rc;
}

int kvd_client_connect(const char *socket_path, struct kvd_client **ret) {
  char path[4096];
  connect_err[0] = '\0';
  if (!ret) {
    snprintf(connect_err, sizeof connect_err, "kvd_client_connect: ret is NULL");
    return KVD_EINVAL;
  }
  if (!socket_path) {
    if (kvd_default_socket_path(path, sizeof path) < 0) {
      snprintf(connect_err, sizeof connect_err, "socket path too long");
      return KVD_EINVAL;
    }
    socket_path = path;
  }
  int fd;
  int rc = open_socket(socket_path, &fd);
  if (rc < 0) return rc;
  struct kvd_client *c = calloc(1, sizeof *c);
  if (!c) {
    close(fd);
    snprintf(connect_err, sizeof connect_err, "out of memory");
    return KVD_ENOMEM;
  }
  c->fd = fd;
  c->next_id = 1;
  ipc_dec_init(&c->dec, IPC_MAX_REPLY_BYTES);
  ipc_w_init(&c->w, IPC_MAX_FRAME_BYTES);
  rc = say_hello(c);
  if (rc < 0) {
    if (rc == KVD_EIO && c->broken)
      snprintf(connect_err, sizeof connect_err,
               "kvd at %s closed the connection before answering hello (too many clients?)",
               socket_path);
    else if (rc == KVD_EAGAIN)
      snprintf(connect_err, sizeof connect_err, "kvd at %s did not answer hello within %d s",
               socket_path, KVD__HELLO_TIMEOUT_MS / 1000);
    else
      snprintf(connect_err, sizeof connect_err, "hello to kvd at %.200s failed: %.280s",
               socket_path, c->err);
    kvd_client_close(c);
    return rc;
  }
  *ret = c;
  return 0;
}

void kvd_client_close(struct kvd_client *c) {
  if (!c) return;
  while (c->reqs) {
    struct kvd__req *r = c->reqs;
    c->reqs = r->next;
    kvd__req_free(r);
  }
  if (c->fd >= 0) close(c->fd);
  ipc_dec_destroy(&c->dec);
  ipc_w_destroy(&c->w);
  free(c->server_version);
  free(c->default_model);
  for (size_t i = 0; i < c->n_caps; i++)
    free(c->caps[i]);
  free(c->caps);
  free(c);
}

/* ---- Getters and the event-loop API ------------------------------------------------------ */

const char *kvd_library_version(void) {
  return KVD_VERSION;
}

const char *kvd_client_last_error(const struct kvd_client *c) {
  return c ? c->err : connect_err;
}

const char *kvd_client_server_version(const struct kvd_client *c) {
  return c ? c->server_version : NULL;
}

const char *kvd_client_default_model(const struct kvd_client *c) {
  return c ? c->default_model : NULL;
}

bool kvd_client_has_capability(const struct kvd_client *c, const char *capability) {
  if (!c || !capability) return false;
  for (size_t i = 0; i < c->n_caps; i++)
    if (strcmp(c->caps[i], capability) == 0) return true;
  return false;
}

bool kvd_client_connected(const struct kvd_client *c) {
  return c && !c->broken;
}

void kvd_client_set_timeout(struct kvd_client *c, int timeout_ms) {
  if (c) c->timeout_ms = timeout_ms > 0 ? timeout_ms : 0;
}

int kvd_client_fd(const struct kvd_client *c) {
  return c ? c->fd : KVD_EINVAL;
}

int kvd_client_process(struct kvd_client *c) {
  if (!c) return KVD_EINVAL;
  if (c->cb_depth > 0)
    return kvd__error(c, KVD_EBUSY, "libkvd: kvd_client_process called from a callback");
  if (c->broken) {
    fail_all(c);
    return kvd__error(c, c->broken, "%s", c->lost);
  }
  int n = pump(c);
  if (n < 0) return n;
  int rc = flush_out(c);
  if (rc < 0) {
    fail_all(c);
    return rc;
  }
  return n;
}

bool kvd_client_want_write(const struct kvd_client *c) {
  return c && !c->broken && c->w_sent < ipc_w_len(&c->w);
}

int kvd_client_flush(struct kvd_client *c) {
  if (!c) return KVD_EINVAL;
  int rc = flush_out(c);
  if (rc < 0 && c->cb_depth == 0) fail_all(c);
  return rc;
}

size_t kvd_client_pending(const struct kvd_client *c) {
  size_t n = 0;
  if (!c) return 0;
  for (const struct kvd__req *r = c->reqs; r; r = r->next)
    if (!r->abandoned) n++;
  return n;
}

int kvd_cancel(struct kvd_client *c, uint32_t id) {
  if (!c) return KVD_EINVAL;
  struct kvd__req *r = kvd__find(c, id);
  if (!r || r->kind != KVD__REQ_GEN || r->abandoned)
    return kvd__error(c, KVD_ENOENT, "no generate request %u in flight", id);
  return kvd__cancel_req(c, r);
}
