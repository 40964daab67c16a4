/* libkvd internals shared by client/kvd_*.c: the client object, the requests in flight and small
 * helpers. Nothing here is exported; everything is prefixed kvd__. */
#ifndef KVD_INTERNAL_H
#define KVD_INTERNAL_H

#include "kvd.h"

#include "ipc.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A growable byte buffer. Out of memory is sticky (oom) so a caller appends in straight-line code
 * and checks once, the way ipc_w works. */
struct kvd__buf {
  char *p;
  size_t len, cap;
  bool oom;
};

void kvd__buf_add(struct kvd__buf *b, const void *data, size_t n);
void kvd__buf_puts(struct kvd__buf *b, const char *s);
void kvd__buf_printf(struct kvd__buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* The contents as a NUL-terminated heap string ("" when empty; NULL when out of memory), and
 * the buffer emptied. */
char *kvd__buf_steal(struct kvd__buf *b, size_t *ret_len);
void kvd__buf_destroy(struct kvd__buf *b);

/* strndup for a msgpack string (which need not be NUL-terminated); NULL when out of memory. */
char *kvd__strndup(const char *s, size_t n);

/* What a request in flight is waiting for.
 *   CALL    a blocking call: the response is handed to its waiter as it is.
 *   GEN     a generate: chunks are accumulated (and passed to on_chunk), then a result is built.
 *   IGNORE  a request whose answer nobody needs (cancel). */
enum kvd__req_kind { KVD__REQ_CALL, KVD__REQ_GEN, KVD__REQ_IGNORE };

struct kvd__req {
  struct kvd__req *next;
  uint32_t id;
  enum kvd__req_kind kind;
  enum ipc_method method;
  bool sync;      /* a blocking call waits for it: it stays with the waiter after it ends */
  bool done;      /* sync: the answer (or the failure) is in rc, resp, result */
  bool abandoned; /* sync: the waiter timed out and left; drop the answer when it comes */
  int rc;
  struct ipc_msg *resp; /* CALL: the response */
  /* GEN */
  kvd_chunk_fn on_chunk;
  kvd_done_fn on_done;
  void *ud;
  bool cancelled; /* a cancel was sent: report no more chunks */
  bool oom;       /* a chunk could not be kept: the generation fails with KVD_ENOMEM */
  struct kvd__buf text;
  uint32_t *tokens;
  size_t n_tokens, cap_tokens;
  struct kvd_logprob *logprobs;
  size_t n_logprobs, cap_logprobs;
  struct kvd_gen_result *result; /* sync GEN: the result, once done with rc 0 */
};

struct kvd_client {
  int fd;
  struct ipc_dec dec; /* bytes from the server */
  struct ipc_w w;     /* messages to the server: [0, w_sent) are written, the rest pending */
  size_t w_sent;
  uint32_t next_id;
  struct kvd__req *reqs; /* in flight, newest first */
  size_t n_reqs;
  int broken;     /* 0, or the code the connection was lost with (sticky) */
  int cb_depth;   /* > 0 while a user callback runs */
  int busy;       /* > 0 while the library holds request pointers (dispatch): a lost
                     connection fails the requests only once it is back at the top */
  int timeout_ms; /* blocking calls; <= 0 for ever */
  char *server_version, *default_model;
  char **caps;
  size_t n_caps;
  char lost[256]; /* why the connection was lost */
  char err[512];  /* kvd_client_last_error() */
};

/* Sets the client's last error message and returns rc. */
int kvd__error(struct kvd_client *c, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Starts a request: checks the client can take one (not lost; not a blocking call from a
 * callback), picks a msgid and writes the request header into c->w. The caller then writes
 * exactly one params map and calls kvd__send(). NULL with *ret_rc set on failure. */
struct kvd__req *kvd__begin(struct kvd_client *c, const char *method, enum ipc_method mid,
                            enum kvd__req_kind kind, bool sync, int *ret_rc);
/* Ends the message, puts req in flight and writes what the socket takes. On failure req is
 * freed (and the message dropped). */
int kvd__send(struct kvd_client *c, struct kvd__req *req);
/* Waits for a sync request to end; then the caller owns req (kvd__req_free), unless the wait
 * timed out (KVD_EAGAIN with req->abandoned), which leaves it to the client. */
int kvd__wait(struct kvd_client *c, struct kvd__req *req);
/* A blocking call of a request started with kvd__begin(kind CALL, sync): send, wait, check the
 * server's error and the result's shape against api.json. 0 and *ret_msg (ipc_msg_free it), whose
 * result is a map with the declared keys of their declared types. */
int kvd__call(struct kvd_client *c, struct kvd__req *req, struct ipc_msg **ret_msg);
void kvd__req_free(struct kvd__req *req);
struct kvd__req *kvd__find(struct kvd_client *c, uint32_t id);
/* Queues a cancel for generate req; it reports no more chunks. */
int kvd__cancel_req(struct kvd_client *c, struct kvd__req *req);

/* kvd_gen.c: a generate.chunk notification; a response to (or the failure of) generate req,
 * which has been taken out of the list: builds the result, then hands it to the waiter or
 * on_done (and frees req when async). m may be NULL (rc < 0 then). */
int kvd__gen_chunk(struct kvd_client *c, const struct ipc_msg *m);
void kvd__gen_end(struct kvd_client *c, struct kvd__req *req, struct ipc_msg *m, int rc);
void kvd__gen_release(struct kvd__req *req);

/* kvd_methods.c: a model map of models.list/status into m; 0 or KVD_ENOMEM. */
int kvd__model_info(const msgpack_object *map, struct kvd_model_info *m);
void kvd__model_info_clear(struct kvd_model_info *m);

/* kvd_json.c: o as JSON text, appended to b. Strings are copied as they are (the protocol sends
 * UTF-8) with JSON's escapes; binary and extension values become null, non-finite floats null. */
void kvd__json(struct kvd__buf *b, const msgpack_object *o);

#endif
