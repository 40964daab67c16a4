/* libkvd: the C client library of the kvd inference daemon.
 *
 * libkvd talks to kvd over its Unix socket in msgpack-rpc (ipc/PROTOCOL.md is the contract). It
 * offers two ways to use one connection, which can be mixed:
 *
 *   - a blocking API: kvd_generate(), kvd_tokenize(), kvd_status() ... send a request and wait
 *     for its answer, calling the chunk callback for each piece of streamed text on the way;
 *   - an event-loop API for GUI programs that must not block: put kvd_client_fd() in your loop
 *     (GLib, Qt, libuv, poll), call kvd_client_process() when it is readable and
 *     kvd_client_flush() when kvd_client_want_write() says output is pending (and the fd is
 *     writable); kvd_generate_async() starts a generation whose chunks and end arrive as callbacks
 *     from kvd_client_process().
 *
 *   struct kvd_client *c;
 *   if (kvd_client_connect(NULL, &c) < 0) { puts(kvd_client_last_error(NULL)); return 3; }
 *   struct kvd_gen_params p;
 *   kvd_gen_params_init(&p);
 *   p.prompt = "Once upon a time";
 *   struct kvd_gen_result *r;
 *   if (kvd_generate(c, &p, NULL, NULL, &r) == 0) puts(r->text);
 *   kvd_gen_result_free(r);
 *   kvd_client_close(c);
 *
 * Errors. Every fallible function returns 0 (or a count) on success and a negative KVD_* code
 * (kvd_error.h) on failure. A failure reported by the server comes back as the server's code, and
 * kvd_client_last_error() holds the server's message; local failures put an explanation there too.
 * Outputs (ret_*) are written only on success. kvd_strerror() names a code.
 *
 * Memory. Objects the library returns belong to the caller, who releases each with its _free
 * function (all accept NULL); plain arrays and strings (kvd_tokenize(), kvd_detokenize()) with
 * free(). Pointers passed to callbacks are valid only during the callback.
 *
 * Threads. A struct kvd_client is not thread-safe: use each client from one thread at a time (or
 * guard it with your own lock); callbacks run on the thread that called into the library, from
 * inside kvd_client_process() or a blocking call. Distinct clients share nothing and may be used
 * from different threads at once. The library keeps no global state except the per-thread message
 * of the last failed kvd_client_connect(). It never raises SIGPIPE (a vanished daemon is an error
 * return, not a signal) and installs no signal handlers.
 *
 * ABI. The structs below are part of libkvd.so.0. Structs the library allocates (results) may
 * grow at their end in a later 0.x; structs the caller allocates (struct kvd_gen_params,
 * struct kvd_message) change only with a new soname.
 *
 * Callbacks. From a callback you may call the non-blocking functions (kvd_generate_async,
 * kvd_cancel, kvd_client_flush and the getters); a blocking call or kvd_client_process() from a
 * callback fails with KVD_EBUSY, and kvd_client_close() must not be called from one. */
#ifndef KVD_H
#define KVD_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The error codes: the same table the daemon uses (installed beside this header). */
#include "kvd_error.h"

#if defined(__GNUC__) || defined(__clang__)
#define KVD_API __attribute__((visibility("default")))
#else
#define KVD_API
#endif

/* The library's version, e.g. "0.1.0". */
KVD_API const char *kvd_library_version(void);

/* kvd_error.h's functions, exported by the library. */
KVD_API const char *kvd_strerror(int code);
KVD_API int kvd_error_to_wire(int code);
KVD_API int kvd_error_from_wire(int wire);

/* ---- Connection ---------------------------------------------------------------------------- */

struct kvd_client;

/* Connects to kvd and says hello (agreeing on the protocol version). socket_path NULL picks, in
 * order: $KVD_SOCKET; $XDG_RUNTIME_DIR/kvd/kvd.sock if it exists; /run/kvd/kvd.sock. Fails with
 * KVD_ECONNREFUSED when no daemon listens there (the message says how to start one),
 * KVD_EACCES when the socket's permissions keep us out, KVD_EAGAIN when kvd accepts but does not
 * answer hello within 10 s. On failure kvd_client_last_error(NULL) gives the message. */
