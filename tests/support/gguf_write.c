/* GGUF writer (see gguf_write.h, and gguf.c for the file grammar). */
#include "gguf_write.h"

#include "kvd_error.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct gguf__wbuf {
  uint8_t *p;
  size_t len, cap;
};

struct gguf__wtensor {
  char *name;
  uint32_t n_dims;
  uint64_t ne[GGUF_MAX_DIMS];
  enum dtype type;
  uint64_t nbytes;
  void *data; /* owned copy, or NULL when fill produces the bytes */
  gguf_fill_fn fill;
  void *ctx;
};

struct gguf_writer {
  uint32_t version;
  uint64_t alignment;
  struct gguf__wbuf kv; /* serialized kv section */
  uint64_t n_kv;
  char **keys; /* copies, for the duplicate check */
  size_t keys_cap;
  struct gguf__wtensor *tensors;
  uint64_t n_tensors;
  size_t tensors_cap;
};

/* ---- byte buffer ---- */

static int gguf__wput(struct gguf__wbuf *b, const void *p, size_t n) {
  if (n > SIZE_MAX - b->len) return KVD_EOVERFLOW;
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n) {
      if (cap > SIZE_MAX / 2) return KVD_EOVERFLOW;
      cap *= 2;
    }
    uint8_t *q = realloc(b->p, cap);
    if (!q) return KVD_ENOMEM;
    b->p = q;
    b->cap = cap;
  }
  if (n) memcpy(b->p + b->len, p, n);
  b->len += n;
  return 0;
}

static int gguf__wput_le(struct gguf__wbuf *b, uint64_t v, unsigned n) {
  uint8_t tmp[8];
  for (unsigned i = 0; i < n; i++)
    tmp[i] = (uint8_t)(v >> (8 * i));
  return gguf__wput(b, tmp, n);
}

static int gguf__wput_str(struct gguf__wbuf *b, const char *s, uint64_t len) {
  int rc = gguf__wput_le(b, len, 8);
  if (rc < 0) return rc;
  if (len > SIZE_MAX) return KVD_EOVERFLOW;
  return gguf__wput(b, s, (size_t)len);
}

/* ---- lifetime ---- */

int gguf_writer_new(struct gguf_writer **ret) {
  if (!ret) return KVD_EINVAL;
  struct gguf_writer *w = calloc(1, sizeof *w);
  if (!w) return KVD_ENOMEM;
  w->version = 3;
  w->alignment = GGUF_DEFAULT_ALIGNMENT;
  *ret = w;
  return 0;
}

void gguf_writer_free(struct gguf_writer *w) {
  if (!w) return;
  for (uint64_t i = 0; i < w->n_kv; i++)
    free(w->keys[i]);
  free(w->keys);
  for (uint64_t i = 0; i < w->n_tensors; i++) {
    free(w->tensors[i].name);
    free(w->tensors[i].data);
  }
  free(w->tensors);
  free(w->kv.p);
  free(w);
}

int gguf_writer_set_version(struct gguf_writer *w, uint32_t version) {
  if (!w || (version != 2 && version != 3)) return KVD_EINVAL;
  w->version = version;
  return 0;
}

uint64_t gguf_writer_n_tensors(const struct gguf_writer *w) {
  return w ? w->n_tensors : 0;
}

/* ---- metadata ---- */

