/* The writer: msgpack-rpc messages into one growable buffer, over msgpack-c's packer.
 *
 * The writer keeps a stack of the containers it has open, so it knows when a message is whole
 * and can write map and array sizes it was not told in advance: an open ("counted") container
 * gets a 32-bit size field that ipc_w_close() fills in. Sized containers pop themselves off the
 * stack when their last value starts; after that, the values belong to that last value (if it is a
 * container) and then to whatever encloses it, so the stack always names where the next value
 * goes. */
#include "ipc.h"

#include <stdlib.h>
#include <string.h>

/* msgpack-c's packer calls this for every piece it writes. */
static int w_write(void *data, const char *buf, size_t len) {
  struct ipc_w *w = data;
  if (w->err) return -1;
  if (len == 0) return 0; /* an empty string's body may come as NULL: nothing to copy */
  if (w->len - w->msg_start + len > w->max_frame) {
    w->err = KVD_E2BIG; /* stop before growing past what could ever be sent */
    return -1;
  }
  if (w->cap - w->len < len) {
    size_t cap = w->cap ? w->cap : 1024;
    while (cap - w->len < len) {
      if (cap > SIZE_MAX / 2) {
        w->err = KVD_ENOMEM;
        return -1;
      }
      cap *= 2;
    }
    char *p = realloc(w->data, cap);
    if (!p) {
      w->err = KVD_ENOMEM;
      return -1;
    }
    w->data = p;
    w->cap = cap;
  }
  memcpy(w->data + w->len, buf, len);
  w->len += len;
  return 0;
}

void ipc_w_init(struct ipc_w *w, size_t max_frame) {
  memset(w, 0, sizeof *w);
  w->max_frame = max_frame;
  msgpack_packer_init(&w->pk, w, w_write);
}

void ipc_w_destroy(struct ipc_w *w) {
  free(w->data);
  w->data = NULL;
  w->len = w->cap = 0;
}

void ipc_w_reset(struct ipc_w *w) {
  w->len = w->msg_start = 0;
  w->err = 0;
  w->depth = 0;
}

const char *ipc_w_data(const struct ipc_w *w) {
  return w->data;
}

size_t ipc_w_len(const struct ipc_w *w) {
  return w->len;
}

char *ipc_w_steal(struct ipc_w *w, size_t *ret_len) {
  char *p = w->len ? w->data : NULL;
  *ret_len = w->len;
  if (p) {
    w->data = NULL;
    w->cap = 0;
  }
  ipc_w_reset(w);
  return p;
}

/* Accounts for one value about to be written into the innermost open container. */
static bool begin_value(struct ipc_w *w) {
  if (w->err) return false;
  if (w->depth == 0) {
    /* A value outside any message: the message was already whole. */
    if (w->len > w->msg_start) w->err = KVD_EINVAL;
    return !w->err;
  }
  size_t top = w->depth - 1;
  w->open[top].n++;
  if (w->open[top].n == w->open[top].want) w->depth--;
  return true;
}

static void push(struct ipc_w *w, uint64_t want, bool map, size_t at) {
  if (w->err) return;
  if (w->depth == IPC_MAX_DEPTH) {
    w->err = KVD_E2BIG;
    return;
  }
  w->open[w->depth].at = at;
  w->open[w->depth].n = 0;
  w->open[w->depth].want = want;
  w->open[w->depth].map = map;
  w->depth++;
}

void ipc_w_nil(struct ipc_w *w) {
  if (begin_value(w)) msgpack_pack_nil(&w->pk);
}

void ipc_w_bool(struct ipc_w *w, bool v) {
  if (!begin_value(w)) return;
  if (v)
    msgpack_pack_true(&w->pk);
  else
    msgpack_pack_false(&w->pk);
}

void ipc_w_u64(struct ipc_w *w, uint64_t v) {
  if (begin_value(w)) msgpack_pack_uint64(&w->pk, v);
}

void ipc_w_i64(struct ipc_w *w, int64_t v) {
  if (begin_value(w)) msgpack_pack_int64(&w->pk, v);
}

void ipc_w_f64(struct ipc_w *w, double v) {
  if (begin_value(w)) msgpack_pack_double(&w->pk, v);
}

void ipc_w_str(struct ipc_w *w, const char *s, size_t len) {
  if (len > UINT32_MAX) w->err = w->err ? w->err : KVD_E2BIG;
  if (begin_value(w)) msgpack_pack_str_with_body(&w->pk, s, len);
}

void ipc_w_cstr(struct ipc_w *w, const char *s) {
  ipc_w_str(w, s, strlen(s));
}

void ipc_w_bin(struct ipc_w *w, const void *p, size_t len) {
  if (len > UINT32_MAX) w->err = w->err ? w->err : KVD_E2BIG;
  if (begin_value(w)) msgpack_pack_bin_with_body(&w->pk, p, len);
}

void ipc_w_obj(struct ipc_w *w, const msgpack_object *o) {
  if (begin_value(w)) msgpack_pack_object(&w->pk, *o);
}

void ipc_w_array(struct ipc_w *w, uint32_t n) {
  if (!begin_value(w)) return;
  msgpack_pack_array(&w->pk, n);
  if (n) push(w, n, false, 0);
}

void ipc_w_map(struct ipc_w *w, uint32_t n) {
  if (!begin_value(w)) return;
  msgpack_pack_map(&w->pk, n);
  if (n) push(w, 2 * (uint64_t)n, true, 0);
}

