/* Weight formats: the tensor types GGUF files carry, their block layouts, and CPU conversion.
 *
 * Values follow ggml's type ids (the numbers stored in GGUF tensor infos). A "block" is the unit of
 * quantization: block_elems values stored in block_bytes bytes; a row must be a whole number of
 * blocks. Dequantization is written from the published block layouts and is the reference that
 * the shaders are checked against. */
#ifndef KVD_DTYPE_H
#define KVD_DTYPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum dtype {
  DTYPE_F32 = 0,
  DTYPE_F16 = 1,
  DTYPE_Q4_0 = 2,
  DTYPE_Q4_1 = 3,
  DTYPE_Q5_0 = 6,
  DTYPE_Q5_1 = 7,
  DTYPE_Q8_0 = 8,
  DTYPE_Q8_1 = 9,
  DTYPE_Q2_K = 10,
  DTYPE_Q3_K = 11,
  DTYPE_Q4_K = 12,
  DTYPE_Q5_K = 13,
  DTYPE_Q6_K = 14,
  DTYPE_Q8_K = 15,
  DTYPE_I8 = 24,
  DTYPE_I16 = 25,
  DTYPE_I32 = 26,
  DTYPE_I64 = 27,
  DTYPE_F64 = 28,
  DTYPE_BF16 = 30,
  DTYPE_MAX = 40 /* ids at or above this are rejected by the reader */
};

struct dtype_info {
  const char *name;     /* "f32", "q4_K" ... as gguf-dump prints them; NULL for unknown ids */
  uint32_t block_elems; /* values per block (1 for plain types) */
  uint32_t block_bytes; /* bytes per block */
  bool can_dequant;     /* dtype_dequant_row() supports it */
};

/* Info for a type id; NULL for ids kvd does not know (the reader refuses them by number). */
const struct dtype_info *dtype_get(uint32_t type);
const char *dtype_name(uint32_t type); /* "unknown" for unknown ids */

/* Bytes of a row of n values: KVD_EINVAL (as a negative value) if n is not a whole number of
 * blocks; *ret written on success only. */
int dtype_row_bytes(enum dtype t, uint64_t n, uint64_t *ret);

/* Dequantize n values (a whole number of blocks) from src into dst (float32). 0 or
 * KVD_E_UNSUPPORTED / KVD_EINVAL. */
int dtype_dequant_row(enum dtype t, const void *src, float *dst, uint64_t n);

/* Quantize n float32 values into dst, for making test models. Supported: F32, F16, BF16, Q8_0,
 * Q4_0 (round-to-nearest, the reference quantizers' rules). */
int dtype_quant_row(enum dtype t, const float *src, void *dst, uint64_t n);
/* Whether dtype_quant_row() supports t. */
bool dtype_can_quant(enum dtype t);

/* IEEE half and bfloat16 conversions (round-to-nearest-even, NaN and Inf preserved). */
float dtype_f16_to_f32(uint16_t h);
uint16_t dtype_f32_to_f16(float f);
float dtype_bf16_to_f32(uint16_t h);
uint16_t dtype_f32_to_bf16(float f);

#endif