/* Serializes a value's payload (everything after its type). */
static int gguf__wvalue(struct gguf__wbuf *b, const struct gguf_value *v, int depth) {
  int rc;
  switch (v->type) {
  case GGUF_VT_UINT8:
    if (v->v.u64 > UINT8_MAX) return KVD_EINVAL;
    return gguf__wput_le(b, v->v.u64, 1);
  case GGUF_VT_BOOL:
    if (v->v.u64 > 1) return KVD_EINVAL;
    return gguf__wput_le(b, v->v.u64, 1);
  case GGUF_VT_UINT16:
    if (v->v.u64 > UINT16_MAX) return KVD_EINVAL;
    return gguf__wput_le(b, v->v.u64, 2);
  case GGUF_VT_UINT32:
    if (v->v.u64 > UINT32_MAX) return KVD_EINVAL;
    return gguf__wput_le(b, v->v.u64, 4);
  case GGUF_VT_UINT64:
    return gguf__wput_le(b, v->v.u64, 8);
  case GGUF_VT_INT8:
    if (v->v.i64 < INT8_MIN || v->v.i64 > INT8_MAX) return KVD_EINVAL;
    return gguf__wput_le(b, (uint64_t)v->v.i64, 1);
  case GGUF_VT_INT16:
    if (v->v.i64 < INT16_MIN || v->v.i64 > INT16_MAX) return KVD_EINVAL;
    return gguf__wput_le(b, (uint64_t)v->v.i64, 2);
  case GGUF_VT_INT32:
    if (v->v.i64 < INT32_MIN || v->v.i64 > INT32_MAX) return KVD_EINVAL;
    return gguf__wput_le(b, (uint64_t)v->v.i64, 4);
  case GGUF_VT_INT64:
    return gguf__wput_le(b, (uint64_t)v->v.i64, 8);
  case GGUF_VT_FLOAT32: {
    float f = (float)v->v.f64;
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return gguf__wput_le(b, bits, 4);
  }
  case GGUF_VT_FLOAT64: {
    uint64_t bits;
    memcpy(&bits, &v->v.f64, sizeof bits);
    return gguf__wput_le(b, bits, 8);
  }
  case GGUF_VT_STRING:
    if (!v->v.str.ptr && v->v.str.len) return KVD_EINVAL;
    return gguf__wput_str(b, v->v.str.ptr, v->v.str.len);
  case GGUF_VT_ARRAY:
    break;
  default:
    return KVD_EINVAL;
  }

  /* The reader refuses deeper nesting, so the writer must not produce it. */
  if (depth >= GGUF_MAX_ARRAY_DEPTH) return KVD_EINVAL;
  enum gguf_vtype et = v->v.arr.type;
  uint64_t n = v->v.arr.count;
  if ((unsigned)et >= GGUF_VT_COUNT) return KVD_EINVAL;
  if ((rc = gguf__wput_le(b, (uint64_t)et, 4)) < 0) return rc;
  if ((rc = gguf__wput_le(b, n, 8)) < 0) return rc;
  size_t esize = gguf_vtype_size(et);
  if (esize) {
    if (n == 0) return 0;
    if (!v->v.arr.data || n > SIZE_MAX / esize) return KVD_EINVAL;
    const uint8_t *p = v->v.arr.data;
    if (et == GGUF_VT_BOOL)
      for (uint64_t i = 0; i < n; i++)
        if (p[i] > 1) return KVD_EINVAL;
    return gguf__wput(b, p, (size_t)(n * esize));
  }
  if (n && !v->v.arr.elems) return KVD_EINVAL;
  for (uint64_t i = 0; i < n; i++) {
    if (v->v.arr.elems[i].type != et) return KVD_EINVAL;
    if ((rc = gguf__wvalue(b, &v->v.arr.elems[i], depth + 1)) < 0) return rc;
  }
  return 0;
}

int gguf_writer_add_value(struct gguf_writer *w, const char *key, const struct gguf_value *v) {
  if (!w || !key || !v) return KVD_EINVAL;
  size_t klen = strlen(key);
  if (klen == 0 || klen > GGUF_MAX_KEY) return KVD_EINVAL;
  for (uint64_t i = 0; i < w->n_kv; i++)
    if (strcmp(w->keys[i], key) == 0) return KVD_EEXIST;
  bool is_align = strcmp(key, "general.alignment") == 0;
  if (is_align && (v->type != GGUF_VT_UINT32 || v->v.u64 == 0 || v->v.u64 > UINT32_MAX ||
                   (v->v.u64 & (v->v.u64 - 1)) != 0))
    return KVD_EINVAL;

  if (w->n_kv == w->keys_cap) {
    size_t cap = w->keys_cap ? w->keys_cap * 2 : 16;
    char **k = realloc(w->keys, cap * sizeof *k);
    if (!k) return KVD_ENOMEM;
    w->keys = k;
    w->keys_cap = cap;
  }
  char *kcopy = malloc(klen + 1);
  if (!kcopy) return KVD_ENOMEM;
  memcpy(kcopy, key, klen + 1);

  size_t mark = w->kv.len; /* a value that fails half-way is rolled back */
  int rc = gguf__wput_str(&w->kv, key, klen);
  if (rc == 0) rc = gguf__wput_le(&w->kv, (uint64_t)v->type, 4);
  if (rc == 0) rc = gguf__wvalue(&w->kv, v, 0);
  if (rc < 0) {
    w->kv.len = mark;
    free(kcopy);
    return rc;
  }
  w->keys[w->n_kv++] = kcopy;
  if (is_align) w->alignment = v->v.u64;
  return 0;
}

