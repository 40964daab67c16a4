/* GGUF reader, written from the GGUF specification (ggml docs/gguf.md).
 *
 * File grammar (all integers little-endian):
 *   file    := header kv{n_kv} tinfo{n_tensors} pad data
 *   header  := "GGUF" u32:version u64:n_tensors u64:n_kv        (v2 and v3; v1 had u32 counts)
 *   kv      := str:key u32:vtype value(vtype)
 *   value   := scalar | str | u32:elem_vtype u64:count value(elem_vtype){count}
 *   str     := u64:len bytes{len}                               (no terminator)
 *   tinfo   := str:name u32:n_dims u64:ne{n_dims} u32:type u64:offset
 *   pad     := zero bytes up to a multiple of general.alignment (default 32)
 * Tensor offsets count from the start of data and are multiples of the alignment.
 *
 * Parsing is a cursor that checks every length against the bytes left before it touches them, so
 * the only memory read is inside [base, base + size). Allocations grow with what was actually
 * parsed, never with a count the file merely claims, so a corrupt count cannot make us allocate
 * more than a small multiple of the file's size. */
#include "gguf.h"

#include "kvd_error.h"

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC_LE 0x46554747u /* "GGUF" read as a little-endian u32 */
/* The fewest bytes an entry can take: used to bound counts by the bytes left. A kv is a key
 * (8-byte length + at least one byte), a type and at least a 1-byte value; a tensor info is a
 * name (8 + 1), n_dims, one dim, a type and an offset. */
#define GGUF_MIN_KV_BYTES (8u + 1u + 4u + 1u)
#define GGUF_MIN_TINFO_BYTES (8u + 1u + 4u + 8u + 4u + 8u)

/* Hash index from names to entry numbers: open addressing, slot holds index + 1, 0 is empty. */
struct gguf__index {
  uint64_t *slots;
  uint64_t mask;
};

struct gguf__file {
  struct gguf_file pub; /* first, so a gguf_file pointer is this struct's pointer */
  struct gguf__index kv_index;
  struct gguf__index tensor_index;
};

/* A path of array element indexes, for messages about deeply nested values. */
struct gguf__cur {
  const uint8_t *base;
  uint64_t size;
  uint64_t pos;
  struct gguf_error *err;
  char ctx[96]; /* "kv 5 'general.name'", prefixed to messages; "" at the header */
  int depth;
  uint64_t path[GGUF_MAX_ARRAY_DEPTH];
};

static const uint8_t gguf__empty[1];

/* ---- small helpers ---- */

static uint64_t gguf__le(const uint8_t *p, unsigned n) {
  uint64_t v = 0;
  for (unsigned i = 0; i < n; i++)
    v |= (uint64_t)p[i] << (8 * i);
  return v;
}

static uint64_t gguf__hash(const char *p, uint64_t len) {
  uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */
  for (uint64_t i = 0; i < len; i++) {
    h ^= (uint8_t)p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

/* Copies a name into a message, printable ASCII only and cut to fit, so a corrupt name can
 * neither garble the message nor overflow it. */
static void gguf__quote(char *dst, size_t cap, const char *p, uint64_t len) {
  size_t max = cap - 1, n = 0;
  bool cut = len > max;
  if (cut) max -= 3;
  for (uint64_t i = 0; i < len && n < max; i++) {
    unsigned char ch = (unsigned char)p[i];
    dst[n++] = (ch >= 0x20 && ch < 0x7f) ? (char)ch : '?';
  }
  if (cut) {
    memcpy(dst + n, "...", 3);
    n += 3;
  }
  dst[n] = '\0';
}

__attribute__((format(printf, 3, 4))) static int gguf__fail(struct gguf__cur *c, uint64_t off,
                                                            const char *fmt, ...) {
  struct gguf_error *e = c->err;
  size_t n = 0;
  e->offset = off;
  e->msg[0] = '\0';
  if (c->ctx[0]) {
    int w = snprintf(e->msg, sizeof e->msg, "%s", c->ctx);
    n = w > 0 ? (size_t)w : 0;
    for (int d = 0; d < c->depth && n < sizeof e->msg; d++) {
      w = snprintf(e->msg + n, sizeof e->msg - n, "[%llu]", (unsigned long long)c->path[d]);
      n += w > 0 ? (size_t)w : 0;
    }
    if (n < sizeof e->msg) {
      w = snprintf(e->msg + n, sizeof e->msg - n, ": ");
      n += w > 0 ? (size_t)w : 0;
    }
  }
  if (n < sizeof e->msg) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg + n, sizeof e->msg - n, fmt, ap);
    va_end(ap);
  }
  return KVD_E_FORMAT;
}

static uint64_t gguf__left(const struct gguf__cur *c) {
  return c->size - c->pos;
}

static int gguf__need(struct gguf__cur *c, uint64_t n, const char *what) {
  if (n <= gguf__left(c)) return 0;
  return gguf__fail(c, c->pos, "%s (%llu bytes at offset %llu) past end of file (%llu bytes)", what,
                    (unsigned long long)n, (unsigned long long)c->pos, (unsigned long long)c->size);
}

static int gguf__u32(struct gguf__cur *c, const char *what, uint32_t *ret) {
  int rc = gguf__need(c, 4, what);
  if (rc < 0) return rc;
  *ret = (uint32_t)gguf__le(c->base + c->pos, 4);
  c->pos += 4;
  return 0;
}

