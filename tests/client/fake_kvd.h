/* fake_kvd: a scripted stand-in for the daemon, for testing libkvd and kvctl without it.
 *
 * fake_start() listens on a fresh Unix socket in the test's temp folder and runs a script on a
 * thread: the script accepts nothing itself, it is handed the first connection and talks to it
 * with the real codec (ipc_dec to read the client's requests, ipc_w to answer). Everything
 * blocking has a timeout, so a client that hangs fails the test instead of hanging it. After the
 * script returns, the fake waits for the client to close its end. */
#ifndef FAKE_KVD_H
#define FAKE_KVD_H

#include "ipc.h"

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>

#define FAKE_TIMEOUT_MS 5000

struct fake {
  char path[108];
  int lfd, cfd;
  pthread_t th;
  bool started;
  void (*script)(struct fake *f);
  void *ud;
  struct ipc_dec dec;
  struct ipc_w w;
  char error[512];      /* the script's first failure; "" when all went as expected */
  char methods[64][40]; /* every request's method, in arrival order */
  size_t n_methods;
};

/* Listens on f->path and starts script on a thread; 0 or -1. */
int fake_start(struct fake *f, void (*script)(struct fake *f), void *ud);
/* Waits for the thread and closes everything; 0, or -1 when the script failed (f->error). */
int fake_join(struct fake *f);

void fake_fail(struct fake *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The client's next message; NULL at end of stream or on failure (timeout, malformed). */
struct ipc_msg *fake_recv(struct fake *f);
/* The next message, which must be a request for method; NULL (and a failure) otherwise. */
struct ipc_msg *fake_expect(struct fake *f, const char *method);
/* Ends the message in f->w and writes it (and anything before it). */
void fake_send(struct fake *f);
void fake_send_raw(struct fake *f, const void *data, size_t len);
/* Closes the client's connection now. */
void fake_hang_up(struct fake *f);

/* Common exchanges. */
void fake_hello(struct fake *f);
/* Answers a models.list with one default llama model called `name` whose chat template is
 * `chat_template` (NULL: not said). kvctl asks before a one-shot prompt whether to send it as a
 * chat message. */
void fake_models_list(struct fake *f, const char *name, const char *chat_template);
void fake_chunk(struct fake *f, uint32_t id, const char *text, uint32_t token);
void fake_gen_result(struct fake *f, uint32_t id, const char *text, const char *finish,
                     uint64_t completion_tokens);
void fake_error(struct fake *f, uint32_t id, int code, const char *message);
/* Whether method was among the requests received. */
bool fake_saw(const struct fake *f, const char *method);

#endif
