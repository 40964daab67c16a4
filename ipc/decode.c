/* The resumable msgpack-rpc decoder: bytes in, whole messages out.
 *
 * Two stages. The scanner walks the stream one msgpack header at a time and keeps its place
 * between calls, so it only has to answer "where does this frame end?": it counts the values
 * still owed (pending), skips string payloads without reading them, and checks the frame and
 * nesting limits on headers alone. That lets it refuse a 4 GiB string or an array claiming 2^32
 * items the moment their header arrives, before anything is buffered or allocated for them.
 * Only a complete frame, already known to be within the limits, is handed to msgpack-c to build
 * objects, in a zone of its own that becomes the message's arena.
 *
 * Frame grammar (PROTOCOL.md, "Messages"):
 *   frame    := request | response | notification     (one msgpack array, nothing around it)
 *   request  := [0, msgid:uint32, method:str, params]
 *   response := [1, msgid:uint32, error:nil|map, result:any]
 *   notification := [2, method:str, params]
 *   params   := [] | [map with string keys, none repeated]
 */
#include "ipc.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Zone chunk: a typical request (a few hundred bytes of msgpack) fits in one. */
#define IPC__ZONE_CHUNK 8192
/* Buffer kept between frames; a larger one (grown for a big frame) is freed once drained. */
#define IPC__KEEP_BUF (64 << 10)

static uint64_t be(const uint8_t *p, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; i++)
    v = v << 8 | p[i];
  return v;
}

static void reset_frame(struct ipc_dec *d) {
  d->pos = 0;
  d->pending = 1;
  d->depth = 0;
  d->too_deep = false;
}

void ipc_dec_init(struct ipc_dec *d, size_t max_frame) {
  memset(d, 0, sizeof *d);
  d->max_frame = max_frame;
  reset_frame(d);
}

void ipc_dec_destroy(struct ipc_dec *d) {
  free(d->buf);
  d->buf = NULL;
  d->cap = d->head = d->tail = 0;
}

size_t ipc_dec_buffered(const struct ipc_dec *d) {
  return d->tail - d->head;
}

int ipc_dec_reserve(struct ipc_dec *d, size_t want, char **ret_buf, size_t *ret_len) {
  /* After a fatal error nothing will be decoded again: reuse the space instead of growing. */
  if (d->fatal) d->head = d->tail = 0;
  if (d->cap - d->tail < want && d->head > 0) {
    /* Slide the unfinished frame to the front before growing: the scanner's state is relative to
     * head, so it survives the move. */
    memmove(d->buf, d->buf + d->head, d->tail - d->head);
    d->tail -= d->head;
    d->head = 0;
  }
  if (d->cap - d->tail < want) {
    if (want > SIZE_MAX / 2 - d->tail) return KVD_ENOMEM;
    size_t cap = d->cap ? d->cap : 4096;
    while (cap - d->tail < want)
      cap *= 2;
    char *p = realloc(d->buf, cap);
    if (!p) return KVD_ENOMEM;
    d->buf = p;
    d->cap = cap;
  }
  *ret_buf = d->buf + d->tail;
  *ret_len = d->cap - d->tail;
  return 0;
}

void ipc_dec_commit(struct ipc_dec *d, size_t n) {
  d->tail += n;
}

int ipc_dec_feed(struct ipc_dec *d, const void *data, size_t len) {
  char *dst;
  size_t room;
  if (d->fatal) return d->fatal;
  if (len == 0) return 0;
  int rc = ipc_dec_reserve(d, len, &dst, &room);
  if (rc < 0) return rc;
  memcpy(dst, data, len);
  ipc_dec_commit(d, len);
  return 0;
}