static int gguf__u64(struct gguf__cur *c, const char *what, uint64_t *ret) {
  int rc = gguf__need(c, 8, what);
  if (rc < 0) return rc;
  *ret = gguf__le(c->base + c->pos, 8);
  c->pos += 8;
  return 0;
}

static int gguf__str(struct gguf__cur *c, const char *what, struct gguf_str *ret) {
  uint64_t at = c->pos, len;
  int rc = gguf__u64(c, what, &len);
  if (rc < 0) return rc;
  if (len > gguf__left(c))
    return gguf__fail(c, at, "%s length %llu past end of file (%llu bytes left at offset %llu)",
                      what, (unsigned long long)len, (unsigned long long)gguf__left(c),
                      (unsigned long long)c->pos);
  ret->len = len;
  ret->ptr = (const char *)(c->base + c->pos);
  c->pos += len;
  return 0;
}

/* ---- hash index ---- */

static void gguf__index_free(struct gguf__index *ix) {
  free(ix->slots);
  ix->slots = NULL;
}

/* Builds an index over n names; on a duplicate returns KVD_EEXIST with the two entry numbers. */
static int gguf__index_build(struct gguf__index *ix, uint64_t n,
                             const struct gguf_str *(*name_of)(const void *, uint64_t),
                             const void *arr, uint64_t *ret_first, uint64_t *ret_dup) {
  uint64_t cap = 16;
  while (cap < n * 2)
    cap *= 2; /* n is bounded by the file size, so this cannot overflow */
  ix->slots = calloc(cap, sizeof *ix->slots);
  if (!ix->slots) return KVD_ENOMEM;
  ix->mask = cap - 1;
  for (uint64_t i = 0; i < n; i++) {
    const struct gguf_str *s = name_of(arr, i);
    uint64_t h = gguf__hash(s->ptr, s->len) & ix->mask;
    while (ix->slots[h]) {
      const struct gguf_str *o = name_of(arr, ix->slots[h] - 1);
      if (o->len == s->len && memcmp(o->ptr, s->ptr, s->len) == 0) {
        *ret_first = ix->slots[h] - 1;
        *ret_dup = i;
        return KVD_EEXIST;
      }
      h = (h + 1) & ix->mask;
    }
    ix->slots[h] = i + 1;
  }
  return 0;
}

static const struct gguf_str *gguf__kv_name(const void *arr, uint64_t i) {
  return &((const struct gguf_kv *)arr)[i].key;
}

static const struct gguf_str *gguf__tensor_name(const void *arr, uint64_t i) {
  return &((const struct gguf_tensor *)arr)[i].name;
}

static uint64_t gguf__index_find(const struct gguf__index *ix, const char *key,
                                 const struct gguf_str *(*name_of)(const void *, uint64_t),
                                 const void *arr) {
  if (!ix->slots) return UINT64_MAX;
  size_t len = strlen(key);
  uint64_t h = gguf__hash(key, len) & ix->mask;
  while (ix->slots[h]) {
    const struct gguf_str *o = name_of(arr, ix->slots[h] - 1);
    if (o->len == len && memcmp(o->ptr, key, len) == 0) return ix->slots[h] - 1;
    h = (h + 1) & ix->mask;
  }
  return UINT64_MAX;
}

/* ---- values ---- */

size_t gguf_vtype_size(enum gguf_vtype t) {
  switch (t) {
  case GGUF_VT_UINT8:
  case GGUF_VT_INT8:
  case GGUF_VT_BOOL:
    return 1;
  case GGUF_VT_UINT16:
  case GGUF_VT_INT16:
    return 2;
  case GGUF_VT_UINT32:
  case GGUF_VT_INT32:
  case GGUF_VT_FLOAT32:
    return 4;
  case GGUF_VT_UINT64:
  case GGUF_VT_INT64:
  case GGUF_VT_FLOAT64:
    return 8;
  default:
    return 0;
  }
}

const char *gguf_vtype_name(enum gguf_vtype t) {
  static const char *const names[GGUF_VT_COUNT] = {
      [GGUF_VT_UINT8] = "uint8",     [GGUF_VT_INT8] = "int8",     [GGUF_VT_UINT16] = "uint16",
      [GGUF_VT_INT16] = "int16",     [GGUF_VT_UINT32] = "uint32", [GGUF_VT_INT32] = "int32",
      [GGUF_VT_FLOAT32] = "float32", [GGUF_VT_BOOL] = "bool",     [GGUF_VT_STRING] = "string",
      [GGUF_VT_ARRAY] = "array",     [GGUF_VT_UINT64] = "uint64", [GGUF_VT_INT64] = "int64",
      [GGUF_VT_FLOAT64] = "float64",
  };
  if ((unsigned)t >= GGUF_VT_COUNT) return "unknown";
  return names[t];
}

