/* How K and V values are stored in the pool's blocks: the KV types.
 *
 * A block holds, per KV head, block_size rows of one token's head_dim values (kv.h's layout);
 * this file says what a row is, in 32-bit words so the shaders address whole words:
 *
 *   KV_F32   head_dim floats
 *   KV_F16   head_dim / 2 words, two IEEE halves each (packHalf2x16 order: element 2i low)
 *   KV_Q8_0  the row in groups of G values (G = 32, or the largest of 16 and 8 dividing a smaller
 *            head): first the groups' f16 scales, two per word (group 2j low), then head_dim / 4
 *            words of int8 quants, element 4w + i in byte i of word w. Value = q * scale, with
 *            scale = max|x| / 127, as ggml's q8_0.
 *   KV_Q4_0  the same scales, then head_dim / 8 words of 4-bit quants, element 8w + i in nibble i
 *            of word w. Value = (q - 8) * scale, scale = (the value of largest magnitude) / -8,
 *            as ggml's q4_0.
 *
 * ggml's own q8_0/q4_0 blocks are 34 and 18 bytes, which puts most groups at unaligned offsets;
 * this layout keeps the same bytes per group on average (a pair of scales per word) while every
 * quant word is aligned, so the attention kernel decodes a word at a time from one load.
 *
 * The encoders here are the CPU definition of each format: the KV-write kernel must produce what
 * kv_decode_row() reads back within the format's rounding, and the attention tests read caches
 * encoded here. */
#ifndef KVD_KV_FORMAT_H
#define KVD_KV_FORMAT_H

#include <stddef.h>
#include <stdint.h>

enum kv_type {
  KV_F32 = 0,
  KV_F16 = 1,
  KV_Q8_0 = 2,
  KV_Q4_0 = 3,
  KV_TYPE_COUNT,
};

/* "f32", "f16", "q8_0", "q4_0"; and back (KVD_EINVAL for anything else). */
const char *kv_type_name(enum kv_type t);
int kv_type_parse(const char *name, enum kv_type *ret);

/* The quantization group of a head size: 32, 16 or 8 values (0 when none divides head_dim). */
uint32_t kv_group(uint32_t head_dim);

/* 32-bit words of one row (one token, one KV head) of type t. KVD_E_UNSUPPORTED when head_dim
 * does not suit the type (odd for f16; no group, or not a multiple of 4 or 8, for q8_0 / q4_0),
 * KVD_EINVAL for a bad type. */
int kv_row_words(enum kv_type t, uint32_t head_dim, uint32_t *ret);

/* Encodes head_dim floats into one row (kv_row_words() words), and back. */
void kv_encode_row(enum kv_type t, const float *x, uint32_t head_dim, uint32_t *row);
void kv_decode_row(enum kv_type t, const uint32_t *row, uint32_t head_dim, float *x);

#endif
