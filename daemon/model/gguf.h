/* GGUF reader: memory-maps a GGUF v2/v3 file and validates every count, length, offset and size
 * against the file before anything uses it, so a truncated or corrupt file yields an error that
 * names the field and the offset, never a crash or an out-of-bounds read.
 *
 * Everything returned points into the mapping (strings are NOT NUL-terminated: use len) and lives
 * until gguf_close(). */
#ifndef KVD_GGUF_H
#define KVD_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "dtype.h"

/* Limits the reader enforces and the writer respects. Arrays may nest (an array of arrays ...)
 * at most GGUF_MAX_ARRAY_DEPTH levels; tensor names are at most GGUF_MAX_TENSOR_NAME bytes
 * (ggml's limit); tensors have 1..GGUF_MAX_DIMS dims. */
#define GGUF_MAX_ARRAY_DEPTH 8
#define GGUF_MAX_TENSOR_NAME 63
#define GGUF_MAX_DIMS 4
#define GGUF_MAX_KEY 65535
#define GGUF_DEFAULT_ALIGNMENT 32

enum gguf_vtype {
  GGUF_VT_UINT8 = 0,
  GGUF_VT_INT8 = 1,
  GGUF_VT_UINT16 = 2,
  GGUF_VT_INT16 = 3,
  GGUF_VT_UINT32 = 4,
  GGUF_VT_INT32 = 5,
  GGUF_VT_FLOAT32 = 6,
  GGUF_VT_BOOL = 7,
  GGUF_VT_STRING = 8,
  GGUF_VT_ARRAY = 9,
  GGUF_VT_UINT64 = 10,
  GGUF_VT_INT64 = 11,
  GGUF_VT_FLOAT64 = 12,
  GGUF_VT_COUNT
};

struct gguf_str {
  uint64_t len;
  const char *ptr; /* into the mapping; not NUL-terminated */
};

/* A metadata value. Scalars are decoded; arrays keep a pointer to their raw, validated bytes.
 * Arrays of strings and nested arrays are indexed at open time (elems) so element i is O(1). */
struct gguf_value {
  enum gguf_vtype type;
  union {
    uint64_t u64; /* every unsigned integer type and bool */
    int64_t i64;  /* every signed integer type */
    double f64;   /* FLOAT32 and FLOAT64 */
    struct gguf_str str;
    struct {
      enum gguf_vtype type; /* element type */
      uint64_t count;
      const void *data;               /* raw little-endian elements (fixed-size types) */
      const struct gguf_value *elems; /* decoded elements for STRING and ARRAY element types */
    } arr;
  } v;
};

struct gguf_kv {
  struct gguf_str key;
  struct gguf_value value;
};

/* GGUF orders dims fastest-first: ne[0] is the row length (a matrix's input dimension). */
struct gguf_tensor {
  struct gguf_str name;
  uint32_t n_dims;
  uint64_t ne[4]; /* unused dims are 1 */
  enum dtype type;
  uint64_t offset; /* from the start of the data section */
  uint64_t nbytes;
  const void *data; /* into the mapping, validated to lie inside the file */
};

struct gguf_file {
  uint32_t version;
  uint64_t alignment;
  uint64_t n_kv;
  struct gguf_kv *kv;
  uint64_t n_tensors;
  struct gguf_tensor *tensors;
  uint64_t data_offset; /* file offset of the tensor data section */
  const uint8_t *base;  /* the mapping */
  size_t size;
  bool mapped; /* base is an mmap (else borrowed memory) */
};

/* Why an open failed: which field, at which file offset. */
struct gguf_error {
  uint64_t offset;
  char msg[160];
};

/* Opens and validates a file. On failure returns a negative kvd code (KVD_E_FORMAT for bad
 * content, KVD_ENOENT/KVD_EIO/KVD_EACCES for the file itself, KVD_ENOMEM) and fills *err. */
int gguf_open(const char *path, struct gguf_file **ret, struct gguf_error *err);
/* Same over memory the caller owns and keeps alive until gguf_close() (used by the fuzzer). */
int gguf_open_memory(const void *data, size_t size, struct gguf_file **ret, struct gguf_error *err);
void gguf_close(struct gguf_file *f); /* NULL is a no-op */

const struct gguf_kv *gguf_find_kv(const struct gguf_file *f, const char *key);
const struct gguf_tensor *gguf_find_tensor(const struct gguf_file *f, const char *name);

/* Typed getters: 0 on success, KVD_ENOENT when the key is missing, KVD_E_FORMAT when its type does
 * not convert (integers convert between widths when the value fits; floats accept FLOAT32/64). */
int gguf_get_u32(const struct gguf_file *f, const char *key, uint32_t *ret);
int gguf_get_u64(const struct gguf_file *f, const char *key, uint64_t *ret);
int gguf_get_i64(const struct gguf_file *f, const char *key, int64_t *ret);
int gguf_get_f32(const struct gguf_file *f, const char *key, float *ret);
int gguf_get_bool(const struct gguf_file *f, const char *key, bool *ret);
int gguf_get_str(const struct gguf_file *f, const char *key, struct gguf_str *ret);
/* An array with the given element type (GGUF_VT_COUNT accepts any). */
int gguf_get_arr(const struct gguf_file *f, const char *key, enum gguf_vtype elem_type,
                 const struct gguf_value **ret);

/* Compare a gguf_str with a C string. */
bool gguf_str_eq(struct gguf_str s, const char *cstr);
const char *gguf_vtype_name(enum gguf_vtype t);

/* Bytes one element of a fixed-size type takes in the file; 0 for STRING, ARRAY and unknown
 * types (their elements are reached through arr.elems instead). */
size_t gguf_vtype_size(enum gguf_vtype t);

/* Element i of an array value, decoded into *ret as a scalar (or a copy of arr.elems[i] for
 * STRING and ARRAY elements, still pointing into the mapping). KVD_EINVAL when arr is not an
 * array, KVD_ERANGE when i >= count. */
int gguf_arr_get(const struct gguf_value *arr, uint64_t i, struct gguf_value *ret);

/* The same conversions the typed getters apply, on a value already in hand (an array element,
 * say): 0, or KVD_E_FORMAT when the type does not convert or the value does not fit. */
int gguf_value_to_u64(const struct gguf_value *v, uint64_t *ret);
int gguf_value_to_i64(const struct gguf_value *v, int64_t *ret);
int gguf_value_to_f64(const struct gguf_value *v, double *ret);

/* Values in a tensor: the product of its dims. */
uint64_t gguf_tensor_nelements(const struct gguf_tensor *t);

/* A gguf-dump-like listing for `kvd --model-info`: version, alignment, every key with its type and
 * value (long arrays and strings abbreviated), every tensor (name, dims, type, bytes, offset) and
 * a per-type summary. Never fails: write errors are the stream's to report. */
void gguf_print_info(const struct gguf_file *f, FILE *out);

#endif
