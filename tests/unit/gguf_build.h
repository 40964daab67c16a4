/* Builds small GGUF v3 files in memory for tests: the metadata and tensors a case needs, so each
 * missing or inconsistent field can be tried in isolation. Header-only (static inline) so any unit
 * test can include it. */
#ifndef KVD_TEST_GGUF_BUILD_H
#define KVD_TEST_GGUF_BUILD_H

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dtype.h"
#include "gguf.h"

#define GB_ALIGN 32

/* A metadata entry: type is UINT32, FLOAT32, STRING or ARRAY (an array of n_strings strings "t",
 * enough for a tokenizer.ggml.tokens count). */
struct gb_kv {
  const char *key;
  enum gguf_vtype type;
  uint32_t u32;
  float f32;
  const char *str;
  uint64_t n_strings;
};

/* A tensor: ne[0] is the row length; data holds nbytes of type-encoded values. */
struct gb_tensor {
  char name[64];
  uint32_t n_dims;
  uint64_t ne[2];
  enum dtype type;
  const void *data;
  size_t nbytes;
};

struct gb_buf {
  uint8_t *p;
  size_t len, cap;
  bool oom;
};

static inline void gb_put(struct gb_buf *b, const void *src, size_t n) {
  if (b->oom) return;
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + n)
      cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p) {
      b->oom = true;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  if (src)
    memcpy(b->p + b->len, src, n);
  else
    memset(b->p + b->len, 0, n);
  b->len += n;
}

static inline void gb_u32(struct gb_buf *b, uint32_t v) {
  gb_put(b, &v, 4); /* GGUF is little-endian, as is every host kvd runs on */
}

static inline void gb_u64(struct gb_buf *b, uint64_t v) {
  gb_put(b, &v, 8);
}

static inline void gb_str(struct gb_buf *b, const char *s) {
  gb_u64(b, strlen(s));
  gb_put(b, s, strlen(s));
}

static inline void gb_pad(struct gb_buf *b) {
  size_t pad = (GB_ALIGN - b->len % GB_ALIGN) % GB_ALIGN;
  gb_put(b, NULL, pad);
}

/* The file's bytes (malloc'd, the caller frees them) or NULL when out of memory. */
static inline uint8_t *gb_build(const struct gb_kv *kvs, size_t n_kv, const struct gb_tensor *ts,
                                size_t n_t, size_t *ret_size) {
  struct gb_buf b = {0};
  gb_put(&b, "GGUF", 4);
  gb_u32(&b, 3);
  gb_u64(&b, n_t);
  gb_u64(&b, n_kv);
  for (size_t i = 0; i < n_kv; i++) {
    gb_str(&b, kvs[i].key);
    gb_u32(&b, kvs[i].type);
    switch (kvs[i].type) {
    case GGUF_VT_UINT32:
      gb_u32(&b, kvs[i].u32);
      break;
    case GGUF_VT_FLOAT32:
      gb_put(&b, &kvs[i].f32, 4);
      break;
    case GGUF_VT_STRING:
      gb_str(&b, kvs[i].str);
      break;
    default: /* ARRAY of strings */
      gb_u32(&b, GGUF_VT_STRING);
      gb_u64(&b, kvs[i].n_strings);
      for (uint64_t j = 0; j < kvs[i].n_strings; j++)
        gb_str(&b, "t");
      break;
    }
  }
  uint64_t offset = 0;
  for (size_t i = 0; i < n_t; i++) {
    gb_str(&b, ts[i].name);
    gb_u32(&b, ts[i].n_dims);
    for (uint32_t d = 0; d < ts[i].n_dims; d++)
      gb_u64(&b, ts[i].ne[d]);
    gb_u32(&b, ts[i].type);
    gb_u64(&b, offset);
    offset += (ts[i].nbytes + GB_ALIGN - 1) / GB_ALIGN * GB_ALIGN;
  }
  gb_pad(&b);
  for (size_t i = 0; i < n_t; i++) {
    gb_put(&b, ts[i].data, ts[i].nbytes);
    gb_pad(&b);
  }
  if (b.oom) {
    free(b.p);
    return NULL;
  }
  *ret_size = b.len;
  return b.p;
}

#endif
