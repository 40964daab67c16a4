/* The server: the libuv loop thread that owns the socket, connections, sessions and models.
 *
 * Anatomy of a request: socket bytes -> srv_conn (ipc_dec frames) -> dispatch by method id ->
 * handler (srv_methods.c, srv_gen.c) -> for generate, a sched_req submitted to the model's engine
 * thread -> engine step -> sched events -> uv_async -> srv_model drains them -> srv_gen turns
 * tokens into text, chunks and the final response -> srv_conn writes them.
 *
 * Everything here runs on the loop thread, except model loading (libuv's threadpool) and the
 * engine threads, which talk to it only through sched's queues. */
#ifndef KVD_SRV_H
#define KVD_SRV_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "chat.h"
#include "config.h"
#include "gguf.h"
#include "ipc.h"
#include "scheduler.h"
#include "tok.h"

/* Generate requests that may wait for their first token per model before new ones get KVD_EBUSY
 * (each connection is also capped at IPC_MAX_INFLIGHT requests). */
#define SRV_MAX_QUEUED 256
/* Prompts longer than this are tokenized on libuv's threadpool, not on the loop thread. */
#define SRV_TOKENIZE_INLINE (16u << 10)

struct srv;
struct srv_conn;
struct srv_gen;
struct gpu_device; /* opaque here: the daemon owns it (daemon.c), models are built on it */

/* What the daemon tells the server about the device it owns: passed through to the engines,
 * and read for `status`. */
struct srv_device_mem {
  uint64_t reserved;  /* device memory kvd holds */
  uint64_t allocated; /* of which handed out to buffers */
};
struct srv_device {
  struct gpu_device *dev;
  const char *name;
  const char *type; /* discrete, integrated, virtual, cpu, other */
  uint64_t memory_total;
  void (*memory)(struct gpu_device *dev, struct srv_device_mem *ret);
};

struct srv_model {
  struct srv *srv;
  char name[IPC_MAX_NAME_BYTES + 1];
  char *path;
  struct gguf_file *f;
  struct tok *tok;
  enum chat_family chat;
  enum chat_source chat_source;
  bool chat_forced; /* chat was configured (models.load / --chat-template): keep it */
  const char *kv_type; /* models.load's kv_type (a kv_type_name() string), or NULL: --kv-type */
  enum kv_overflow overflow; /* past the context, unless a request says: models.load's, else
                                --overflow */
  bool overflow_set;         /* models.load gave it */
  uint64_t hash[2];          /* the file's content hash (store_model_hash): what saved state
                                of this model is recognised by */
  /* Its draft model (speculative decoding), when loaded with one: the path asked for, the file
   * (kept open as long as the draft engine, which the scheduler owns and frees before it), the
   * name clients see (the file name without .gguf) and its KV bytes per token (for status). */
  char *draft_path;
  struct gguf_file *draft_f;
  char draft_name[IPC_MAX_NAME_BYTES + 1];
  uint64_t draft_kv_bytes_per_token;
  struct sched *sched;
  uv_async_t async;
  bool async_open;
  uint32_t n_active; /* generate requests not yet DONE, sessions open */
  bool unloading;    /* refuse new work; freed when n_active reaches 0 */
  struct srv_model *next;
};

struct srv_session {
  uint32_t id;
  struct srv_conn *conn; /* NULL once the connection closed */
  struct srv_model *m;
  struct sched_session *ss;
  bool busy;    /* a generate runs on it */
  bool closing; /* closed while busy: freed when that generate ends */
  bool started; /* has had a prompt (no BOS for later ones) */
  bool keep_set; /* keep was fixed by the first turn */
  uint32_t keep; /* the leading tokens a context shift keeps (its system prompt) */
  struct srv_session *next;
};

struct srv_conn {
  struct srv *srv;
  uv_pipe_t pipe;
  uint64_t serial;
  struct ipc_dec dec;
  struct ipc_w w;
  char client[IPC_MAX_NAME_BYTES + 1];
  uint32_t protocol;
  /* Msgids of the requests awaiting a response: a request reusing one is refused (KVD_EEXIST),
   * and a generate answered early (stop string) leaves it at once. */
  uint32_t inflight_ids[IPC_MAX_INFLIGHT];
  int16_t inflight_methods[IPC_MAX_INFLIGHT]; /* enum ipc_method of each, for --check-results */
  uint32_t inflight;
  double t_active; /* last request received (for choosing whom to evict when full) */
  bool eof;        /* the client half-closed: answer what is in flight, then close */
  bool finishing;  /* closing once its queued output is written (uv_shutdown) */
  uv_shutdown_t shutdown_req;
  struct srv_gen *gens; /* generate requests of this connection */
  struct srv_session *sessions;
  uint32_t n_sessions, next_session_id;
  bool closing;
  bool reading;
  struct srv_conn *prev, *next;
};

struct srv_stats {
  uint64_t connections, requests, errors, generated_tokens, prompt_tokens, cached_tokens;
  double last_ttft_ms, last_tpot_ms;
};

struct srv {
  uv_loop_t *loop;
  const struct kvd_config *cfg;
  uv_pipe_t listener;
  bool listening;
  bool own_socket; /* we bound the path (not socket activation): unlink it when done */
  dev_t sock_dev;  /* ... if it is still that socket */
  ino_t sock_ino;
  uv_signal_t sig_term, sig_int, sig_hup;
  bool signals; /* the signal handles are initialised */
  struct srv_device device;
  struct srv_model *models;
  struct srv_conn *conns;
  uint32_t n_conns;
  uint64_t conn_serial;
  bool draining;
  uv_timer_t drain_timer; /* bounds how long the drain waits for slow readers */
  bool drain_timer_open;
  struct srv_stats stats;
  double started;
};