static int gguf__add_u(struct gguf_writer *w, const char *key, enum gguf_vtype t, uint64_t x) {
  struct gguf_value v = {.type = t, .v.u64 = x};
  return gguf_writer_add_value(w, key, &v);
}

static int gguf__add_i(struct gguf_writer *w, const char *key, enum gguf_vtype t, int64_t x) {
  struct gguf_value v = {.type = t, .v.i64 = x};
  return gguf_writer_add_value(w, key, &v);
}

int gguf_writer_add_u8(struct gguf_writer *w, const char *key, uint8_t v) {
  return gguf__add_u(w, key, GGUF_VT_UINT8, v);
}
int gguf_writer_add_u16(struct gguf_writer *w, const char *key, uint16_t v) {
  return gguf__add_u(w, key, GGUF_VT_UINT16, v);
}
int gguf_writer_add_u32(struct gguf_writer *w, const char *key, uint32_t v) {
  return gguf__add_u(w, key, GGUF_VT_UINT32, v);
}
int gguf_writer_add_u64(struct gguf_writer *w, const char *key, uint64_t v) {
  return gguf__add_u(w, key, GGUF_VT_UINT64, v);
}
int gguf_writer_add_bool(struct gguf_writer *w, const char *key, bool v) {
  return gguf__add_u(w, key, GGUF_VT_BOOL, v ? 1 : 0);
}
int gguf_writer_add_i8(struct gguf_writer *w, const char *key, int8_t v) {
  return gguf__add_i(w, key, GGUF_VT_INT8, v);
}
int gguf_writer_add_i16(struct gguf_writer *w, const char *key, int16_t v) {
  return gguf__add_i(w, key, GGUF_VT_INT16, v);
}
int gguf_writer_add_i32(struct gguf_writer *w, const char *key, int32_t v) {
  return gguf__add_i(w, key, GGUF_VT_INT32, v);
}
int gguf_writer_add_i64(struct gguf_writer *w, const char *key, int64_t v) {
  return gguf__add_i(w, key, GGUF_VT_INT64, v);
}

int gguf_writer_add_f32(struct gguf_writer *w, const char *key, float v) {
  struct gguf_value val = {.type = GGUF_VT_FLOAT32, .v.f64 = v};
  return gguf_writer_add_value(w, key, &val);
}

int gguf_writer_add_f64(struct gguf_writer *w, const char *key, double v) {
  struct gguf_value val = {.type = GGUF_VT_FLOAT64, .v.f64 = v};
  return gguf_writer_add_value(w, key, &val);
}

int gguf_writer_add_strn(struct gguf_writer *w, const char *key, const char *s, size_t len) {
  if (!s && len) return KVD_EINVAL;
  struct gguf_value v = {.type = GGUF_VT_STRING, .v.str = {.len = len, .ptr = s ? s : ""}};
  return gguf_writer_add_value(w, key, &v);
}

int gguf_writer_add_str(struct gguf_writer *w, const char *key, const char *s) {
  if (!s) return KVD_EINVAL;
  return gguf_writer_add_strn(w, key, s, strlen(s));
}

