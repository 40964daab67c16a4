/* fake_kvd: see fake_kvd.h. */
#include "fake_kvd.h"

#include "kt.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int counter;

void fake_fail(struct fake *f, const char *fmt, ...) {
  if (f->error[0]) return; /* the first failure is the interesting one */
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(f->error, sizeof f->error, fmt, ap);
  va_end(ap);
}

/* Waits up to FAKE_TIMEOUT_MS for fd to be readable; false on timeout. */
static bool wait_readable(int fd) {
  struct pollfd p = {.fd = fd, .events = POLLIN};
  int n;
  do {
    n = poll(&p, 1, FAKE_TIMEOUT_MS);
  } while (n < 0 && errno == EINTR);
  return n > 0;
}

struct ipc_msg *fake_recv(struct fake *f) {
  if (f->cfd < 0) return NULL;
  for (;;) {
    struct ipc_msg *m;
    struct ipc_dec_err err;
    int rc = ipc_dec_next(&f->dec, &m, &err);
    if (rc == 1) {
      if (m->type == IPC_REQUEST && f->n_methods < 64)
        snprintf(f->methods[f->n_methods++], sizeof f->methods[0], "%s", m->method);
      return m;
    }
    if (rc < 0) {
      fake_fail(f, "malformed message from the client: %s", err.message);
      return NULL;
    }
    if (!wait_readable(f->cfd)) {
      fake_fail(f, "timed out waiting for the client");
      return NULL;
    }
    char buf[4096];
    ssize_t n = read(f->cfd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return NULL; /* the client closed (or reset) its end */
    ipc_dec_feed(&f->dec, buf, (size_t)n);
  }
}

struct ipc_msg *fake_expect(struct fake *f, const char *method) {
  struct ipc_msg *m = fake_recv(f);
  if (!m) {
    fake_fail(f, "expected %s, got nothing", method);
    return NULL;
  }
  if (m->type != IPC_REQUEST || strcmp(m->method, method) != 0) {
    fake_fail(f, "expected a %s request, got %s", method, m->method ? m->method : "a response");
    ipc_msg_free(m);
    return NULL;
  }
  return m;
}

void fake_send_raw(struct fake *f, const void *data, size_t len) {
  const char *p = data;
  while (f->cfd >= 0 && len) {
    ssize_t n = send(f->cfd, p, len, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      fake_fail(f, "write to the client: %s", strerror(errno));
      return;
    }
    p += n;
    len -= (size_t)n;
  }
}

void fake_send(struct fake *f) {
  int rc = ipc_w_end(&f->w);
  if (rc < 0) fake_fail(f, "encoding a message: %s", kvd_strerror(rc));
  fake_send_raw(f, ipc_w_data(&f->w), ipc_w_len(&f->w));
  ipc_w_reset(&f->w);
}

void fake_hang_up(struct fake *f) {
  if (f->cfd >= 0) close(f->cfd);
  f->cfd = -1;
}

void fake_hello(struct fake *f) {
  struct ipc_msg *m = fake_expect(f, "hello");
  if (!m) return;
  uint64_t proto = 0;
  ipc_get_u64(m->params, "protocol", &proto, NULL);
  if (proto != 1) fake_fail(f, "hello: protocol %llu", (unsigned long long)proto);
  ipc_w_result(&f->w, m->id);
  ipc_w_map_open(&f->w);
  ipc_w_kv_u64(&f->w, "protocol", 1);
  ipc_w_kv_cstr(&f->w, "version", "9.8.7");
  ipc_w_key(&f->w, "capabilities");
  ipc_w_array(&f->w, 3);
  ipc_w_cstr(&f->w, "stream");
  ipc_w_cstr(&f->w, "sessions");
  ipc_w_cstr(&f->w, "cancel");
  ipc_w_kv_cstr(&f->w, "model", "tiny");
  ipc_w_close(&f->w);
  fake_send(f);
  ipc_msg_free(m);
}

void fake_models_list(struct fake *f, const char *name, const char *chat_template) {
  struct ipc_msg *m = fake_expect(f, "models.list");
  if (!m) return;
  ipc_w_result(&f->w, m->id);
  ipc_w_map(&f->w, 1);
  ipc_w_key(&f->w, "models");
  ipc_w_array(&f->w, 1);
  ipc_w_map_open(&f->w);
  ipc_w_kv_cstr(&f->w, "name", name);
  ipc_w_kv_cstr(&f->w, "arch", "llama");
  ipc_w_kv_u64(&f->w, "n_ctx", 256);
  ipc_w_kv_bool(&f->w, "default", true);
  if (chat_template) ipc_w_kv_cstr(&f->w, "chat_template", chat_template);
  ipc_w_close(&f->w);
  fake_send(f);
  ipc_msg_free(m);
}

void fake_chunk(struct fake *f, uint32_t id, const char *text, uint32_t token) {
  ipc_w_notification(&f->w, "generate.chunk");
  ipc_w_map(&f->w, 3);
  ipc_w_kv_u64(&f->w, "id", id);
  ipc_w_kv_cstr(&f->w, "text", text);
  ipc_w_key(&f->w, "tokens");
  ipc_w_array(&f->w, 1);
  ipc_w_u64(&f->w, token);
  fake_send(f);
}

void fake_gen_result(struct fake *f, uint32_t id, const char *text, const char *finish,
                     uint64_t completion_tokens) {
  ipc_w_result(&f->w, id);
  ipc_w_map_open(&f->w);
  ipc_w_kv_cstr(&f->w, "text", text);
  ipc_w_kv_cstr(&f->w, "finish_reason", finish);
  ipc_w_kv_u64(&f->w, "prompt_tokens", 5);
  ipc_w_kv_u64(&f->w, "completion_tokens", completion_tokens);
  ipc_w_kv_u64(&f->w, "cached_tokens", 2);
  ipc_w_key(&f->w, "timings");
  ipc_w_map(&f->w, 5);
  ipc_w_kv_f64(&f->w, "queue_ms", 0.5);
  ipc_w_kv_f64(&f->w, "prefill_ms", 3.25);
  ipc_w_kv_f64(&f->w, "decode_ms", 20);
  ipc_w_kv_f64(&f->w, "ttft_ms", 4);
  ipc_w_kv_f64(&f->w, "tokens_per_s", 150);
  ipc_w_close(&f->w);
  fake_send(f);
}

void fake_error(struct fake *f, uint32_t id, int code, const char *message) {
  ipc_w_error(&f->w, id, code, message);
  fake_send(f);
}

bool fake_saw(const struct fake *f, const char *method) {
  for (size_t i = 0; i < f->n_methods; i++)
    if (!strcmp(f->methods[i], method)) return true;
  return false;
}

static void *thread_main(void *arg) {
  struct fake *f = arg;
  if (!wait_readable(f->lfd)) {
    fake_fail(f, "no client connected");
    return NULL;
  }
  f->cfd = accept4(f->lfd, NULL, NULL, SOCK_CLOEXEC);
  if (f->cfd < 0) {
    fake_fail(f, "accept: %s", strerror(errno));
    return NULL;
  }
  f->script(f);
  /* Let the client finish (it may still send session.close or a cancel) and close first. */
  struct ipc_msg *m;
  while ((m = fake_recv(f)) != NULL)
    ipc_msg_free(m);
  fake_hang_up(f);
  return NULL;
}

int fake_start(struct fake *f, void (*script)(struct fake *f), void *ud) {
  memset(f, 0, sizeof *f);
  f->cfd = -1;
  f->script = script;
  f->ud = ud;
  ipc_dec_init(&f->dec, IPC_MAX_FRAME_BYTES);
  ipc_w_init(&f->w, IPC_MAX_REPLY_BYTES);
  snprintf(f->path, sizeof f->path, "%s/fake%d.sock", kt_tmp_dir(), counter++);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", f->path);
  f->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (f->lfd < 0 || bind(f->lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(f->lfd, 4) < 0) {
    fake_fail(f, "listen on %s: %s", f->path, strerror(errno));
    return -1;
  }
  if (pthread_create(&f->th, NULL, thread_main, f) != 0) {
    fake_fail(f, "pthread_create failed");
    return -1;
  }
  f->started = true;
  return 0;
}

int fake_join(struct fake *f) {
  if (f->started) pthread_join(f->th, NULL);
  f->started = false;
  if (f->lfd >= 0) close(f->lfd);
  f->lfd = -1;
  fake_hang_up(f);
  unlink(f->path);
  ipc_dec_destroy(&f->dec);
  ipc_w_destroy(&f->w);
  return f->error[0] ? -1 : 0;
}