/* Decodes one fixed-size scalar from validated little-endian bytes. */
static void gguf__decode_scalar(enum gguf_vtype t, const uint8_t *p, struct gguf_value *v) {
  v->type = t;
  switch (t) {
  case GGUF_VT_UINT8:
  case GGUF_VT_BOOL:
    v->v.u64 = p[0];
    break;
  case GGUF_VT_INT8:
    v->v.i64 = (int8_t)p[0];
    break;
  case GGUF_VT_UINT16:
    v->v.u64 = gguf__le(p, 2);
    break;
  case GGUF_VT_INT16:
    v->v.i64 = (int16_t)(uint16_t)gguf__le(p, 2);
    break;
  case GGUF_VT_UINT32:
    v->v.u64 = gguf__le(p, 4);
    break;
  case GGUF_VT_INT32:
    v->v.i64 = (int32_t)(uint32_t)gguf__le(p, 4);
    break;
  case GGUF_VT_UINT64:
    v->v.u64 = gguf__le(p, 8);
    break;
  case GGUF_VT_INT64:
    v->v.i64 = (int64_t)gguf__le(p, 8);
    break;
  case GGUF_VT_FLOAT32: {
    uint32_t bits = (uint32_t)gguf__le(p, 4);
    float f;
    memcpy(&f, &bits, sizeof f);
    v->v.f64 = f;
    break;
  }
  case GGUF_VT_FLOAT64: {
    uint64_t bits = gguf__le(p, 8);
    memcpy(&v->v.f64, &bits, sizeof v->v.f64);
    break;
  }
  default:
    break;
  }
}

static void gguf__free_value(struct gguf_value *v) {
  if (v->type != GGUF_VT_ARRAY || !v->v.arr.elems) return;
  struct gguf_value *elems = (struct gguf_value *)v->v.arr.elems;
  if (v->v.arr.type == GGUF_VT_ARRAY)
    for (uint64_t i = 0; i < v->v.arr.count; i++)
      gguf__free_value(&elems[i]);
  free(elems);
  v->v.arr.elems = NULL;
}

static int gguf__parse_value(struct gguf__cur *c, uint32_t type, struct gguf_value *v);

static int gguf__parse_array(struct gguf__cur *c, struct gguf_value *v) {
  uint64_t at = c->pos;
  uint32_t et;
  uint64_t count;
  int rc;
  if (c->depth >= GGUF_MAX_ARRAY_DEPTH)
    return gguf__fail(c, at, "arrays nested deeper than %d levels", GGUF_MAX_ARRAY_DEPTH);
  if ((rc = gguf__u32(c, "array element type", &et)) < 0) return rc;
  if (et >= GGUF_VT_COUNT) return gguf__fail(c, at, "unknown array element type %u", et);
  uint64_t count_at = c->pos;
  if ((rc = gguf__u64(c, "array count", &count)) < 0) return rc;
  v->type = GGUF_VT_ARRAY;
  v->v.arr.type = (enum gguf_vtype)et;
  v->v.arr.count = 0;
  v->v.arr.data = c->base + c->pos;
  v->v.arr.elems = NULL;

  size_t esize = gguf_vtype_size((enum gguf_vtype)et);
  if (esize) {
    if (count > gguf__left(c) / esize)
      return gguf__fail(c, count_at,
                        "array of %llu %s (%llu bytes each) past end of file (%llu bytes left)",
                        (unsigned long long)count, gguf_vtype_name((enum gguf_vtype)et),
                        (unsigned long long)esize, (unsigned long long)gguf__left(c));
    if (et == GGUF_VT_BOOL)
      for (uint64_t i = 0; i < count; i++)
        if (c->base[c->pos + i] > 1)
          return gguf__fail(c, c->pos + i, "bool element %llu is %u, not 0 or 1",
                            (unsigned long long)i, c->base[c->pos + i]);
    v->v.arr.count = count;
    c->pos += count * esize;
    return 0;
  }

  /* Strings and arrays: each element takes at least its 8-byte length (plus a 4-byte type for
   * arrays), which bounds the index we allocate by the bytes that are really there. */
  uint64_t min = et == GGUF_VT_STRING ? 8 : 12;
  if (count > gguf__left(c) / min)
    return gguf__fail(c, count_at, "array of %llu %ss cannot fit in the %llu bytes left",
                      (unsigned long long)count, gguf_vtype_name((enum gguf_vtype)et),
                      (unsigned long long)gguf__left(c));
  if (count == 0) return 0;
  struct gguf_value *elems = calloc(count, sizeof *elems);
  if (!elems) return KVD_ENOMEM;
  /* Published before parsing so an error part-way frees what was built (calloc's zeroed
   * elements are UINT8 scalars, which own nothing). */
  v->v.arr.elems = elems;
  v->v.arr.count = count;
  c->depth++;
  for (uint64_t i = 0; i < count; i++) {
    c->path[c->depth - 1] = i;
    rc = gguf__parse_value(c, et, &elems[i]);
    if (rc < 0) return rc;
  }
  c->depth--;
  return 0;
}

static int gguf__parse_value(struct gguf__cur *c, uint32_t type, struct gguf_value *v) {
  uint64_t at = c->pos;
  int rc;
  if (type >= GGUF_VT_COUNT) return gguf__fail(c, at, "unknown value type %u", type);
  if (type == GGUF_VT_STRING) {
    v->type = GGUF_VT_STRING;
    return gguf__str(c, "string", &v->v.str);
  }
  if (type == GGUF_VT_ARRAY) return gguf__parse_array(c, v);
  size_t n = gguf_vtype_size((enum gguf_vtype)type);
  if ((rc = gguf__need(c, n, gguf_vtype_name((enum gguf_vtype)type))) < 0) return rc;
  if (type == GGUF_VT_BOOL && c->base[at] > 1)
    return gguf__fail(c, at, "bool value is %u, not 0 or 1", c->base[at]);
  gguf__decode_scalar((enum gguf_vtype)type, c->base + at, v);
  c->pos += n;
  return 0;
}

