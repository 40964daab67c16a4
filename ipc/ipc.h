/* ipc: kvd's msgpack-rpc codec, shared by the daemon and the client library (no libuv, no Vulkan).
 *
 * ipc/PROTOCOL.md is the contract; this is its C side:
 *   - a resumable decoder (ipc_dec): bytes in, whole messages out, with the frame, nesting and
 *     shape checks of PROTOCOL.md and errors that say whether to answer or hang up;
 *   - accessors for the named arguments in a message's params map (ipc_get_*) and a generic
 *     validator driven by the method table generated from ipc/api.json (ipc_api.h);
 *   - a writer (ipc_w) that builds requests, responses and notifications into one growable buffer.
 *
 * Decoded values are msgpack-c objects (msgpack_object); every string in them is NUL-terminated
 * (its length still counts the bytes, so an embedded NUL can be detected as len != strlen). */
#ifndef KVD_IPC_H
#define KVD_IPC_H

#include "ipc_api.h"
#include "ipc_limits.h"
#include "kvd_error.h"

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- Messages ---------------------------------------------------------------------------- */

/* msgpack-rpc's type tag, element 0 of every message. */
enum ipc_msg_type { IPC_REQUEST = 0, IPC_RESPONSE = 1, IPC_NOTIFICATION = 2 };

/* One decoded message. It lives in its own zone together with its frame bytes and every value
 * in it, so a handler can keep pointers into it until it calls ipc_msg_free() after the reply. */
struct ipc_msg {
  enum ipc_msg_type type;
  uint32_t id;                  /* REQUEST, RESPONSE: the msgid */
  const char *method;           /* REQUEST, NOTIFICATION: NUL-terminated; NULL for RESPONSE */
  size_t method_len;            /* bytes in method */
  enum ipc_method method_id;    /* from api.json; IPC_M_UNKNOWN for any other name, or for a
                                   name api.json declares for the other kind of message */
  const msgpack_object *params; /* REQUEST, NOTIFICATION: the named-argument map (string keys,
                                   none twice), NULL when params was `[]` */
  const msgpack_object *error;  /* RESPONSE: NULL on success, else the error (a map) */
  const msgpack_object *result; /* RESPONSE: the result (a nil object when error is set) */
  size_t frame_bytes;           /* encoded size of the message */
  msgpack_zone *zone;           /* owns everything above; freed by ipc_msg_free() */
};

/* Frees a message and everything allocated from it; NULL is a no-op. */
void ipc_msg_free(struct ipc_msg *m);
/* Request-scoped scratch memory that goes away with ipc_msg_free(); NULL when out of memory. */
void *ipc_msg_alloc(struct ipc_msg *m, size_t n);
/* The kvd code and message of a RESPONSE's error object {code, message}: 0 and NULL for a
 * success. A malformed error object yields KVD_EPROTO with the message "malformed error". */
int ipc_msg_error(const struct ipc_msg *m, const char **ret_message);

/* ---- Decoder ----------------------------------------------------------------------------- */

/* Why ipc_dec_next() failed, and what the connection should do about it. */
struct ipc_dec_err {
  int code;    /* negative kvd code, the same ipc_dec_next() returned */
  bool fatal;  /* framing is lost (oversize frame, bytes that are not msgpack): close the
                  connection without reading more */
  bool has_id; /* the frame was a request whose msgid could be read: answer with an error
                  response for id and go on; when false (and not fatal) close the connection */
  uint32_t id;
  char message[160]; /* for the error response: says what was wrong and where */
};

/* A resumable decoder for one connection's byte stream. Bytes come in through ipc_dec_feed()
 * (or ipc_dec_reserve() + ipc_dec_commit() to read straight into its buffer); ipc_dec_next()
 * returns the messages they complete. It scans each frame once, header by header, keeping its
 * place across calls, so any split of the stream (down to one byte at a time) gives the same
 * messages, and it never looks past the bytes it was given. Fields are private. */