/* A counted container: a 32-bit size field now, filled in by ipc_w_close(). */
static void open_counted(struct ipc_w *w, uint8_t tag, bool map) {
  if (!begin_value(w)) return;
  static const char zero[4];
  size_t at = w->len;
  if (w_write(w, (const char *)&tag, 1) == 0 && w_write(w, zero, 4) == 0)
    push(w, UINT64_MAX, map, at);
}

void ipc_w_array_open(struct ipc_w *w) {
  open_counted(w, 0xdd, false);
}

void ipc_w_map_open(struct ipc_w *w) {
  open_counted(w, 0xdf, true);
}

void ipc_w_close(struct ipc_w *w) {
  if (w->err) return;
  if (w->depth == 0 || w->open[w->depth - 1].want != UINT64_MAX ||
      (w->open[w->depth - 1].map && w->open[w->depth - 1].n % 2)) {
    w->err = KVD_EINVAL; /* nothing counted open here, or a key without its value */
    return;
  }
  w->depth--;
  uint64_t n = w->open[w->depth].n;
  if (w->open[w->depth].map) n /= 2;
  if (n > UINT32_MAX) {
    w->err = KVD_E2BIG;
    return;
  }
  uint8_t *p = (uint8_t *)w->data + w->open[w->depth].at + 1;
  p[0] = (uint8_t)(n >> 24);
  p[1] = (uint8_t)(n >> 16);
  p[2] = (uint8_t)(n >> 8);
  p[3] = (uint8_t)n;
  /* The container was one value of its parent, counted when it opened; a sized parent may have
   * been waiting for exactly this value to finish. */
}

/* Starts a message: it must begin at depth 0 (the previous one finished). */
static void start(struct ipc_w *w, uint32_t n) {
  if (w->err) return;
  if (w->depth != 0) {
    w->err = KVD_EINVAL;
    return;
  }
  w->msg_start = w->len;
  ipc_w_array(w, n);
}

void ipc_w_request(struct ipc_w *w, uint32_t id, const char *method) {
  start(w, 4);
  ipc_w_u64(w, IPC_REQUEST);
  ipc_w_u64(w, id);
  ipc_w_cstr(w, method);
  ipc_w_array(w, 1);
}

void ipc_w_notification(struct ipc_w *w, const char *method) {
  start(w, 3);
  ipc_w_u64(w, IPC_NOTIFICATION);
  ipc_w_cstr(w, method);
  ipc_w_array(w, 1);
}

void ipc_w_result(struct ipc_w *w, uint32_t id) {
  start(w, 4);
  ipc_w_u64(w, IPC_RESPONSE);
  ipc_w_u64(w, id);
  ipc_w_nil(w);
}

void ipc_w_kv_error(struct ipc_w *w, const char *key, int code, const char *message) {
  ipc_w_key(w, key);
  ipc_w_map(w, 2);
  ipc_w_kv_u64(w, "code", (uint64_t)kvd_error_to_wire(code));
  ipc_w_kv_cstr(w, "message", message ? message : kvd_strerror(code));
}

void ipc_w_error(struct ipc_w *w, uint32_t id, int code, const char *message) {
  start(w, 4);
  ipc_w_u64(w, IPC_RESPONSE);
  ipc_w_u64(w, id);
  ipc_w_map(w, 2);
  ipc_w_kv_u64(w, "code", (uint64_t)kvd_error_to_wire(code));
  ipc_w_kv_cstr(w, "message", message ? message : kvd_strerror(code));
  ipc_w_nil(w);
}

int ipc_w_end(struct ipc_w *w) {
  int rc = w->err;
  if (!rc && (w->depth != 0 || w->len == w->msg_start)) rc = KVD_EINVAL;
  if (rc) {
    w->len = w->msg_start;
    w->depth = 0;
    w->err = 0;
    return rc;
  }
  w->msg_start = w->len;
  return 0;
}

void ipc_w_key(struct ipc_w *w, const char *key) {
  if (!w->err && (w->depth == 0 || !w->open[w->depth - 1].map || w->open[w->depth - 1].n % 2)) {
    w->err = KVD_EINVAL; /* a key outside a map, or where a value belongs */
    return;
  }
  ipc_w_cstr(w, key);
}

void ipc_w_kv_nil(struct ipc_w *w, const char *key) {
  ipc_w_key(w, key);
  ipc_w_nil(w);
}

void ipc_w_kv_bool(struct ipc_w *w, const char *key, bool v) {
  ipc_w_key(w, key);
  ipc_w_bool(w, v);
}

void ipc_w_kv_u64(struct ipc_w *w, const char *key, uint64_t v) {
  ipc_w_key(w, key);
  ipc_w_u64(w, v);
}

void ipc_w_kv_i64(struct ipc_w *w, const char *key, int64_t v) {
  ipc_w_key(w, key);
  ipc_w_i64(w, v);
}

void ipc_w_kv_f64(struct ipc_w *w, const char *key, double v) {
  ipc_w_key(w, key);
  ipc_w_f64(w, v);
}

void ipc_w_kv_str(struct ipc_w *w, const char *key, const char *s, size_t len) {
  ipc_w_key(w, key);
  ipc_w_str(w, s, len);
}

void ipc_w_kv_cstr(struct ipc_w *w, const char *key, const char *s) {
  ipc_w_key(w, key);
  ipc_w_cstr(w, s);
}