/* ---- the file ---- */

static void gguf__set_ctx_name(struct gguf__cur *c, const char *kind, uint64_t i,
                               const struct gguf_str *name) {
  char q[56];
  if (name) {
    gguf__quote(q, sizeof q, name->ptr, name->len);
    snprintf(c->ctx, sizeof c->ctx, "%s %llu '%s'", kind, (unsigned long long)i, q);
  } else {
    snprintf(c->ctx, sizeof c->ctx, "%s %llu", kind, (unsigned long long)i);
  }
}

/* Grows an array geometrically so storage follows what was parsed, not a claimed count. */
static int gguf__grow(void **arr, uint64_t *cap, uint64_t need, size_t elem) {
  if (need <= *cap) return 0;
  uint64_t n = *cap ? *cap * 2 : 16;
  if (n < need) n = need;
  void *p = realloc(*arr, n * elem);
  if (!p) return KVD_ENOMEM;
  memset((char *)p + *cap * elem, 0, (n - *cap) * elem);
  *arr = p;
  *cap = n;
  return 0;
}

static int gguf__parse_header(struct gguf__cur *c, struct gguf_file *f) {
  if (c->size < 4)
    return gguf__fail(c, 0, "file is %llu bytes, too short for the GGUF magic",
                      (unsigned long long)c->size);
  uint32_t magic = (uint32_t)gguf__le(c->base, 4);
  if (magic != GGUF_MAGIC_LE) {
    /* Not a GGUF file: nothing of it goes into the message (the daemon may have been asked to
     * open a file its client cannot read, and errors travel back to that client). */
    if (memcmp(c->base, "lmgg", 4) == 0 || memcmp(c->base, "fmgg", 4) == 0 ||
        memcmp(c->base, "tjgg", 4) == 0)
      return gguf__fail(c, 0, "legacy GGML/GGMF/GGJT file: convert it to GGUF");
    return gguf__fail(c, 0, "bad magic, not a GGUF file");
  }
  c->pos = 4;
  uint32_t version;
  int rc = gguf__u32(c, "version", &version);
  if (rc < 0) return rc;
  if (version == 1)
    return gguf__fail(c, 4, "GGUF version 1 is not supported (32-bit counts); kvd reads v2 and v3");
  if (version != 2 && version != 3) {
    if ((version & 0xffff) == 0 && (version >> 24) >= 1 && (version >> 24) <= 3)
      return gguf__fail(c, 4, "big-endian GGUF (version field 0x%08x) is not supported", version);
    return gguf__fail(c, 4, "unsupported GGUF version %u; kvd reads v2 and v3", version);
  }
  f->version = version;
  uint64_t n_tensors, n_kv;
  if ((rc = gguf__u64(c, "tensor count", &n_tensors)) < 0) return rc;
  if ((rc = gguf__u64(c, "kv count", &n_kv)) < 0) return rc;
  uint64_t left = gguf__left(c);
  if (n_tensors > left / GGUF_MIN_TINFO_BYTES)
    return gguf__fail(c, 8, "tensor count %llu cannot fit in the %llu bytes after the header",
                      (unsigned long long)n_tensors, (unsigned long long)left);
  if (n_kv > left / GGUF_MIN_KV_BYTES)
    return gguf__fail(c, 16, "kv count %llu cannot fit in the %llu bytes after the header",
                      (unsigned long long)n_kv, (unsigned long long)left);
  if (n_tensors * GGUF_MIN_TINFO_BYTES + n_kv * GGUF_MIN_KV_BYTES > left)
    return gguf__fail(
        c, 8, "%llu tensors and %llu kvs cannot fit in the %llu bytes after the header",
        (unsigned long long)n_tensors, (unsigned long long)n_kv, (unsigned long long)left);
  f->n_tensors = n_tensors; /* claimed; the arrays below hold only what was parsed */
  f->n_kv = n_kv;
  return 0;
}

static int gguf__parse_kvs(struct gguf__cur *c, struct gguf__file *impl, uint64_t n_kv) {
  struct gguf_file *f = &impl->pub;
  uint64_t cap = 0;
  int rc;
  f->n_kv = 0;
  for (uint64_t i = 0; i < n_kv; i++) {
    gguf__set_ctx_name(c, "kv", i, NULL);
    if ((rc = gguf__grow((void **)&f->kv, &cap, i + 1, sizeof *f->kv)) < 0) return rc;
    struct gguf_kv *kv = &f->kv[i];
    uint64_t at = c->pos;
    if ((rc = gguf__str(c, "key", &kv->key)) < 0) return rc;
    if (kv->key.len == 0) return gguf__fail(c, at, "empty key");
    if (kv->key.len > GGUF_MAX_KEY)
      return gguf__fail(c, at, "key length %llu exceeds %d", (unsigned long long)kv->key.len,
                        GGUF_MAX_KEY);
    if (memchr(kv->key.ptr, '\0', kv->key.len))
      return gguf__fail(c, at + 8, "key contains a NUL byte");
    f->n_kv = i + 1; /* from here the entry may own memory, so it must be freed on error */
    gguf__set_ctx_name(c, "kv", i, &kv->key);
    uint32_t type;
    if ((rc = gguf__u32(c, "value type", &type)) < 0) return rc;
    if ((rc = gguf__parse_value(c, type, &kv->value)) < 0) return rc;
  }

  uint64_t first, dup;
  c->ctx[0] = '\0';
  rc = gguf__index_build(&impl->kv_index, f->n_kv, gguf__kv_name, f->kv, &first, &dup);
  if (rc == KVD_EEXIST) {
    char q[56];
    gguf__quote(q, sizeof q, f->kv[dup].key.ptr, f->kv[dup].key.len);
    return gguf__fail(c, (uint64_t)((const uint8_t *)f->kv[dup].key.ptr - c->base) - 8,
                      "kv %llu: duplicate key '%s' (first at kv %llu)", (unsigned long long)dup, q,
                      (unsigned long long)first);
  }
  return rc;
}