KVD_API int kvd_client_connect(const char *socket_path, struct kvd_client **ret);
/* Closes the connection; the server cancels its requests and closes its sessions. Requests still
 * in flight are dropped without their callbacks. NULL is a no-op. Never call from a callback. */
KVD_API void kvd_client_close(struct kvd_client *c);

/* The path kvd_client_connect(NULL, ...) would use, written to buf (NUL-terminated). The length
 * of the path, or KVD_E2BIG when it does not fit in size bytes. */
KVD_API int kvd_default_socket_path(char *buf, size_t size);

/* The message of the last failure on c; for c == NULL, of the last failed kvd_client_connect()
 * on this thread. Never NULL ("" before any failure); valid until the next call on c. */
KVD_API const char *kvd_client_last_error(const struct kvd_client *c);
/* What the server said in hello: its version ("0.1.0"), its default model (NULL when it had none
 * loaded then), and whether it has an optional feature ("stream", "logprobs", "sessions", "chat",
 * "cancel"). */
KVD_API const char *kvd_client_server_version(const struct kvd_client *c);
KVD_API const char *kvd_client_default_model(const struct kvd_client *c);
KVD_API bool kvd_client_has_capability(const struct kvd_client *c, const char *capability);
/* False once the connection is lost (the daemon closed it, or sent something unreadable): every
 * call then fails, and the client is only good for kvd_client_close(). */
KVD_API bool kvd_client_connected(const struct kvd_client *c);
/* Longest a blocking call waits without hearing from the server, in milliseconds; 0 or below
 * waits for ever (the default: a long prompt can take a while before its first chunk). A call
 * that times out fails with KVD_EAGAIN; a generate it started is cancelled. */
KVD_API void kvd_client_set_timeout(struct kvd_client *c, int timeout_ms);

/* ---- Generation ---------------------------------------------------------------------------- */

/* One chat message. */
struct kvd_message {
  const char *role; /* "system", "user" or "assistant" */
  const char *content;
};

/* What to generate. Start from kvd_gen_params_init(), which leaves every option unset: unset
 * options are not sent, so the server's defaults (PROTOCOL.md) apply. Unset means NULL for
 * pointers, NAN for doubles and a negative value for the int64_t fields. */
struct kvd_gen_params {
  const char *prompt;                 /* raw prompt text; or */
  const struct kvd_message *messages; /* chat messages, rendered with the model's chat template */
  size_t n_messages;
  const char *model; /* NULL: the server's default model */
  int64_t max_tokens;
  double temperature; /* 0 or below: greedy */
  int64_t top_k;      /* 0: off */
  double top_p;       /* 1: off */
  double min_p;       /* 0: off */
  double repeat_penalty, frequency_penalty, presence_penalty;
  int64_t seed;            /* unset: random; the same seed, prompt and params give the same text */
  const char *const *stop; /* stop strings (not included in the text) */
  size_t n_stop;
  bool stream;       /* stream chunks; implied when a chunk callback is given */
  uint32_t logprobs; /* 0: none; k: each token's log-probability and the k most likely */
  int64_t session;   /* continue this session (kvd_session_open); unset: none */
  int thinking;      /* reasoning templates (qwen3, deepseek-r1): 0 answers without thinking
                        first, 1 thinks; unset (negative): as the template does */
  /* At the context's end: "shift", "window" or "error" (PROTOCOL.md, Past the context); NULL:
   * the model's. keep: tokens a shift never drops; sinks: tokens a window keeps (unset: < 0). */
  const char *overflow;
  int64_t keep, sinks;
  /* Speculative decoding (PROTOCOL.md): "auto", "off", "lookup" or "draft" (the model's draft
   * model; KVD_E_UNSUPPORTED on a model without one); NULL: the daemon's --speculative. The
   * text is the same under every mode. */
  const char *speculative;
};

KVD_API void kvd_gen_params_init(struct kvd_gen_params *p);

/* One of the k most likely tokens at a position. */
struct kvd_top_logprob {
  uint32_t id;
  double logprob;
};

/* A generated token with its natural-log probability. */
struct kvd_logprob {
  uint32_t id;
  char *text; /* its text; may be empty inside a UTF-8 sequence */
  double logprob;
  struct kvd_top_logprob *top; /* most likely first */
  size_t n_top;
};