static int set_fatal(struct ipc_dec *d, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int set_fatal(struct ipc_dec *d, int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(d->fatal_msg, sizeof d->fatal_msg, fmt, ap);
  va_end(ap);
  d->fatal = code;
  return code;
}

static bool is_array_header(uint8_t b) {
  return (b >= 0x90 && b <= 0x9f) || b == 0xdc || b == 0xdd;
}

/* Advances the scanner over the buffered bytes of the frame at head: 1 when the frame is whole
 * (d->pos bytes), 0 when it needs more bytes, or a fatal code. */
static int scan(struct ipc_dec *d) {
  size_t avail = d->tail - d->head;
  if (avail == 0) return 0; /* no byte of this frame yet (and buf may still be NULL) */
  const uint8_t *p = (const uint8_t *)d->buf + d->head;

  while (d->pending > 0) {
    if (d->pos >= avail) return 0;
    uint8_t b = p[d->pos];
    size_t hdr = 1;       /* header bytes, type byte included */
    size_t len_bytes = 0; /* size of the big-endian length field after the type byte */
    uint64_t payload = 0; /* bytes after the header */
    uint64_t children = 0;
    bool container = false, is_map = false;

    if (d->pos == 0 && !is_array_header(b))
      return set_fatal(d, KVD_EPROTO, "not a msgpack-rpc message: a message must be an array");
    if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
      /* fixint, nil, bool: the header is the value */
    } else if (b <= 0x8f) {
      container = is_map = true;
      children = b & 0x0f;
    } else if (b <= 0x9f) {
      container = true;
      children = b & 0x0f;
    } else if (b <= 0xbf) {
      payload = b & 0x1f;
    } else {
      /* One line per format, as in the msgpack spec's table. */
      /* clang-format off */
      switch (b) {
      case 0xc1:
        return set_fatal(d, KVD_EBADMSG, "malformed msgpack: byte 0xc1 at offset %zu", d->pos);
      case 0xc4: case 0xd9: len_bytes = 1; break;            /* bin8, str8 */
      case 0xc5: case 0xda: len_bytes = 2; break;            /* bin16, str16 */
      case 0xc6: case 0xdb: len_bytes = 4; break;            /* bin32, str32 */
      case 0xc7: len_bytes = 1; break;                       /* ext8: length, then a type byte */
      case 0xc8: len_bytes = 2; break;                       /* ext16 */
      case 0xc9: len_bytes = 4; break;                       /* ext32 */
      case 0xca: hdr = 5; break;                             /* float32 */
      case 0xcb: hdr = 9; break;                             /* float64 */
      case 0xcc: case 0xd0: hdr = 2; break;                  /* uint8, int8 */
      case 0xcd: case 0xd1: hdr = 3; break;                  /* uint16, int16 */
      case 0xce: case 0xd2: hdr = 5; break;                  /* uint32, int32 */
      case 0xcf: case 0xd3: hdr = 9; break;                  /* uint64, int64 */
      case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: /* fixext 1..16: type, then data */
        hdr = 2;
        payload = (uint64_t)1 << (b - 0xd4);
        break;
      case 0xdc: len_bytes = 2, container = true; break;          /* array16 */
      case 0xdd: len_bytes = 4, container = true; break;          /* array32 */
      case 0xde: len_bytes = 2, container = is_map = true; break; /* map16 */
      case 0xdf: len_bytes = 4, container = is_map = true; break; /* map32 */
      default: break;
      }
      /* clang-format on */
      if (len_bytes) {
        if (d->pos + 1 + len_bytes > avail) return 0;
        uint64_t n = be(p + d->pos + 1, len_bytes);
        hdr = 1 + len_bytes + (b >= 0xc7 && b <= 0xc9 ? 1 : 0);
        if (container)
          children = n;
        else
          payload = n;
      }
    }
    if (is_map) children *= 2;

    /* Every value still owed takes at least one byte, so the frame's size is known to exceed the
     * limit as soon as the headers promise more than fits: no need to wait for the bytes. */
    uint64_t end = (uint64_t)d->pos + hdr + payload;
    uint64_t after = d->pending - 1 + children;
    if (end > d->max_frame || after > d->max_frame - end)
      return set_fatal(d, KVD_E2BIG, "message over the %zu-byte frame limit", d->max_frame);
    if (d->pos + hdr > avail) return 0; /* the header itself has not all arrived */

    if (!d->too_deep) {
      if (d->depth + 1 > IPC_MAX_DEPTH) {
        d->too_deep = true; /* the pending count alone still finds the frame's end */
      } else {
        if (d->depth > 0) d->left[d->depth - 1]--;
        if (container && children > 0) {
          d->left[d->depth++] = children;
        } else {
          while (d->depth > 0 && d->left[d->depth - 1] == 0)
            d->depth--;
        }
      }
    }
    d->pos = (size_t)end;
    d->pending = after;
  }
  return d->pos <= avail ? 1 : 0;
}