static int gguf__alignment(struct gguf__cur *c, struct gguf__file *impl) {
  struct gguf_file *f = &impl->pub;
  f->alignment = GGUF_DEFAULT_ALIGNMENT;
  uint64_t i = gguf__index_find(&impl->kv_index, "general.alignment", gguf__kv_name, f->kv);
  if (i == UINT64_MAX) return 0;
  const struct gguf_value *v = &f->kv[i].value;
  uint64_t at = (uint64_t)((const uint8_t *)f->kv[i].key.ptr - c->base) - 8;
  /* The spec types it uint32, and readers that trust that would misread any other width. */
  if (v->type != GGUF_VT_UINT32)
    return gguf__fail(c, at, "general.alignment has type %s, must be uint32",
                      gguf_vtype_name(v->type));
  if (v->v.u64 == 0 || (v->v.u64 & (v->v.u64 - 1)) != 0)
    return gguf__fail(c, at, "general.alignment %llu is not a nonzero power of two",
                      (unsigned long long)v->v.u64);
  f->alignment = v->v.u64;
  return 0;
}

/* Where each tensor info's offset field sits, for messages about data ranges. */
struct gguf__tref {
  uint64_t start, end, index;
};

static int gguf__tref_cmp(const void *a, const void *b) {
  const struct gguf__tref *x = a, *y = b;
  if (x->start != y->start) return x->start < y->start ? -1 : 1;
  return x->index < y->index ? -1 : x->index > y->index;
}

static int gguf__parse_tensor(struct gguf__cur *c, struct gguf_file *f, uint64_t i,
                              struct gguf_tensor *t, uint64_t *ret_offset_at) {
  uint64_t at = c->pos;
  int rc;
  gguf__set_ctx_name(c, "tensor", i, NULL);
  if ((rc = gguf__str(c, "name", &t->name)) < 0) return rc;
  if (t->name.len == 0) return gguf__fail(c, at, "empty name");
  if (t->name.len > GGUF_MAX_TENSOR_NAME)
    return gguf__fail(c, at, "name length %llu exceeds %d", (unsigned long long)t->name.len,
                      GGUF_MAX_TENSOR_NAME);
  if (memchr(t->name.ptr, '\0', t->name.len))
    return gguf__fail(c, at + 8, "name contains a NUL byte");
  gguf__set_ctx_name(c, "tensor", i, &t->name);

  at = c->pos;
  if ((rc = gguf__u32(c, "n_dims", &t->n_dims)) < 0) return rc;
  if (t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS)
    return gguf__fail(c, at, "n_dims %u is not in 1..%d", t->n_dims, GGUF_MAX_DIMS);
  uint64_t nel = 1;
  for (int d = 0; d < GGUF_MAX_DIMS; d++)
    t->ne[d] = 1;
  for (uint32_t d = 0; d < t->n_dims; d++) {
    at = c->pos;
    if ((rc = gguf__u64(c, "dimension", &t->ne[d])) < 0) return rc;
    if (t->ne[d] == 0) return gguf__fail(c, at, "dimension %u is zero", d);
    /* ggml stores dims as int64 */
    if (t->ne[d] > (uint64_t)INT64_MAX)
      return gguf__fail(c, at, "dimension %u = %llu exceeds INT64_MAX", d,
                        (unsigned long long)t->ne[d]);
    if (nel > (uint64_t)INT64_MAX / t->ne[d])
      return gguf__fail(c, at, "element count overflows at dimension %u (%llu x %llu)", d,
                        (unsigned long long)nel, (unsigned long long)t->ne[d]);
    nel *= t->ne[d];
  }

  at = c->pos;
  uint32_t type;
  if ((rc = gguf__u32(c, "tensor type", &type)) < 0) return rc;
  const struct dtype_info *di = type < DTYPE_MAX ? dtype_get(type) : NULL;
  if (!di || !di->name || di->block_elems == 0 || di->block_bytes == 0)
    return gguf__fail(c, at, "unknown tensor type %u", type);
  t->type = (enum dtype)type;
  if (t->ne[0] % di->block_elems != 0)
    return gguf__fail(c, at, "row length %llu is not a multiple of the %s block size %u",
                      (unsigned long long)t->ne[0], di->name, di->block_elems);
  uint64_t blocks = nel / di->block_elems;
  if (blocks > UINT64_MAX / di->block_bytes)
    return gguf__fail(c, at, "byte size overflows (%llu blocks of %u bytes)",
                      (unsigned long long)blocks, di->block_bytes);
  t->nbytes = blocks * di->block_bytes;

  at = c->pos;
  if ((rc = gguf__u64(c, "data offset", &t->offset)) < 0) return rc;
  if (t->offset % f->alignment != 0)
    return gguf__fail(c, at, "data offset %llu is not a multiple of the alignment %llu",
                      (unsigned long long)t->offset, (unsigned long long)f->alignment);
  *ret_offset_at = at;
  return 0;
}