int gguf_writer_add_arr(struct gguf_writer *w, const char *key, enum gguf_vtype et,
                        const void *elems, uint64_t count) {
  size_t esize = gguf_vtype_size(et);
  if (!esize || (!elems && count) || count > SIZE_MAX / esize) return KVD_EINVAL;
  /* Re-encode little-endian from the host's native layout. */
  uint8_t *raw = malloc(count ? (size_t)(count * esize) : 1);
  if (!raw) return KVD_ENOMEM;
  const uint8_t *src = elems;
  for (uint64_t i = 0; i < count; i++) {
    uint64_t x = 0;
    switch (et) {
    case GGUF_VT_UINT8:
    case GGUF_VT_INT8:
      x = src[i];
      break;
    case GGUF_VT_BOOL:
      x = ((const bool *)elems)[i] ? 1 : 0;
      break;
    case GGUF_VT_UINT16:
    case GGUF_VT_INT16: {
      uint16_t y;
      memcpy(&y, src + i * 2, 2);
      x = y;
      break;
    }
    case GGUF_VT_UINT32:
    case GGUF_VT_INT32:
    case GGUF_VT_FLOAT32: {
      uint32_t y;
      memcpy(&y, src + i * 4, 4);
      x = y;
      break;
    }
    default: {
      memcpy(&x, src + i * 8, 8);
      break;
    }
    }
    for (size_t k = 0; k < esize; k++)
      raw[i * esize + k] = (uint8_t)(x >> (8 * k));
  }
  struct gguf_value v = {.type = GGUF_VT_ARRAY};
  v.v.arr.type = et;
  v.v.arr.count = count;
  v.v.arr.data = raw;
  int rc = gguf_writer_add_value(w, key, &v);
  free(raw);
  return rc;
}

int gguf_writer_add_str_arr(struct gguf_writer *w, const char *key, const char *const *strs,
                            uint64_t count) {
  if (!strs && count) return KVD_EINVAL;
  if (count > SIZE_MAX / sizeof(struct gguf_value)) return KVD_EINVAL;
  struct gguf_value *elems = calloc(count ? (size_t)count : 1, sizeof *elems);
  if (!elems) return KVD_ENOMEM;
  int rc = 0;
  for (uint64_t i = 0; i < count && rc == 0; i++) {
    if (!strs[i]) rc = KVD_EINVAL;
    elems[i].type = GGUF_VT_STRING;
    elems[i].v.str.ptr = strs[i];
    elems[i].v.str.len = strs[i] ? strlen(strs[i]) : 0;
  }
  if (rc == 0) {
    struct gguf_value v = {.type = GGUF_VT_ARRAY};
    v.v.arr.type = GGUF_VT_STRING;
    v.v.arr.count = count;
    v.v.arr.elems = elems;
    rc = gguf_writer_add_value(w, key, &v);
  }
  free(elems);
  return rc;
}

/* ---- tensors ---- */

static int gguf__add_tensor(struct gguf_writer *w, const char *name, uint32_t n_dims,
                            const uint64_t *ne, enum dtype type, struct gguf__wtensor **ret) {
  if (!w || !name || !ne || n_dims < 1 || n_dims > GGUF_MAX_DIMS) return KVD_EINVAL;
  size_t nlen = strlen(name);
  if (nlen == 0 || nlen > GGUF_MAX_TENSOR_NAME) return KVD_EINVAL;
  for (uint64_t i = 0; i < w->n_tensors; i++)
    if (strcmp(w->tensors[i].name, name) == 0) return KVD_EEXIST;
  const struct dtype_info *di = (unsigned)type < DTYPE_MAX ? dtype_get((uint32_t)type) : NULL;
  if (!di || di->block_elems == 0 || di->block_bytes == 0) return KVD_EINVAL;
  uint64_t nel = 1;
  for (uint32_t d = 0; d < n_dims; d++) {
    if (ne[d] == 0 || ne[d] > (uint64_t)INT64_MAX || nel > (uint64_t)INT64_MAX / ne[d])
      return KVD_EINVAL;
    nel *= ne[d];
  }
  if (ne[0] % di->block_elems != 0) return KVD_EINVAL;
  uint64_t blocks = nel / di->block_elems;
  if (blocks > UINT64_MAX / di->block_bytes) return KVD_EOVERFLOW;

  if (w->n_tensors == w->tensors_cap) {
    size_t cap = w->tensors_cap ? w->tensors_cap * 2 : 16;
    struct gguf__wtensor *t = realloc(w->tensors, cap * sizeof *t);
    if (!t) return KVD_ENOMEM;
    w->tensors = t;
    w->tensors_cap = cap;
  }
  struct gguf__wtensor *t = &w->tensors[w->n_tensors];
  memset(t, 0, sizeof *t);
  t->name = malloc(nlen + 1);
  if (!t->name) return KVD_ENOMEM;
  memcpy(t->name, name, nlen + 1);
  t->n_dims = n_dims;
  for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++)
    t->ne[d] = d < n_dims ? ne[d] : 1;
  t->type = type;
  t->nbytes = blocks * di->block_bytes;
  *ret = t; /* counted by the caller once it is complete */
  return 0;
}