/* srv.c. The daemon (daemon.c) owns the device, then the server: srv_init, the startup model
 * (srv_model_load), srv_start; the loop runs; srv_destroy; then the device goes. */
void srv_init(struct srv *s, uv_loop_t *loop, const struct kvd_config *cfg,
              const struct srv_device *device);
/* Signals, the socket, READY=1. */
int srv_start(struct srv *s);
void srv_destroy(struct srv *s);
/* After a failed srv_start or model load: closes what was opened; run the loop once more, then
 * srv_destroy. */
void srv_abort(struct srv *s);
/* Starts a drain: no new connections or requests; the loop ends when in-flight work is done. */
void srv_drain(struct srv *s);
void srv_maybe_finish(struct srv *s);
double srv_now(void);

/* srv_listen.c */
int srv_listen(struct srv *s);
void srv_listen_unlink(struct srv *s); /* the socket we bound, if it is still the one there */

/* srv_conn.c */
void srv_conn_accept(struct srv *s);
/* Queues the message(s) built in c->w for writing. */
void srv_conn_flush(struct srv_conn *c);
void srv_conn_close(struct srv_conn *c);
/* The open connection with this serial (not closing), or NULL: for work that outlives a call. */
struct srv_conn *srv_conn_find(struct srv *s, uint64_t serial);
/* Closes once everything queued for the client is written (the drain at exit, a half-closed
 * client); srv_conn_close if that cannot be done. */
void srv_conn_finish(struct srv_conn *c);
/* Error response for request id (code is a kvd code); ends the request (inflight--). */
void srv_reply_error(struct srv_conn *c, uint32_t id, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Ends a request whose successful response was just written into c->w. */
void srv_reply_done(struct srv_conn *c, uint32_t id);

/* srv_model.c */
/* chat_template: a family name (chat_family_parse) used over the file's template, or NULL;
 * draft: a draft model's GGUF for it, or NULL (srv_draft.c). */
int srv_model_load(struct srv *s, const char *path, const char *name, const char *chat_template,
                   const char *draft, struct srv_model **ret, char *err, size_t errlen);
void srv_model_unload(struct srv_model *m);
/* The name a file is known by when none is given: its base name without .gguf. */
void srv_model_default_name(const char *path, char *out, size_t n);
struct srv_model *srv_model_find(struct srv *s, const char *name, size_t len);
void srv_model_release(struct srv_model *m); /* n_active-- and free if unloading */
void srv_models_free(struct srv *s);
/* models.load on the threadpool. kv_type: a KV type name for this model over --kv-type, or
 * NULL; draft: a draft model's path, or NULL (all checked by the handler). */
struct srv_load_args {
  const char *path, *name, *chat_template, *kv_type, *overflow, *draft;
};
void srv_model_load_async(struct srv_conn *c, uint32_t id, const struct srv_load_args *a);

/* srv_draft.c: speculative decoding's server side. */
/* "auto", "off", "lookup", "draft" (len bytes, no NUL inside) to a mode; KVD_EINVAL otherwise. */
int srv_spec_parse(const char *s, size_t len, enum sched_spec *ret);
const char *srv_spec_name(enum sched_spec mode);
#define SRV_SPEC_NAMES "auto, off, lookup or draft"
/* Any thread (models.load runs it on the threadpool): opens m->draft_path into m->draft_f,
 * checks its vocabulary is the target's token for token (KVD_E_MISMATCH, err naming the check)
 * and builds its engine on the target's device, KV type and block size with as many KV blocks
 * as the target's pool, so both hold the same tokens. On failure *ret is untouched and err says
 * why; m->draft_f is closed with the model. */
int srv_draft_open(struct srv *s, struct srv_model *m, const struct engine *target,
                   struct engine **ret, char *err, size_t errlen);

/* srv_gen.c */
void srv_gen_event(struct srv_model *model, const struct sched_event *ev);
void srv_gen_cancel_id(struct srv_conn *c, uint32_t id, bool *ret_found);
/* Requests waiting to start and started (prefill or decode), as status reports them. */
void srv_gen_count(struct srv *s, uint32_t *ret_queued, uint32_t *ret_running);
void srv_gen_write_status(struct srv *s, struct ipc_w *w, uint32_t *ret_queued,
                          uint32_t *ret_running);
void srv_gen_cancel_session(struct srv_conn *c, struct srv_session *ss);
void srv_gen_cancel_model(struct srv *s, struct srv_model *m);
/* The connection is going away: cancel its requests; they finish detached. */
void srv_gen_detach_all(struct srv_conn *c);

/* srv_methods.c */
void srv_dispatch(struct srv_conn *c, struct ipc_msg *m);
/* The optional "model" param's model, or an error reply and NULL. */
struct srv_model *srv_model_param(struct srv_conn *c, const struct ipc_msg *msg);

/* srv_session.c */
void srv_session_release(struct srv_session *ss);
/* A new session of c on m around ss (m->n_active++), or NULL (nothing taken) on host OOM. */
struct srv_session *srv_session_add(struct srv_conn *c, struct srv_model *m,
                                    struct sched_session *ss);

/* srv_store.c: session files */
struct store_identity;
void srv_store_event(struct srv_model *m, const struct sched_event *ev);
void srv_store_identity(const struct srv_model *m, struct store_identity *ret);
void srv_sessions_close_all(struct srv_conn *c);

/* Method handlers, srv_h_<method> (dots as underscores), are declared in the generated
 * srv_handlers.h, one per request method of ipc/api.json; they live in srv_methods.c (hello,
 * status, models.list, cancel, tokenize, detokenize), srv_model.c (models.load/unload),
 * srv_gen.c (generate) and srv_session.c (session.*). */
#include "srv_handlers.h"

#endif