/* Reads a msgpack integer at p[*off] (bounded by n): true and *ret for a non-negative one. */
static bool peek_uint(const uint8_t *p, size_t n, size_t *off, uint64_t *ret) {
  if (*off >= n) return false;
  uint8_t b = p[*off];
  size_t w;
  if (b <= 0x7f) {
    *ret = b;
    *off += 1;
    return true;
  }
  if (b >= 0xcc && b <= 0xcf)
    w = (size_t)1 << (b - 0xcc);
  else if (b >= 0xd0 && b <= 0xd3)
    w = (size_t)1 << (b - 0xd0);
  else
    return false;
  if (*off + 1 + w > n) return false;
  uint64_t v = be(p + *off + 1, w);
  if (b >= 0xd0 && (v >> (8 * w - 1)) & 1) return false; /* negative signed int */
  *ret = v;
  *off += 1 + w;
  return true;
}

/* The msgid of a frame that starts like a request ([0, msgid, ...]), read from the raw bytes so
 * that it works for frames msgpack-c is never asked to parse (too deep) or that fail later. */
static bool peek_request_id(const uint8_t *p, size_t n, uint32_t *ret_id) {
  size_t off = 1;
  uint64_t count, type, id;
  if (n == 0) return false;
  if (p[0] >= 0x90 && p[0] <= 0x9f) {
    count = p[0] & 0x0f;
  } else if (p[0] == 0xdc && n >= 3) {
    count = be(p + 1, 2), off = 3;
  } else if (p[0] == 0xdd && n >= 5) {
    count = be(p + 1, 4), off = 5;
  } else {
    return false;
  }
  if (count < 2 || !peek_uint(p, n, &off, &type) || type != IPC_REQUEST) return false;
  if (!peek_uint(p, n, &off, &id) || id > UINT32_MAX) return false;
  *ret_id = (uint32_t)id;
  return true;
}

/* msgpack-c's objects point into the bytes they were parsed from; copy every string, bin and
 * ext payload into the zone, strings with a NUL after them, so the message owns all it refers to
 * and the decoder's buffer can move on. Recursion is bounded by IPC_MAX_DEPTH. */
static int own_bytes(msgpack_zone *z, msgpack_object *o) {
  const char **ptr = NULL;
  size_t n = 0;
  switch (o->type) {
  case MSGPACK_OBJECT_STR:
    ptr = &o->via.str.ptr, n = o->via.str.size;
    break;
  case MSGPACK_OBJECT_BIN:
    ptr = &o->via.bin.ptr, n = o->via.bin.size;
    break;
  case MSGPACK_OBJECT_EXT:
    ptr = &o->via.ext.ptr, n = o->via.ext.size;
    break;
  case MSGPACK_OBJECT_ARRAY:
    for (uint32_t i = 0; i < o->via.array.size; i++)
      if (own_bytes(z, &o->via.array.ptr[i]) < 0) return KVD_ENOMEM;
    return 0;
  case MSGPACK_OBJECT_MAP:
    for (uint32_t i = 0; i < o->via.map.size; i++)
      if (own_bytes(z, &o->via.map.ptr[i].key) < 0 || own_bytes(z, &o->via.map.ptr[i].val) < 0)
        return KVD_ENOMEM;
    return 0;
  default:
    return 0;
  }
  char *copy = msgpack_zone_malloc_no_align(z, n + 1);
  if (!copy) return KVD_ENOMEM;
  if (n) memcpy(copy, *ptr, n);
  copy[n] = '\0';
  *ptr = copy;
  return 0;
}