int gguf_writer_add_tensor(struct gguf_writer *w, const char *name, uint32_t n_dims,
                           const uint64_t *ne, enum dtype type, const void *data, uint64_t nbytes) {
  struct gguf__wtensor *t;
  if (!data) return KVD_EINVAL;
  int rc = gguf__add_tensor(w, name, n_dims, ne, type, &t);
  if (rc < 0) return rc;
  if (nbytes != t->nbytes || nbytes > SIZE_MAX) {
    free(t->name);
    return KVD_EINVAL;
  }
  t->data = malloc((size_t)nbytes);
  if (!t->data) {
    free(t->name);
    return KVD_ENOMEM;
  }
  memcpy(t->data, data, (size_t)nbytes);
  w->n_tensors++;
  return 0;
}

int gguf_writer_add_tensor_fill(struct gguf_writer *w, const char *name, uint32_t n_dims,
                                const uint64_t *ne, enum dtype type, gguf_fill_fn fill, void *ctx) {
  struct gguf__wtensor *t;
  if (!fill) return KVD_EINVAL;
  int rc = gguf__add_tensor(w, name, n_dims, ne, type, &t);
  if (rc < 0) return rc;
  t->fill = fill;
  t->ctx = ctx;
  w->n_tensors++;
  return 0;
}

/* ---- output ---- */

static uint64_t gguf__pad(uint64_t n, uint64_t align) {
  return (align - n % align) % align;
}

/* The header, the kv section and the tensor infos, with offsets laid out in add order, each
 * tensor padded to the alignment. */
static int gguf__head(const struct gguf_writer *w, struct gguf__wbuf *b, uint64_t *ret_data_bytes) {
  int rc = gguf__wput(b, "GGUF", 4);
  if (rc == 0) rc = gguf__wput_le(b, w->version, 4);
  if (rc == 0) rc = gguf__wput_le(b, w->n_tensors, 8);
  if (rc == 0) rc = gguf__wput_le(b, w->n_kv, 8);
  if (rc == 0) rc = gguf__wput(b, w->kv.p, w->kv.len);
  uint64_t off = 0;
  for (uint64_t i = 0; i < w->n_tensors && rc == 0; i++) {
    const struct gguf__wtensor *t = &w->tensors[i];
    rc = gguf__wput_str(b, t->name, strlen(t->name));
    if (rc == 0) rc = gguf__wput_le(b, t->n_dims, 4);
    for (uint32_t d = 0; d < t->n_dims && rc == 0; d++)
      rc = gguf__wput_le(b, t->ne[d], 8);
    if (rc == 0) rc = gguf__wput_le(b, (uint64_t)t->type, 4);
    if (rc == 0) rc = gguf__wput_le(b, off, 8);
    uint64_t step = t->nbytes + gguf__pad(t->nbytes, w->alignment);
    if (step < t->nbytes || off > UINT64_MAX - step) rc = KVD_EOVERFLOW;
    off += step;
  }
  if (rc < 0) return rc;
  static const uint8_t zeros[64];
  uint64_t pad = gguf__pad(b->len, w->alignment);
  while (pad && rc == 0) {
    size_t n = pad < sizeof zeros ? (size_t)pad : sizeof zeros;
    rc = gguf__wput(b, zeros, n);
    pad -= n;
  }
  *ret_data_bytes = off;
  return rc;
}