static int gguf__parse_tensors(struct gguf__cur *c, struct gguf__file *impl, uint64_t n) {
  struct gguf_file *f = &impl->pub;
  uint64_t cap = 0, ocap = 0;
  uint64_t *offset_at = NULL; /* file offset of each info's offset field */
  struct gguf__tref *refs = NULL;
  int rc = 0;
  f->n_tensors = 0;
  for (uint64_t i = 0; i < n; i++) {
    if ((rc = gguf__grow((void **)&f->tensors, &cap, i + 1, sizeof *f->tensors)) < 0) goto out;
    if ((rc = gguf__grow((void **)&offset_at, &ocap, i + 1, sizeof *offset_at)) < 0) goto out;
    if ((rc = gguf__parse_tensor(c, f, i, &f->tensors[i], &offset_at[i])) < 0) goto out;
    f->n_tensors = i + 1;
  }
  c->ctx[0] = '\0';

  uint64_t first, dup;
  rc = gguf__index_build(&impl->tensor_index, n, gguf__tensor_name, f->tensors, &first, &dup);
  if (rc == KVD_EEXIST) {
    char q[56];
    gguf__quote(q, sizeof q, f->tensors[dup].name.ptr, f->tensors[dup].name.len);
    rc = gguf__fail(c, (uint64_t)((const uint8_t *)f->tensors[dup].name.ptr - c->base) - 8,
                    "tensor %llu: duplicate name '%s' (first at tensor %llu)",
                    (unsigned long long)dup, q, (unsigned long long)first);
  }
  if (rc < 0) goto out;

  /* The data section starts at the next alignment boundary after the infos. A file without
   * tensors may end before that boundary (vocabulary-only files do). */
  uint64_t pad = (f->alignment - c->pos % f->alignment) % f->alignment;
  if (n == 0) {
    f->data_offset = pad <= gguf__left(c) ? c->pos + pad : c->size;
    goto out;
  }
  if (pad > gguf__left(c)) {
    rc = gguf__fail(c, c->pos,
                    "data section at offset %llu (aligned to %llu) past end of file (%llu bytes)",
                    (unsigned long long)(c->pos + pad), (unsigned long long)f->alignment,
                    (unsigned long long)c->size);
    goto out;
  }
  f->data_offset = c->pos + pad;
  uint64_t room = c->size - f->data_offset;

  refs = malloc(n * sizeof *refs);
  if (!refs) {
    rc = KVD_ENOMEM;
    goto out;
  }
  for (uint64_t i = 0; i < n; i++) {
    struct gguf_tensor *t = &f->tensors[i];
    if (t->offset > room || t->nbytes > room - t->offset) {
      char q[56];
      gguf__quote(q, sizeof q, t->name.ptr, t->name.len);
      /* print the range in file offsets, saturating where the sum overflows */
      uint64_t s =
          t->offset > UINT64_MAX - f->data_offset ? UINT64_MAX : f->data_offset + t->offset;
      uint64_t e = t->nbytes > UINT64_MAX - s ? UINT64_MAX : s + t->nbytes;
      rc = gguf__fail(c, offset_at[i],
                      "tensor %llu '%s': data [%llu, %llu) past end of file (%llu bytes)",
                      (unsigned long long)i, q, (unsigned long long)s, (unsigned long long)e,
                      (unsigned long long)c->size);
      goto out;
    }
    t->data = c->base + f->data_offset + t->offset;
    refs[i] = (struct gguf__tref){t->offset, t->offset + t->nbytes, i};
  }
  /* Overlapping tensors mean a corrupt offset table: a write to one would be a read of another. */
  qsort(refs, n, sizeof *refs, gguf__tref_cmp);
  for (uint64_t k = 1; k < n; k++) {
    if (refs[k].start >= refs[k - 1].end) continue;
    const struct gguf_tensor *a = &f->tensors[refs[k - 1].index], *b = &f->tensors[refs[k].index];
    char qa[40], qb[40];
    gguf__quote(qa, sizeof qa, a->name.ptr, a->name.len);
    gguf__quote(qb, sizeof qb, b->name.ptr, b->name.len);
    rc = gguf__fail(c, offset_at[refs[k].index],
                    "tensor '%s' data [+%llu, +%llu) overlaps tensor '%s' [+%llu, +%llu)", qb,
                    (unsigned long long)refs[k].start, (unsigned long long)refs[k].end, qa,
                    (unsigned long long)refs[k - 1].start, (unsigned long long)refs[k - 1].end);
    goto out;
  }
out:
  free(refs);
  free(offset_at);
  return rc;
}

void gguf_close(struct gguf_file *f) {
  if (!f) return;
  struct gguf__file *impl = (struct gguf__file *)f;
  for (uint64_t i = 0; i < f->n_kv; i++)
    gguf__free_value(&f->kv[i].value);
  free(f->kv);
  free(f->tensors);
  gguf__index_free(&impl->kv_index);
  gguf__index_free(&impl->tensor_index);
  if (f->mapped) munmap((void *)f->base, f->size);
  free(impl);
}