static int cmp_key(const void *a, const void *b) {
  const msgpack_object *x = *(const msgpack_object *const *)a;
  const msgpack_object *y = *(const msgpack_object *const *)b;
  if (x->via.str.size != y->via.str.size) return x->via.str.size < y->via.str.size ? -1 : 1;
  return memcmp(x->via.str.ptr, y->via.str.ptr, x->via.str.size);
}

/* The params map's keys must be strings, none repeated (an accessor would otherwise see only the
 * first of two values). Sorting finds repeats in n log n, whatever the client sends. */
static int check_keys(msgpack_zone *z, const msgpack_object *map, struct ipc_dec_err *err) {
  uint32_t n = map->via.map.size;
  if (n < 2) {
    if (n == 1 && map->via.map.ptr[0].key.type != MSGPACK_OBJECT_STR) goto not_str;
    return 0;
  }
  const msgpack_object **keys = msgpack_zone_malloc(z, n * sizeof *keys);
  if (!keys) return KVD_ENOMEM;
  for (uint32_t i = 0; i < n; i++) {
    keys[i] = &map->via.map.ptr[i].key;
    if (keys[i]->type != MSGPACK_OBJECT_STR) goto not_str;
  }
  qsort(keys, n, sizeof *keys, cmp_key);
  for (uint32_t i = 1; i < n; i++) {
    if (cmp_key(&keys[i - 1], &keys[i]) == 0) {
      snprintf(err->message, sizeof err->message, "param '%.64s' given twice",
               keys[i]->via.str.ptr);
      return KVD_EINVAL;
    }
  }
  return 0;
not_str:
  snprintf(err->message, sizeof err->message, "params map keys must be strings");
  return KVD_EINVAL;
}