struct ipc_dec {
  char *buf; /* buffered bytes: [head, tail) not yet returned as messages */
  size_t cap, head, tail;
  size_t max_frame; /* frame limit in bytes */
  /* Scanner state for the frame starting at head. pos may run past the buffered bytes while a
   * string's payload is still arriving: the frame is whole once pending is 0 and pos <= tail. */
  size_t pos;       /* bytes of the frame scanned */
  uint64_t pending; /* values still to scan before the frame ends */
  uint32_t depth;   /* open containers tracked in left[] */
  bool too_deep;    /* past IPC_MAX_DEPTH: skip to the frame's end, then report it */
  int fatal;        /* sticky fatal error code, 0 while the stream is sound */
  char fatal_msg[96];
  uint64_t left[IPC_MAX_DEPTH]; /* values left in each open container (maps count keys too) */
};

/* max_frame: IPC_MAX_FRAME_BYTES in the server, IPC_MAX_REPLY_BYTES in clients. Never fails:
 * the buffer is allocated on the first feed. */
void ipc_dec_init(struct ipc_dec *d, size_t max_frame);
void ipc_dec_destroy(struct ipc_dec *d);
/* Copies len bytes into the decoder. 0, KVD_ENOMEM, or after a fatal error that error (the bytes
 * are dropped: nothing after a fatal error is decoded). */
int ipc_dec_feed(struct ipc_dec *d, const void *data, size_t len);
/* Room for at least want bytes at the end of the buffer, to read into directly (a libuv
 * alloc_cb); then ipc_dec_commit(d, bytes_read) before any other call on d, which may move the
 * buffer. 0, or KVD_ENOMEM. */
int ipc_dec_reserve(struct ipc_dec *d, size_t want, char **ret_buf, size_t *ret_len);
void ipc_dec_commit(struct ipc_dec *d, size_t n);
/* The next whole message: 1 and *ret_msg (free it with ipc_msg_free), 0 when more bytes are
 * needed, or a negative kvd code with *err filled in:
 *   KVD_E2BIG    frame over max_frame (fatal), nesting over IPC_MAX_DEPTH, method name over
 *                IPC_MAX_METHOD_LEN
 *   KVD_EBADMSG  bytes that are not msgpack (fatal)
 *   KVD_EPROTO   not a msgpack-rpc message: not an array (fatal when the frame's first byte
 *                already says so), wrong length, unknown type tag, msgid not a uint32, method
 *                not a string, params not an array, error neither nil nor a map
 *   KVD_EINVAL   params is not `[]` or `[map]`, or the map has a non-string or repeated key
 *   KVD_ENOMEM   out of memory (not fatal: the frame is dropped)
 * After a non-fatal error the frame is consumed and the next call goes on with the next one;
 * after a fatal one every call returns the same error. */
int ipc_dec_next(struct ipc_dec *d, struct ipc_msg **ret_msg, struct ipc_dec_err *err);
/* Bytes held that were not yet returned as messages (for read backpressure). */
size_t ipc_dec_buffered(const struct ipc_dec *d);

/* ---- Named arguments ---------------------------------------------------------------------- */

/* A failed check: the code and a message for the error response, e.g.
 * "param 'max_tokens' must be an unsigned integer". */
struct ipc_err {
  int code;
  char message[160];
};