/* One streamed piece of a generation. */
struct kvd_chunk {
  uint32_t id;      /* request id of the generate */
  const char *text; /* NUL-terminated; never splits a UTF-8 sequence, so it may be empty */
  size_t text_len;
  const uint32_t *tokens; /* token ids this chunk covers */
  size_t n_tokens;
  const struct kvd_logprob *logprobs; /* when logprobs were asked for */
  size_t n_logprobs;
};

/* Called for each chunk, in order. Return 0 to go on, nonzero to cancel the generation: a cancel
 * is sent, no further chunks are reported, and the generation ends with KVD_FINISH_CANCELLED. */
typedef int (*kvd_chunk_fn)(void *ud, const struct kvd_chunk *chunk);

enum kvd_finish {
  KVD_FINISH_OTHER,     /* a reason this library does not know (see finish_reason) */
  KVD_FINISH_STOP,      /* end-of-generation token or a stop string */
  KVD_FINISH_LENGTH,    /* max_tokens or the end of the context */
  KVD_FINISH_CANCELLED, /* kvd_cancel(), a chunk callback's nonzero return */
  KVD_FINISH_ERROR,     /* failed after producing tokens: see error, error_message */
};

struct kvd_timings {
  double queue_ms, prefill_ms, decode_ms, ttft_ms, tokens_per_s;
};

struct kvd_gen_result {
  uint32_t id;     /* request id */
  char *text;      /* the whole completion, NUL-terminated: the chunks' text when streamed */
  size_t text_len; /* bytes in text */
  enum kvd_finish finish;
  char *finish_reason; /* as the server sent it: "stop", "length", "cancelled", "error" */
  uint64_t prompt_tokens, completion_tokens, cached_tokens;
  uint64_t context_shifts; /* times the sequence dropped old tokens to go past the context */
  struct kvd_timings timings;
  uint32_t *tokens; /* ids of the generated tokens, from the chunks (streaming only) */
  size_t n_tokens;
  struct kvd_logprob *logprobs; /* one per token when logprobs were asked for */
  size_t n_logprobs;
  int error;           /* KVD_FINISH_ERROR: the kvd code of what went wrong; else 0 */
  char *error_message; /* and its message; else NULL */
  /* The result's timings.draft_tokens and accepted_tokens: tokens drafted for it (speculative
   * decoding) and how many of them were kept. Here rather than in struct kvd_timings, which sits
   * in the middle of this struct: a result grows only at its end (ABI, above). */
  uint64_t draft_tokens, accepted_tokens;
};

KVD_API void kvd_gen_result_free(struct kvd_gen_result *r);

/* Generates and waits for the end. on_chunk (may be NULL) gets each streamed piece. Returns 0 when
 * the server produced a result, whatever its finish reason: a generation that fails after some
 * tokens ends with KVD_FINISH_ERROR and the partial text, so check (*ret)->finish. ret may be
 * NULL. */
KVD_API int kvd_generate(struct kvd_client *c, const struct kvd_gen_params *p,
                         kvd_chunk_fn on_chunk, void *ud, struct kvd_gen_result **ret);
/* kvd_generate with p's messages replaced by these; p may be NULL for all defaults. */
KVD_API int kvd_chat(struct kvd_client *c, const struct kvd_message *messages, size_t n_messages,
                     const struct kvd_gen_params *p, kvd_chunk_fn on_chunk, void *ud,
                     struct kvd_gen_result **ret);

/* ---- Event-loop API ------------------------------------------------------------------------ */

/* Called once when an async generation ends. rc is 0 when the server answered with a result (any
 * finish reason), else the negative code of the failure (the server refused the request, or the
 * connection was lost): then result->finish is KVD_FINISH_ERROR and result->error, ->error_message
 * say why, and result->text holds what was streamed before. result is never NULL and is freed by
 * the library when the callback returns. */
typedef void (*kvd_done_fn)(void *ud, int rc, const struct kvd_gen_result *result);

/* The socket to watch for readability (and writability while kvd_client_want_write()). It stays
 * the same for the client's life; after kvd_client_process() failed, stop watching it. */
