/* GGUF writer: builds a GGUF v3 (or v2) file from metadata and tensors, for tests and the
 * synthetic model generator.
 *
 * Metadata is serialized as it is added (so callers' buffers may go away at once); tensor data is
 * either copied at add time or produced by a fill callback at write time, so a generator never has
 * to hold more than one tensor in memory. Everything is validated on the way in with the reader's
 * rules (unique keys and names, 1..4 nonzero dims, whole blocks per row, power-of-two alignment),
 * so whatever the writer writes the reader accepts.
 *
 * The alignment is taken from a "general.alignment" uint32 kv when one is added (default 32). */
#ifndef KVD_GGUF_WRITE_H
#define KVD_GGUF_WRITE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "gguf.h"

struct gguf_writer;

/* Fills dst (nbytes, the tensor's exact size) with a tensor's bytes: 0 or a negative kvd code,
 * which aborts the write and is returned by it. */
typedef int (*gguf_fill_fn)(void *ctx, void *dst, uint64_t nbytes);

int gguf_writer_new(struct gguf_writer **ret);
void gguf_writer_free(struct gguf_writer *w); /* NULL is a no-op */

/* 2 or 3 (the default); v2 and v3 have the same layout, v3 merely allows big-endian files. */
int gguf_writer_set_version(struct gguf_writer *w, uint32_t version);

/* Any value, including nested arrays, described as the reader describes it: fixed-size array
 * elements as raw little-endian bytes in v.arr.data, STRING and ARRAY elements in v.arr.elems.
 * KVD_EEXIST for a duplicate key, KVD_EINVAL for a malformed value or key. */
int gguf_writer_add_value(struct gguf_writer *w, const char *key, const struct gguf_value *v);

int gguf_writer_add_u8(struct gguf_writer *w, const char *key, uint8_t v);
int gguf_writer_add_i8(struct gguf_writer *w, const char *key, int8_t v);
int gguf_writer_add_u16(struct gguf_writer *w, const char *key, uint16_t v);
int gguf_writer_add_i16(struct gguf_writer *w, const char *key, int16_t v);
int gguf_writer_add_u32(struct gguf_writer *w, const char *key, uint32_t v);
int gguf_writer_add_i32(struct gguf_writer *w, const char *key, int32_t v);
int gguf_writer_add_u64(struct gguf_writer *w, const char *key, uint64_t v);
int gguf_writer_add_i64(struct gguf_writer *w, const char *key, int64_t v);
int gguf_writer_add_f32(struct gguf_writer *w, const char *key, float v);
int gguf_writer_add_f64(struct gguf_writer *w, const char *key, double v);
int gguf_writer_add_bool(struct gguf_writer *w, const char *key, bool v);
int gguf_writer_add_str(struct gguf_writer *w, const char *key, const char *v);
/* A string with an explicit length (may hold any bytes, NULs included). */
int gguf_writer_add_strn(struct gguf_writer *w, const char *key, const char *v, size_t len);
/* An array of a fixed-size type from a native C array (uint8_t[], int32_t[], float[], bool[] ...,
 * matching elem_type); encoded little-endian whatever the host. */
int gguf_writer_add_arr(struct gguf_writer *w, const char *key, enum gguf_vtype elem_type,
                        const void *elems, uint64_t count);
/* An array of NUL-terminated strings. */
int gguf_writer_add_str_arr(struct gguf_writer *w, const char *key, const char *const *strs,
                            uint64_t count);

/* A tensor; ne[0] is the row length (fastest-varying). nbytes must be the exact size the type and
 * dims give; data is copied. */
int gguf_writer_add_tensor(struct gguf_writer *w, const char *name, uint32_t n_dims,
                           const uint64_t *ne, enum dtype type, const void *data, uint64_t nbytes);
/* A tensor whose bytes fill(ctx, ...) produces at write time (ctx must live until then). */
int gguf_writer_add_tensor_fill(struct gguf_writer *w, const char *name, uint32_t n_dims,
                                const uint64_t *ne, enum dtype type, gguf_fill_fn fill, void *ctx);

uint64_t gguf_writer_n_tensors(const struct gguf_writer *w);
/* The exact size gguf_writer_write_*() will produce. */
uint64_t gguf_writer_file_size(const struct gguf_writer *w);

/* Writes the file through a temporary in the same folder and renames it into place, so a failed
 * write never leaves a half file under path. KVD_EIO (or the errno code) on failure. */
int gguf_writer_write_file(struct gguf_writer *w, const char *path);
/* Writes into a malloc'd buffer the caller frees. */
int gguf_writer_write_mem(struct gguf_writer *w, void **ret_data, size_t *ret_size);

#endif