/* Sets err (if not NULL) and returns code. */
int ipc_err_set(struct ipc_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* The value under key in map, or NULL when map is NULL, not a map, or has no such key. A nil
 * value is returned as it is; the ipc_get_* accessors below treat nil as absent. */
const msgpack_object *ipc_map_find(const msgpack_object *map, const char *key);

/* Accessors for one key of a map (a message's params, or a map nested in them). Each returns
 * 1 and writes its outputs when the key is present, 0 and writes nothing when the key is absent
 * or nil (so callers preset defaults), and a negative code with err filled in when the value has
 * the wrong type (KVD_EINVAL) or does not fit (KVD_ERANGE). map may be NULL (`[]` params). */
int ipc_get_str(const msgpack_object *map, const char *key, const char **ret_s, size_t *ret_len,
                struct ipc_err *err);
int ipc_get_u64(const msgpack_object *map, const char *key, uint64_t *ret, struct ipc_err *err);
int ipc_get_u32(const msgpack_object *map, const char *key, uint32_t *ret, struct ipc_err *err);
int ipc_get_i64(const msgpack_object *map, const char *key, int64_t *ret, struct ipc_err *err);
/* Any finite number: float32, float64 or an integer. */
int ipc_get_f64(const msgpack_object *map, const char *key, double *ret, struct ipc_err *err);
int ipc_get_bool(const msgpack_object *map, const char *key, bool *ret, struct ipc_err *err);
int ipc_get_map(const msgpack_object *map, const char *key, const msgpack_object **ret,
                struct ipc_err *err);
/* Arrays: the items, checked to be all of one kind where the name says so. */
int ipc_get_array(const msgpack_object *map, const char *key, const msgpack_object **ret_items,
                  size_t *ret_n, struct ipc_err *err);
int ipc_get_strs(const msgpack_object *map, const char *key, const msgpack_object **ret_items,
                 size_t *ret_n, struct ipc_err *err);
int ipc_get_uints(const msgpack_object *map, const char *key, const msgpack_object **ret_items,
                  size_t *ret_n, struct ipc_err *err);
int ipc_get_maps(const msgpack_object *map, const char *key, const msgpack_object **ret_items,
                 size_t *ret_n, struct ipc_err *err);

/* The bytes of a string object (NUL-terminated when it came from the decoder), NULL if o is not a
 * string. */
static inline const char *ipc_obj_str(const msgpack_object *o, size_t *ret_len) {
  if (o->type != MSGPACK_OBJECT_STR) return NULL;
  if (ret_len) *ret_len = o->via.str.size;
  return o->via.str.ptr;
}

/* Checks a request's or notification's params against its api.json declaration: every required
 * param present, exactly one of each one_of group, and each declared param that is present of its
 * declared type. Keys api.json does not declare are allowed (newer clients add optional keys).
 * 0, or a negative code with err filled in; KVD_E_NO_METHOD for IPC_M_UNKNOWN. */
int ipc_validate_params(const struct ipc_msg *m, struct ipc_err *err);
/* The same for a response's result map against the method's declared result keys. */
int ipc_validate_result(enum ipc_method method, const msgpack_object *result, struct ipc_err *err);
/* "an unsigned integer", "a string" ...: the phrase error messages use for a type. */
const char *ipc_type_phrase(enum ipc_type t);

/* ---- Writer ------------------------------------------------------------------------------ */

/* Builds messages into one growable buffer (several may queue up in it, for one write(2)).
 *
 * Errors are sticky: a failed call (out of memory, message over max_frame, a container closed that
 * was not open, nesting over IPC_MAX_DEPTH) makes every later call a no-op until ipc_w_end(), which
 * reports it and drops the partial message. So a handler writes its result in straight-line code
 * and checks once. The writer tracks open containers, so it also knows when a message is whole:
 * ipc_w_end() refuses one with a container still waiting for values.
 *
 *   ipc_w_result(w, id);            // [1, id, nil, <one value>]
 *   ipc_w_map_open(w);              // a map whose size is counted for you ...
 *   ipc_w_kv_cstr(w, "text", "hi");
 *   ipc_w_kv_u64(w, "completion_tokens", 1);
 *   ipc_w_close(w);                 // ... and written here
 *   if ((rc = ipc_w_end(w)) < 0) ipc_w_error(w, id, rc, NULL), ipc_w_end(w);
 */
struct ipc_w {
  char *data;
  size_t len, cap;
  size_t max_frame; /* per message */
  size_t msg_start; /* where the message being written began */
  int err;          /* sticky error, 0 when fine */
  uint32_t depth;
  struct {
    size_t at;     /* offset of the header, for counted containers */
    uint64_t n;    /* values written into it (maps: keys and values) */
    uint64_t want; /* values it holds; UINT64_MAX for counted (open) containers */
    bool map;
  } open[IPC_MAX_DEPTH];
  msgpack_packer pk;
};

/* max_frame: IPC_MAX_REPLY_BYTES in the server, IPC_MAX_FRAME_BYTES in clients. */
void ipc_w_init(struct ipc_w *w, size_t max_frame);
void ipc_w_destroy(struct ipc_w *w);
/* Empties the buffer (keeping its memory) and clears any error. */
void ipc_w_reset(struct ipc_w *w);
const char *ipc_w_data(const struct ipc_w *w);
size_t ipc_w_len(const struct ipc_w *w);
/* Hands the buffer to the caller (free() it; NULL when empty) and empties the writer. */
char *ipc_w_steal(struct ipc_w *w, size_t *ret_len);

/* Message starts; each must be followed by the values the comment names, then ipc_w_end(). */
void ipc_w_request(struct ipc_w *w, uint32_t id, const char *method); /* then one map */
void ipc_w_notification(struct ipc_w *w, const char *method);         /* then one map */
void ipc_w_result(struct ipc_w *w, uint32_t id);                      /* then one value */
/* A whole error response [1, id, {code, message}, nil]: code is a kvd code (sent as its wire
 * code), message NULL for kvd_strerror(code). */
void ipc_w_error(struct ipc_w *w, uint32_t id, int code, const char *message);
/* Ends a message: 0, or the sticky error (or KVD_EINVAL for an unfinished message), in which case
 * the message is dropped from the buffer, messages before it stay, and the error is cleared. */
int ipc_w_end(struct ipc_w *w);

/* Values. */
void ipc_w_nil(struct ipc_w *w);
void ipc_w_bool(struct ipc_w *w, bool v);
void ipc_w_u64(struct ipc_w *w, uint64_t v);
void ipc_w_i64(struct ipc_w *w, int64_t v);
void ipc_w_f64(struct ipc_w *w, double v);
void ipc_w_str(struct ipc_w *w, const char *s, size_t len);
void ipc_w_cstr(struct ipc_w *w, const char *s);
void ipc_w_bin(struct ipc_w *w, const void *p, size_t len);
/* A decoded value, re-encoded as it is (echo, forwarding). */
void ipc_w_obj(struct ipc_w *w, const msgpack_object *o);
/* Containers of a known size: the next n values (maps: n keys and n values) fill them. */
void ipc_w_array(struct ipc_w *w, uint32_t n);
void ipc_w_map(struct ipc_w *w, uint32_t n);
/* Containers whose size is counted as values are written, up to ipc_w_close(). */
void ipc_w_array_open(struct ipc_w *w);
void ipc_w_map_open(struct ipc_w *w);
void ipc_w_close(struct ipc_w *w);

/* Key-value pairs, for maps. */
void ipc_w_key(struct ipc_w *w, const char *key);
void ipc_w_kv_nil(struct ipc_w *w, const char *key);
void ipc_w_kv_bool(struct ipc_w *w, const char *key, bool v);
void ipc_w_kv_u64(struct ipc_w *w, const char *key, uint64_t v);
void ipc_w_kv_i64(struct ipc_w *w, const char *key, int64_t v);
void ipc_w_kv_f64(struct ipc_w *w, const char *key, double v);
void ipc_w_kv_str(struct ipc_w *w, const char *key, const char *s, size_t len);
void ipc_w_kv_cstr(struct ipc_w *w, const char *key, const char *s);
/* An error object {code, message} (a kvd code, sent as its wire code) as a map value. */
void ipc_w_kv_error(struct ipc_w *w, const char *key, int code, const char *message);

#endif