KVD_API int kvd_client_fd(const struct kvd_client *c);
/* Reads whatever arrived, without blocking, and dispatches it: chunk and done callbacks run from
 * here. Then writes pending output that fits. Returns the number of messages handled, or a
 * negative code when the connection is lost (every request in flight has then ended with that
 * code, and every later call returns it). */
KVD_API int kvd_client_process(struct kvd_client *c);
/* Whether requests are waiting to be written (the socket was full). */
KVD_API bool kvd_client_want_write(const struct kvd_client *c);
/* Writes pending output without blocking: 0 when all of it is out, 1 when some remains (wait for
 * the fd to be writable and call again), or a negative code when the connection is lost. */
KVD_API int kvd_client_flush(struct kvd_client *c);
/* Requests in flight: async generations and cancels not yet answered. */
KVD_API size_t kvd_client_pending(const struct kvd_client *c);

/* Starts a generation and returns at once with its request id. on_chunk may be NULL; on_done is
 * required. ud is passed to both. */
KVD_API int kvd_generate_async(struct kvd_client *c, const struct kvd_gen_params *p,
                               kvd_chunk_fn on_chunk, kvd_done_fn on_done, void *ud,
                               uint32_t *ret_id);
/* Asks the server to stop generation id (async or blocking, from a chunk callback) and returns
 * at once; the generation then ends with KVD_FINISH_CANCELLED and the text so far, and reports no
 * more chunks. KVD_ENOENT when no generation id is in flight on c. */
KVD_API int kvd_cancel(struct kvd_client *c, uint32_t id);

/* ---- Tokens -------------------------------------------------------------------------------- */

#define KVD_TOKENIZE_ADD_SPECIAL 1u   /* add BOS/EOS as the model asks (the server's default) */
#define KVD_TOKENIZE_PARSE_SPECIAL 2u /* turn special-token text such as "<s>" into its id */

/* Text to token ids (free() *ret_tokens). model NULL: the default model. */
KVD_API int kvd_tokenize(struct kvd_client *c, const char *model, const char *text, unsigned flags,
                         uint32_t **ret_tokens, size_t *ret_n);
/* Token ids to text (free() *ret_text; NUL-terminated). */
KVD_API int kvd_detokenize(struct kvd_client *c, const char *model, const uint32_t *tokens,
                           size_t n, char **ret_text);

/* ---- Models -------------------------------------------------------------------------------- */

struct kvd_model_info {
  char *name; /* the name requests use */
  char *path; /* GGUF file */
  char *arch; /* "llama" ... */
  uint64_t n_ctx, n_vocab, n_params;
  uint64_t bytes;  /* device memory of its weights */
  bool is_default; /* the model requests get when they name none */
  char *chat_template;         /* the chat template family its messages use; NULL if not said */
  char *chat_template_warning; /* set when the file's template was not recognised */
  char *kv_type;               /* how its KV cache stores keys and values: "f16", "q8_0", ... */
  uint64_t kv_bytes_per_token; /* KV cache bytes one token takes, all layers; 0 if not said */
};

struct kvd_model_list {
  struct kvd_model_info *models;
  size_t n;
};

KVD_API int kvd_models_list(struct kvd_client *c, struct kvd_model_list **ret);
KVD_API void kvd_model_list_free(struct kvd_model_list *l);
/* Loads a GGUF file (an absolute path on the daemon's machine) under name (NULL: the file name
 * without .gguf); waits until the weights are resident. ret (may be NULL) gets name, path, arch,
 * n_ctx and n_vocab. */
KVD_API int kvd_models_load(struct kvd_client *c, const char *path, const char *name,
                            struct kvd_model_info **ret);
/* The same with a chat template family (PROTOCOL.md, models.load: "llama3", "chatml", ...) used
 * over the one the file implies; chat_template NULL is kvd_models_load. */
KVD_API int kvd_models_load_template(struct kvd_client *c, const char *path, const char *name,
                                     const char *chat_template, struct kvd_model_info **ret);