/* Parses base[0, size). On failure frees everything except the mapping, which the caller owns
 * until success hands it to the file. */
static int gguf__open(const uint8_t *base, size_t size, struct gguf_file **ret,
                      struct gguf_error *err) {
  struct gguf_error scratch;
  if (!err) err = &scratch;
  err->offset = 0;
  err->msg[0] = '\0';
  struct gguf__file *impl = calloc(1, sizeof *impl);
  if (!impl) {
    snprintf(err->msg, sizeof err->msg, "out of memory");
    return KVD_ENOMEM;
  }
  struct gguf_file *f = &impl->pub;
  f->base = base;
  f->size = size;
  struct gguf__cur c = {.base = base, .size = size, .err = err};

  uint64_t n_tensors, n_kv;
  int rc = gguf__parse_header(&c, f);
  if (rc < 0) goto fail;
  n_tensors = f->n_tensors;
  n_kv = f->n_kv;
  f->n_tensors = 0;
  if ((rc = gguf__parse_kvs(&c, impl, n_kv)) < 0) goto fail;
  if ((rc = gguf__alignment(&c, impl)) < 0) goto fail;
  if ((rc = gguf__parse_tensors(&c, impl, n_tensors)) < 0) goto fail;
  *ret = f;
  return 0;

fail:
  if (rc == KVD_ENOMEM) {
    err->offset = c.pos;
    snprintf(err->msg, sizeof err->msg, "out of memory while parsing at offset %llu",
             (unsigned long long)c.pos);
  }
  f->mapped = false; /* the caller unmaps */
  gguf_close(f);
  return rc;
}

int gguf_open_memory(const void *data, size_t size, struct gguf_file **ret,
                     struct gguf_error *err) {
  if (!ret || (!data && size)) {
    if (err) {
      err->offset = 0;
      snprintf(err->msg, sizeof err->msg, "invalid arguments");
    }
    return KVD_EINVAL;
  }
  /* An empty buffer still needs a real pointer: arithmetic on NULL is undefined. */
  return gguf__open(size ? data : gguf__empty, size, ret, err);
}

static int gguf__errno_code(int e) {
  switch (e) {
  case ENOENT:
  case ENOTDIR:
    return KVD_ENOENT;
  case EACCES:
  case EPERM:
    return KVD_EACCES;
  case ENOMEM:
    return KVD_ENOMEM;
  default:
    return KVD_EIO;
  }
}

int gguf_open(const char *path, struct gguf_file **ret, struct gguf_error *err) {
  struct gguf_error scratch;
  if (!err) err = &scratch;
  err->offset = 0;
  err->msg[0] = '\0';
  if (!path || !ret) {
    snprintf(err->msg, sizeof err->msg, "invalid arguments");
    return KVD_EINVAL;
  }
  /* O_NONBLOCK: opening a FIFO or a device must not wait for a writer (it would hold a loader
   * thread forever); anything but a regular file is refused right after. */
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) {
    int e = errno;
    snprintf(err->msg, sizeof err->msg, "cannot open: %s", strerror(e));
    return gguf__errno_code(e);
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    close(fd);
    snprintf(err->msg, sizeof err->msg, "cannot stat: %s", strerror(e));
    return gguf__errno_code(e);
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    snprintf(err->msg, sizeof err->msg, "not a regular file");
    return KVD_EINVAL;
  }
  if ((uint64_t)st.st_size > SIZE_MAX) {
    close(fd);
    snprintf(err->msg, sizeof err->msg, "file too large to map");
    return KVD_E2BIG;
  }
  size_t size = (size_t)st.st_size;
  if (size == 0) {
    close(fd);
    return gguf__open(gguf__empty, 0, ret, err);
  }
  void *p = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int e = errno;
  close(fd); /* the mapping keeps the file alive */
  if (p == MAP_FAILED) {
    snprintf(err->msg, sizeof err->msg, "cannot map %zu bytes: %s", size, strerror(e));
    return gguf__errno_code(e);
  }
  int rc = gguf__open(p, size, ret, err);
  if (rc < 0) {
    munmap(p, size);
    return rc;
  }
  (*ret)->mapped = true;
  return 0;
}

/* ---- lookups and getters ---- */

const struct gguf_kv *gguf_find_kv(const struct gguf_file *f, const char *key) {
  if (!f || !key) return NULL;
  const struct gguf__file *impl = (const struct gguf__file *)f;
  uint64_t i = gguf__index_find(&impl->kv_index, key, gguf__kv_name, f->kv);
  return i == UINT64_MAX ? NULL : &f->kv[i];
}

const struct gguf_tensor *gguf_find_tensor(const struct gguf_file *f, const char *name) {
  if (!f || !name) return NULL;
  const struct gguf__file *impl = (const struct gguf__file *)f;
  uint64_t i = gguf__index_find(&impl->tensor_index, name, gguf__tensor_name, f->tensors);
  return i == UINT64_MAX ? NULL : &f->tensors[i];
}

static bool gguf__is_unsigned(enum gguf_vtype t) {
  return t == GGUF_VT_UINT8 || t == GGUF_VT_UINT16 || t == GGUF_VT_UINT32 || t == GGUF_VT_UINT64;
}

static bool gguf__is_signed(enum gguf_vtype t) {
  return t == GGUF_VT_INT8 || t == GGUF_VT_INT16 || t == GGUF_VT_INT32 || t == GGUF_VT_INT64;
}