/* Whether p[0..n) is well-formed UTF-8 (RFC 3629: shortest forms, no surrogates, <= U+10FFFF). */
static bool utf8_valid(const char *s, size_t n) {
  const unsigned char *p = (const unsigned char *)s;
  for (size_t i = 0; i < n;) {
    unsigned c = p[i];
    size_t len = c < 0x80             ? 1
                 : (c & 0xe0) == 0xc0 ? 2
                 : (c & 0xf0) == 0xe0 ? 3
                 : (c & 0xf8) == 0xf0 ? 4
                                      : 0;
    if (!len || i + len > n) return false;
    uint32_t cp = len == 1 ? c : c & (0x7fu >> len);
    for (size_t k = 1; k < len; k++) {
      if ((p[i + k] & 0xc0) != 0x80) return false;
      cp = cp << 6 | (p[i + k] & 0x3fu);
    }
    static const uint32_t min[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += len;
  }
  return true;
}

static int shape_call(struct ipc_msg *m, const msgpack_object *method, const msgpack_object *params,
                      struct ipc_dec_err *err);

/* Checks the msgpack-rpc shape of root and fills m; a negative code with err->message if wrong. */
static int shape(struct ipc_msg *m, const msgpack_object *root, struct ipc_dec_err *err) {
  const msgpack_object *a = root->via.array.ptr;
  uint32_t n = root->via.array.size;
  const msgpack_object *method = NULL, *params = NULL;
#define BAD(code, ...) (snprintf(err->message, sizeof err->message, __VA_ARGS__), (code))

  if (n == 0 || a[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER || a[0].via.u64 > 2)
    return BAD(KVD_EPROTO, "message type (element 0) must be 0, 1 or 2");
  m->type = (enum ipc_msg_type)a[0].via.u64;
  switch (m->type) {
  case IPC_REQUEST:
    if (n != 4)
      return BAD(KVD_EPROTO, "a request is [0, msgid, method, params]: got %u elements", n);
    break;
  case IPC_RESPONSE:
    if (n != 4)
      return BAD(KVD_EPROTO, "a response is [1, msgid, error, result]: got %u elements", n);
    break;
  case IPC_NOTIFICATION:
    if (n != 3) return BAD(KVD_EPROTO, "a notification is [2, method, params]: got %u elements", n);
    break;
  }
  if (m->type == IPC_RESPONSE) {
    /* kvd sends no requests, so a response is never awaited: whatever its msgid and error slot
     * hold, it is passed up to be ignored, not a reason to hang up (clients such as pynvim's
     * session answer what they think were requests). */
    m->id = a[1].type == MSGPACK_OBJECT_POSITIVE_INTEGER && a[1].via.u64 <= UINT32_MAX
                ? (uint32_t)a[1].via.u64
                : 0;
    m->error = a[2].type == MSGPACK_OBJECT_NIL ? NULL : &a[2];
    m->result = &a[3];
    m->method_id = IPC_M_UNKNOWN;
    return 0;
  }
  if (m->type != IPC_NOTIFICATION) {
    if (a[1].type != MSGPACK_OBJECT_POSITIVE_INTEGER || a[1].via.u64 > UINT32_MAX)
      return BAD(KVD_EPROTO, "msgid must be an unsigned 32-bit integer");
    m->id = (uint32_t)a[1].via.u64;
  }
  method = &a[m->type == IPC_REQUEST ? 2 : 1];
  params = &a[m->type == IPC_REQUEST ? 3 : 2];
  int rc = shape_call(m, method, params, err);
  if (rc < 0 && m->type == IPC_NOTIFICATION) {
    /* Clients have nothing to notify in protocol 1 and kvd ignores what they send, so a
     * notification of the right length passes whatever it holds: pynvim's session announces
     * itself with [2, "nvim_set_client_info", [5 positional args]], and hanging up on that
     * would refuse the client before its first request. It comes up as an unknown method. */
    m->method_id = IPC_M_UNKNOWN;
    m->method = NULL;
    m->method_len = 0;
    m->params = NULL;
    return 0;
  }
  return rc;
#undef BAD
}

/* The method and params of a request or notification: checked, and into m. */
static int shape_call(struct ipc_msg *m, const msgpack_object *method, const msgpack_object *params,
                      struct ipc_dec_err *err) {
#define BAD(code, ...) (snprintf(err->message, sizeof err->message, __VA_ARGS__), (code))
  /* A method name may come as bin when it is valid UTF-8: msgpack libraries that predate the
   * str/bin split (pynvim's, among others) send names that way, and neovim accepts them. */
  const char *name;
  uint32_t name_len;
  if (method->type == MSGPACK_OBJECT_STR) {
    name = method->via.str.ptr;
    name_len = method->via.str.size;
  } else if (method->type == MSGPACK_OBJECT_BIN) {
    name = method->via.bin.ptr;
    name_len = method->via.bin.size;
  } else {
    return BAD(KVD_EPROTO, "method must be a string");
  }
  if (name_len > IPC_MAX_METHOD_LEN)
    return BAD(KVD_E2BIG, "method name over %d bytes", IPC_MAX_METHOD_LEN);
  if (method->type == MSGPACK_OBJECT_BIN && !utf8_valid(name, name_len))
    return BAD(KVD_EPROTO, "method must be a string (a bin method name must be UTF-8)");
  m->method = name;
  m->method_len = name_len;
  m->method_id = ipc_method_lookup(m->method, m->method_len);
  /* A request for a notification's name (or the reverse) is no method at all: the dispatcher
   * then needs no second check. */
  if (m->method_id != IPC_M_UNKNOWN &&
      (ipc_methods[m->method_id].kind == IPC_MK_REQUEST) != (m->type == IPC_REQUEST))
    m->method_id = IPC_M_UNKNOWN;
  if (params->type != MSGPACK_OBJECT_ARRAY) return BAD(KVD_EPROTO, "params must be an array");
  if (params->via.array.size > 1 ||
      (params->via.array.size == 1 && params->via.array.ptr[0].type != MSGPACK_OBJECT_MAP))
    return BAD(KVD_EINVAL, "params must be an array holding one map of named arguments");
  m->params = params->via.array.size ? &params->via.array.ptr[0] : NULL;
  return 0;
#undef BAD
}

/* Turns the whole frame at head (len bytes) into a message. */
static int build(struct ipc_dec *d, size_t len, struct ipc_msg **ret_msg, struct ipc_dec_err *err) {
  const uint8_t *p = (const uint8_t *)d->buf + d->head;
  err->has_id = peek_request_id(p, len, &err->id);
  if (d->too_deep) {
    snprintf(err->message, sizeof err->message, "message nested deeper than %d levels",
             IPC_MAX_DEPTH);
    return KVD_E2BIG;
  }
  msgpack_zone *z = msgpack_zone_new(IPC__ZONE_CHUNK);
  if (!z) goto nomem;
  struct ipc_msg *m = msgpack_zone_malloc(z, sizeof *m);
  msgpack_object *root = msgpack_zone_malloc(z, sizeof *root);
  if (!m || !root) goto nomem;
  memset(m, 0, sizeof *m);
  m->zone = z;
  m->frame_bytes = len;
  size_t off = 0;
  msgpack_unpack_return ur = msgpack_unpack((const char *)p, len, &off, z, root);
  if (ur == MSGPACK_UNPACK_NOMEM_ERROR) goto nomem;
  if (ur != MSGPACK_UNPACK_SUCCESS || off != len) {
    /* The scanner and msgpack-c disagree on where the value ends: should not happen, but the
     * frame's bounds are the scanner's, so the stream is still in step. */
    msgpack_zone_free(z);
    snprintf(err->message, sizeof err->message, "malformed msgpack");
    return KVD_EBADMSG;
  }
  if (own_bytes(z, root) < 0) goto nomem;
  int rc = shape(m, root, err);
  if (rc == 0 && m->params) rc = check_keys(z, m->params, err);
  if (rc == KVD_ENOMEM) goto nomem;
  if (rc < 0) {
    msgpack_zone_free(z);
    return rc;
  }
  *ret_msg = m;
  return 1;
nomem:
  msgpack_zone_free(z);
  snprintf(err->message, sizeof err->message, "%s", kvd_strerror(KVD_ENOMEM));
  return KVD_ENOMEM;
}

int ipc_dec_next(struct ipc_dec *d, struct ipc_msg **ret_msg, struct ipc_dec_err *err) {
  memset(err, 0, sizeof *err);
  if (!d->fatal) {
    int rc = scan(d);
    if (rc == 0) return 0;
    if (rc == 1) {
      size_t len = d->pos;
      rc = build(d, len, ret_msg, err);
      d->head += len;
      if (d->head == d->tail) {
        d->head = d->tail = 0;
        /* An idle connection should not keep the memory of the largest frame it ever sent. */
        if (d->cap > IPC__KEEP_BUF) {
          free(d->buf);
          d->buf = NULL;
          d->cap = 0;
        }
      }
      reset_frame(d);
      if (rc == 1) return 1;
      err->code = rc;
      return rc;
    }
  }
  err->code = d->fatal;
  err->fatal = true;
  snprintf(err->message, sizeof err->message, "%s", d->fatal_msg);
  return d->fatal;
}

void ipc_msg_free(struct ipc_msg *m) {
  if (m) msgpack_zone_free(m->zone);
}

void *ipc_msg_alloc(struct ipc_msg *m, size_t n) {
  return msgpack_zone_malloc(m->zone, n ? n : 1);
}

int ipc_msg_error(const struct ipc_msg *m, const char **ret_message) {
  const msgpack_object *code, *msg;
  if (!m->error) {
    *ret_message = NULL;
    return 0;
  }
  code = ipc_map_find(m->error, "code");
  msg = ipc_map_find(m->error, "message");
  if (!code || code->type != MSGPACK_OBJECT_POSITIVE_INTEGER || code->via.u64 > INT32_MAX || !msg ||
      msg->type != MSGPACK_OBJECT_STR) {
    *ret_message = "malformed error";
    return KVD_EPROTO;
  }
  *ret_message = msg->via.str.ptr;
  int c = kvd_error_from_wire((int)code->via.u64);
  /* A wire code of 0 in an error object would read as success; no server sends it. */
  return c < 0 ? c : KVD_EPROTO;
}