/* Everything models.load takes; NULL fields are not sent (the daemon's defaults apply). */
struct kvd_load_opts {
  const char *name;          /* the name requests use; NULL: the file name without .gguf */
  const char *chat_template; /* a chat template family over the file's */
  const char *kv_type;       /* "f32", "f16", "q8_0" or "q4_0"; NULL: the daemon's --kv-type */
};
/* kvd_models_load with options (opts NULL: none). */
KVD_API int kvd_models_load_opts(struct kvd_client *c, const char *path,
                                 const struct kvd_load_opts *opts, struct kvd_model_info **ret);
KVD_API void kvd_model_info_free(struct kvd_model_info *m);
KVD_API int kvd_models_unload(struct kvd_client *c, const char *name);

/* ---- Sessions ------------------------------------------------------------------------------ */

/* A session keeps a conversation's tokens and KV cache on the server: generate with
 * kvd_gen_params.session set and send only the new turn. Sessions die with the connection. */
KVD_API int kvd_session_open(struct kvd_client *c, const char *model, uint64_t *ret_session);
KVD_API int kvd_session_close(struct kvd_client *c, uint64_t session);
/* A copy of session sharing its history (KV blocks are shared until the two diverge). */
KVD_API int kvd_session_fork(struct kvd_client *c, uint64_t session, uint64_t *ret_session);
/* Saved sessions outlive connections and daemon restarts. kvd_session_save writes session (idle)
 * under name (1 to 64 of A-Z a-z 0-9 . _ -) in the daemon's sessions folder; *ret_tokens (may be
 * NULL) = its history's length. kvd_session_restore opens a saved one on this connection (model
 * NULL: the default model) and continues it exactly; KVD_ENOENT when there is no such name,
 * KVD_E_MISMATCH for a file of another model or KV type, KVD_E_CORRUPT for a damaged one.
 * kvd_session_delete removes the file. */
KVD_API int kvd_session_save(struct kvd_client *c, uint64_t session, const char *name,
                             uint64_t *ret_tokens);
KVD_API int kvd_session_restore(struct kvd_client *c, const char *name, const char *model,
                                uint64_t *ret_session, uint64_t *ret_tokens);
KVD_API int kvd_session_delete(struct kvd_client *c, const char *name);
/* The saved sessions, by name (session.list). */
struct kvd_saved_session {
  char *name;
  char *model;   /* the model it was saved from */
  char *kv_type; /* "f16" ... */
  uint64_t tokens, bytes;
  uint64_t saved; /* seconds since the Unix epoch */
  bool loadable;  /* a loaded model can restore it now */
};
struct kvd_saved_list {
  struct kvd_saved_session *sessions;
  size_t n;
};
KVD_API int kvd_sessions_list(struct kvd_client *c, struct kvd_saved_list **ret);
KVD_API void kvd_saved_list_free(struct kvd_saved_list *l);

/* ---- Status -------------------------------------------------------------------------------- */

struct kvd_device_info {
  uint64_t index;
  char *name;
  char *type; /* "discrete", "integrated", "virtual", "cpu" */
  uint64_t memory_total, memory_used;
};

struct kvd_request_info {
  uint32_t id; /* msgid on its connection */
  char *model;
  char *state; /* "queued", "prefill", "decode" */
  uint64_t prompt_tokens, completion_tokens, cached_tokens;
  double queue_ms, prefill_ms, decode_ms, tokens_per_s;
};

/* The server's status, parsed, and the whole answer as JSON text in json: it also carries keys
 * a newer server adds and this library does not know. Counters the server left out read 0. */
struct kvd_server_status {
  char *version;
  uint64_t uptime_ms, connections;
  uint64_t queue_depth; /* generate requests waiting to start */
  uint64_t running;     /* in prefill or decode */
  struct {
    uint64_t host, device, weights, kv; /* bytes */
  } memory;
  struct {
    uint64_t block_tokens, blocks_total, blocks_used, blocks_free, blocks_cached;
  } kv;
  struct kvd_device_info *devices;
  size_t n_devices;
  struct kvd_model_info *models;
  size_t n_models;
  struct kvd_request_info *requests;
  size_t n_requests;
  char *json;
};

KVD_API int kvd_status(struct kvd_client *c, struct kvd_server_status **ret);
KVD_API void kvd_server_status_free(struct kvd_server_status *s);

#ifdef __cplusplus
}
#endif

#endif