int gguf_value_to_u64(const struct gguf_value *v, uint64_t *ret) {
  if (!v) return KVD_EINVAL;
  if (gguf__is_unsigned(v->type)) {
    *ret = v->v.u64;
    return 0;
  }
  if (gguf__is_signed(v->type) && v->v.i64 >= 0) {
    *ret = (uint64_t)v->v.i64;
    return 0;
  }
  return KVD_E_FORMAT;
}

int gguf_value_to_i64(const struct gguf_value *v, int64_t *ret) {
  if (!v) return KVD_EINVAL;
  if (gguf__is_signed(v->type)) {
    *ret = v->v.i64;
    return 0;
  }
  if (gguf__is_unsigned(v->type) && v->v.u64 <= (uint64_t)INT64_MAX) {
    *ret = (int64_t)v->v.u64;
    return 0;
  }
  return KVD_E_FORMAT;
}

int gguf_value_to_f64(const struct gguf_value *v, double *ret) {
  if (!v) return KVD_EINVAL;
  if (v->type != GGUF_VT_FLOAT32 && v->type != GGUF_VT_FLOAT64) return KVD_E_FORMAT;
  *ret = v->v.f64;
  return 0;
}

static int gguf__get(const struct gguf_file *f, const char *key, const struct gguf_value **ret) {
  if (!f || !key) return KVD_EINVAL;
  const struct gguf_kv *kv = gguf_find_kv(f, key);
  if (!kv) return KVD_ENOENT;
  *ret = &kv->value;
  return 0;
}

int gguf_get_u64(const struct gguf_file *f, const char *key, uint64_t *ret) {
  const struct gguf_value *v;
  uint64_t x;
  int rc = gguf__get(f, key, &v);
  if (rc < 0 || (rc = gguf_value_to_u64(v, &x)) < 0) return rc;
  *ret = x;
  return 0;
}

int gguf_get_u32(const struct gguf_file *f, const char *key, uint32_t *ret) {
  uint64_t x;
  int rc = gguf_get_u64(f, key, &x);
  if (rc < 0) return rc;
  if (x > UINT32_MAX) return KVD_E_FORMAT;
  *ret = (uint32_t)x;
  return 0;
}

int gguf_get_i64(const struct gguf_file *f, const char *key, int64_t *ret) {
  const struct gguf_value *v;
  int64_t x;
  int rc = gguf__get(f, key, &v);
  if (rc < 0 || (rc = gguf_value_to_i64(v, &x)) < 0) return rc;
  *ret = x;
  return 0;
}

int gguf_get_f32(const struct gguf_file *f, const char *key, float *ret) {
  const struct gguf_value *v;
  double x;
  int rc = gguf__get(f, key, &v);
  if (rc < 0 || (rc = gguf_value_to_f64(v, &x)) < 0) return rc;
  /* A finite double beyond float's range would silently become infinity. */
  if (isfinite(x) && (x > FLT_MAX || x < -FLT_MAX)) return KVD_E_FORMAT;
  *ret = (float)x;
  return 0;
}

int gguf_get_bool(const struct gguf_file *f, const char *key, bool *ret) {
  const struct gguf_value *v;
  int rc = gguf__get(f, key, &v);
  if (rc < 0) return rc;
  if (v->type != GGUF_VT_BOOL) return KVD_E_FORMAT;
  *ret = v->v.u64 != 0;
  return 0;
}

int gguf_get_str(const struct gguf_file *f, const char *key, struct gguf_str *ret) {
  const struct gguf_value *v;
  int rc = gguf__get(f, key, &v);
  if (rc < 0) return rc;
  if (v->type != GGUF_VT_STRING) return KVD_E_FORMAT;
  *ret = v->v.str;
  return 0;
}

int gguf_get_arr(const struct gguf_file *f, const char *key, enum gguf_vtype elem_type,
                 const struct gguf_value **ret) {
  const struct gguf_value *v;
  int rc = gguf__get(f, key, &v);
  if (rc < 0) return rc;
  if (v->type != GGUF_VT_ARRAY) return KVD_E_FORMAT;
  if (elem_type != GGUF_VT_COUNT && v->v.arr.type != elem_type) return KVD_E_FORMAT;
  *ret = v;
  return 0;
}

int gguf_arr_get(const struct gguf_value *arr, uint64_t i, struct gguf_value *ret) {
  if (!arr || !ret || arr->type != GGUF_VT_ARRAY) return KVD_EINVAL;
  if (i >= arr->v.arr.count) return KVD_ERANGE;
  size_t esize = gguf_vtype_size(arr->v.arr.type);
  if (esize) {
    gguf__decode_scalar(arr->v.arr.type, (const uint8_t *)arr->v.arr.data + i * esize, ret);
    return 0;
  }
  if (!arr->v.arr.elems) return KVD_EINVAL;
  *ret = arr->v.arr.elems[i];
  return 0;
}

bool gguf_str_eq(struct gguf_str s, const char *cstr) {
  if (!cstr) return false;
  size_t n = strlen(cstr);
  return s.len == n && (n == 0 || memcmp(s.ptr, cstr, n) == 0);
}

uint64_t gguf_tensor_nelements(const struct gguf_tensor *t) {
  uint64_t n = 1;
  for (uint32_t d = 0; d < t->n_dims && d < GGUF_MAX_DIMS; d++)
    n *= t->ne[d];
  return n;
}