uint64_t gguf_writer_file_size(const struct gguf_writer *w) {
  struct gguf__wbuf b = {0};
  uint64_t data = 0;
  if (!w || gguf__head(w, &b, &data) < 0) {
    free(b.p);
    return 0;
  }
  uint64_t n = b.len + data;
  free(b.p);
  return n;
}

static int gguf__io_code(int e) {
  if (e == ENOSPC || e == EDQUOT) return KVD_ENOSPC;
  if (e == EACCES || e == EPERM || e == EROFS) return KVD_EACCES;
  if (e == ENOENT || e == ENOTDIR) return KVD_ENOENT;
  if (e == ENOMEM) return KVD_ENOMEM;
  return KVD_EIO;
}

static int gguf__fwrite(FILE *out, const void *p, size_t n) {
  if (n && fwrite(p, 1, n, out) != n) return gguf__io_code(errno);
  return 0;
}

static int gguf__write_stream(struct gguf_writer *w, FILE *out) {
  struct gguf__wbuf b = {0};
  uint64_t data_bytes;
  int rc = gguf__head(w, &b, &data_bytes);
  if (rc == 0) rc = gguf__fwrite(out, b.p, b.len);
  free(b.p);
  static const uint8_t zeros[256];
  for (uint64_t i = 0; i < w->n_tensors && rc == 0; i++) {
    struct gguf__wtensor *t = &w->tensors[i];
    if (t->nbytes > SIZE_MAX) return KVD_E2BIG;
    if (t->data) {
      rc = gguf__fwrite(out, t->data, (size_t)t->nbytes);
    } else {
      void *buf = malloc((size_t)t->nbytes);
      if (!buf) return KVD_ENOMEM;
      rc = t->fill(t->ctx, buf, t->nbytes);
      if (rc == 0) rc = gguf__fwrite(out, buf, (size_t)t->nbytes);
      free(buf);
    }
    uint64_t pad = gguf__pad(t->nbytes, w->alignment);
    while (pad && rc == 0) {
      size_t n = pad < sizeof zeros ? (size_t)pad : sizeof zeros;
      rc = gguf__fwrite(out, zeros, n);
      pad -= n;
    }
  }
  return rc;
}

int gguf_writer_write_file(struct gguf_writer *w, const char *path) {
  if (!w || !path) return KVD_EINVAL;
  size_t plen = strlen(path);
  char *tmp = malloc(plen + sizeof ".tmp-XXXXXX");
  if (!tmp) return KVD_ENOMEM;
  memcpy(tmp, path, plen);
  memcpy(tmp + plen, ".tmp-XXXXXX", sizeof ".tmp-XXXXXX");
  int fd = mkstemp(tmp);
  if (fd < 0) {
    int rc = gguf__io_code(errno);
    free(tmp);
    return rc;
  }
  /* mkstemp makes the file private; a model is an ordinary readable file */
  (void)fchmod(fd, 0644);
  FILE *out = fdopen(fd, "wb");
  if (!out) {
    int rc = gguf__io_code(errno);
    close(fd);
    unlink(tmp);
    free(tmp);
    return rc;
  }
  int rc = gguf__write_stream(w, out);
  if (fflush(out) != 0 && rc == 0) rc = gguf__io_code(errno);
  if (fclose(out) != 0 && rc == 0) rc = gguf__io_code(errno);
  if (rc == 0 && rename(tmp, path) != 0) rc = gguf__io_code(errno);
  if (rc < 0) unlink(tmp);
  free(tmp);
  return rc;
}

int gguf_writer_write_mem(struct gguf_writer *w, void **ret_data, size_t *ret_size) {
  if (!w || !ret_data || !ret_size) return KVD_EINVAL;
  char *buf = NULL;
  size_t len = 0;
  FILE *out = open_memstream(&buf, &len);
  if (!out) return KVD_ENOMEM;
  int rc = gguf__write_stream(w, out);
  if (fclose(out) != 0 && rc == 0) rc = KVD_ENOMEM;
  if (rc < 0) {
    free(buf);
    return rc;
  }
  *ret_data = buf;
  *ret_size = len;
  return 0;
}
