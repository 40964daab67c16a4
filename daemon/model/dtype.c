/* Weight formats: the type table, IEEE half/bfloat16 conversion, dequantization and the two test
 * quantizers.
 *
 * Every layout below is written from the published GGML block descriptions. All multi-byte fields
 * are little-endian and blocks are packed with no padding, so a block can start at any byte: fields
 * are read byte by byte, never through a cast pointer.
 *
 * Bit-exactness with ggml's to_float: each dequantizer evaluates the same float expression in the
 * same order. For every format here the products (f16 scale × small integer scale × small quant)
 * need at most 23 significant bits, so they are exact in float32; the only rounding is the one
 * final addition or subtraction of the offset/min (Q4_1, Q5_1, Q4_K, Q5_K). A fused multiply-add
 * would therefore round the same way as separate operations, and the result does not depend on
 * -ffp-contract (ISO C mode, as meson's c_std=c11 builds, leaves contraction off anyway). */
#include "dtype.h"

#include "kvd_error.h"

#include <math.h>
#include <string.h>

#define QK 32    /* values per block of the legacy formats (Q4_0 ... Q8_1) */
#define QK_K 256 /* values per super-block of the K formats */

typedef void (*dtype__dequant_fn)(const uint8_t *blk, float *y);

struct dtype__entry {
  struct dtype_info info;
  dtype__dequant_fn dequant; /* one block; NULL when not supported */
};

/* --- little-endian field readers ----------------------------------------------------------- */

static inline uint16_t rd_u16(const uint8_t *p) {
  return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint32_t rd_u32(const uint8_t *p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline void wr_u16(uint8_t *p, uint16_t v) {
  p[0] = (uint8_t)(v & 0xff);
  p[1] = (uint8_t)(v >> 8);
}

static inline float bits_to_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

static inline float rd_f16(const uint8_t *p) {
  return dtype_f16_to_f32(rd_u16(p));
}

/* --- half and bfloat16 --------------------------------------------------------------------- */

/* Binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits. Every half is exactly representable
 * in float32, so this is pure bit surgery; subnormals are normalised, NaN payloads kept. */
float dtype_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_to_f32(sign);
    /* Subnormal: mant * 2^-24. Shift the leading one up to the implicit-bit position. */
    uint32_t e = 113; /* float32 biased exponent of 2^-14 */
    while (!(mant & 0x400u)) {
      mant <<= 1;
      e--;
    }
    return bits_to_f32(sign | (e << 23) | ((mant & 0x3ffu) << 13));
  }
  return bits_to_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

/* Round-to-nearest-even from float32. Values at or above 65520 (halfway between the largest half,
 * 65504, and 2^16, a tie that goes to the even 2^16) become Inf; results below 2^-14 become
 * subnormal halves with the same rounding; NaN stays NaN (quiet, top payload bits kept). */
uint16_t dtype_f32_to_f16(float f) {
  uint32_t u = f32_to_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* 65520.0f and above, Inf */
  if (a < 0x38800000u) {                                   /* below 2^-14: subnormal or zero */
    if (a <= 0x33000000u) return sign; /* at most 2^-25: rounds to (signed) zero, the tie too */
    uint32_t e = a >> 23;
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    /* value = m * 2^(e-150); in units of the smallest subnormal 2^-24 that is m >> (126 - e). */
    uint32_t shift = 126 - e; /* 14..24 here */
    uint32_t r = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) r++;
    return (uint16_t)(sign | r); /* r == 0x400 is correctly the smallest normal */
  }
  uint32_t h = ((((a >> 23) - 112) << 10) | ((a >> 13) & 0x3ffu));
  uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++; /* a carry moves into the exponent */
  return (uint16_t)(sign | h);
}

/* bfloat16 is the top half of a float32. */
float dtype_bf16_to_f32(uint16_t h) {
  return bits_to_f32((uint32_t)h << 16);
}

/* Round-to-nearest-even on the dropped 16 bits; overflow carries into Inf as it should,
 * subnormals round like any other value, and NaN is kept quiet (a NaN whose payload lives only
 * in the low bits would otherwise truncate to Inf). */
uint16_t dtype_f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* --- dequantizers: one block each ---------------------------------------------------------- */

/* F32/F16/BF16 are "blocks" of one value. */
static void dq_f32(const uint8_t *b, float *y) {
  y[0] = bits_to_f32(rd_u32(b));
}

static void dq_f16(const uint8_t *b, float *y) {
  y[0] = rd_f16(b);
}

static void dq_bf16(const uint8_t *b, float *y) {
  y[0] = dtype_bf16_to_f32(rd_u16(b));
}

/* Q4_0, 32 values in 18 bytes: f16 d | u8 qs[16].
 * Value j (0..15) is the low nibble of qs[j], value j+16 its high nibble; y = (q - 8) * d. */
static void dq_q4_0(const uint8_t *b, float *y) {
  const float d = rd_f16(b);
  const uint8_t *qs = b + 2;
  for (int j = 0; j < QK / 2; j++) {
    y[j] = (float)((qs[j] & 0x0f) - 8) * d;
    y[j + QK / 2] = (float)((qs[j] >> 4) - 8) * d;
  }
}

/* Q4_1, 32 values in 20 bytes: f16 d | f16 m | u8 qs[16].
 * Nibble order as Q4_0, unsigned; y = q * d + m. */
static void dq_q4_1(const uint8_t *b, float *y) {
  const float d = rd_f16(b);
  const float m = rd_f16(b + 2);
  const uint8_t *qs = b + 4;
  for (int j = 0; j < QK / 2; j++) {
    y[j] = (float)(qs[j] & 0x0f) * d + m;
    y[j + QK / 2] = (float)(qs[j] >> 4) * d + m;
  }
}

/* Q5_0, 32 values in 22 bytes: f16 d | u32 qh (little-endian) | u8 qs[16].
 * Value j takes its low 4 bits from the nibbles as in Q4_0 and its fifth bit from bit j of qh
 * (value j+16 from bit j+16); y = (q - 16) * d. */
static void dq_q5_0(const uint8_t *b, float *y) {
  const float d = rd_f16(b);
  const uint32_t qh = rd_u32(b + 2);
  const uint8_t *qs = b + 6;
  for (int j = 0; j < QK / 2; j++) {
    int h0 = (int)((qh >> j) & 1u) << 4;
    int h1 = (int)((qh >> (j + 16)) & 1u) << 4;
    y[j] = (float)(((qs[j] & 0x0f) | h0) - 16) * d;
    y[j + QK / 2] = (float)(((qs[j] >> 4) | h1) - 16) * d;
  }
}

/* Q5_1, 32 values in 24 bytes: f16 d | f16 m | u32 qh | u8 qs[16].
 * Bits as Q5_0, unsigned; y = q * d + m. */
static void dq_q5_1(const uint8_t *b, float *y) {
  const float d = rd_f16(b);
  const float m = rd_f16(b + 2);
  const uint32_t qh = rd_u32(b + 4);
  const uint8_t *qs = b + 8;
  for (int j = 0; j < QK / 2; j++) {
    int h0 = (int)((qh >> j) & 1u) << 4;
    int h1 = (int)((qh >> (j + 16)) & 1u) << 4;
    y[j] = (float)((qs[j] & 0x0f) | h0) * d + m;
    y[j + QK / 2] = (float)((qs[j] >> 4) | h1) * d + m;
  }
}

/* Q8_0, 32 values in 34 bytes: f16 d | i8 qs[32]; y = q * d. */
static void dq_q8_0(const uint8_t *b, float *y) {
  const float d = rd_f16(b);
  for (int j = 0; j < QK; j++)
    y[j] = (float)(int8_t)b[2 + j] * d;
}

/* Q8_1, 32 values in 36 bytes: f16 d | f16 s (= d * sum of qs, for dot products) | i8 qs[32];
 * y = q * d. (Older gguf-py tables list 40 bytes, from when d and s were float32; ggml's block
 * has used halves since. It is an activation format that model files do not carry.) */
static void dq_q8_1(const uint8_t *b, float *y) {
  const float d = rd_f16(b);
  for (int j = 0; j < QK; j++)
    y[j] = (float)(int8_t)b[4 + j] * d;
}

/* The 12 scale bytes of Q4_K/Q5_K hold eight 6-bit scales and eight 6-bit mins. Sub-blocks 0..3
 * use the low 6 bits of bytes 0..3 (scale) and 4..7 (min). Sub-blocks 4..7 take their low 4 bits
 * from the nibbles of bytes 8..11 (scale low, min high) and their top 2 bits from the spare top
 * bits of bytes 0..3 (scale) and 4..7 (min). */
static void k_scale_min(int j, const uint8_t *s, uint8_t *sc, uint8_t *mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = (uint8_t)((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4));
    *mn = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
  }
}

/* Q4_K, 256 values in 144 bytes: f16 d | f16 dmin | u8 scales[12] | u8 qs[128].
 * Eight sub-blocks of 32 with 6-bit scale sc and min m (k_scale_min). The values go in four
 * chunks of 64: chunk c reads qs[32c .. 32c+31], low nibbles giving sub-block 2c and high nibbles
 * sub-block 2c+1. y = (d * sc) * q - (dmin * m). */
static void dq_q4_k(const uint8_t *b, float *y) {
  const float d = rd_f16(b);
  const float dmin = rd_f16(b + 2);
  const uint8_t *scales = b + 4;
  const uint8_t *qs = b + 16;
  for (int c = 0; c < 4; c++) {
    uint8_t sc, m;
    k_scale_min(2 * c, scales, &sc, &m);
    const float d1 = d * sc, m1 = dmin * m;
    k_scale_min(2 * c + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = dmin * m;
    const uint8_t *q = qs + 32 * c;
    float *o = y + 64 * c;
    for (int l = 0; l < 32; l++)
      o[l] = d1 * (float)(q[l] & 0x0f) - m1;
    for (int l = 0; l < 32; l++)
      o[32 + l] = d2 * (float)(q[l] >> 4) - m2;
  }
}

/* Q5_K, 256 values in 176 bytes: f16 d | f16 dmin | u8 scales[12] | u8 qh[32] | u8 qs[128].
 * As Q4_K, plus a fifth bit: value l of chunk c's first half takes bit 2c of qh[l], of its second
 * half bit 2c+1 of qh[l]. y = (d * sc) * q - (dmin * m), q in 0..31. */
static void dq_q5_k(const uint8_t *b, float *y) {
  const float d = rd_f16(b);
  const float dmin = rd_f16(b + 2);
  const uint8_t *scales = b + 4;
  const uint8_t *qh = b + 16;
  const uint8_t *qs = b + 48;
  for (int c = 0; c < 4; c++) {
    uint8_t sc, m;
    k_scale_min(2 * c, scales, &sc, &m);
    const float d1 = d * sc, m1 = dmin * m;
    k_scale_min(2 * c + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = dmin * m;
    const uint8_t *q = qs + 32 * c;
    const unsigned u1 = 1u << (2 * c), u2 = 2u << (2 * c);
    float *o = y + 64 * c;
    for (int l = 0; l < 32; l++)
      o[l] = d1 * (float)((q[l] & 0x0f) + ((qh[l] & u1) ? 16 : 0)) - m1;
    for (int l = 0; l < 32; l++)
      o[32 + l] = d2 * (float)((q[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
  }
}

/* Q6_K, 256 values in 210 bytes: u8 ql[128] | u8 qh[64] | i8 scales[16] | f16 d (last).
 * Sixteen sub-blocks of 16 with a signed 8-bit scale. Two halves of 128 values; half n uses
 * ql[64n..], qh[32n..], scales[8n..]. For l in 0..31 of a half, qh[l] holds the top 2 bits of
 * four values: bits 0-1 for value l (low nibble of ql[l]), 2-3 for l+32 (low nibble of ql[l+32]),
 * 4-5 for l+64 (high nibble of ql[l]), 6-7 for l+96 (high nibble of ql[l+32]). q = 6 bits - 32;
 * value v of the half uses scale v/16. y = (d * scale) * q. */
static void dq_q6_k(const uint8_t *b, float *y) {
  const float d = rd_f16(b + 208);
  for (int n = 0; n < 2; n++) {
    const uint8_t *ql = b + 64 * n;
    const uint8_t *qh = b + 128 + 32 * n;
    const int8_t *sc = (const int8_t *)(b + 192 + 8 * n);
    float *o = y + 128 * n;
    for (int l = 0; l < 32; l++) {
      int is = l / 16;
      int q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32;
      int q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
      int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      o[l] = d * (float)sc[is] * (float)q1;
      o[l + 32] = d * (float)sc[is + 2] * (float)q2;
      o[l + 64] = d * (float)sc[is + 4] * (float)q3;
      o[l + 96] = d * (float)sc[is + 6] * (float)q4;
    }
  }
}

/* --- the type table ------------------------------------------------------------------------ */

#define T_PLAIN(id, nm, bytes, fn) [id] = {{nm, 1, bytes, fn != NULL}, fn}
#define T_BLOCK(id, nm, elems, bytes, fn) [id] = {{nm, elems, bytes, fn != NULL}, fn}

/* Every id ggml has assigned that a GGUF file may carry. Ids 4 and 5 (the withdrawn Q4_2/Q4_3)
 * and 31..33, 36..38 (repacked in-memory layouts that files never hold) stay unnamed, so
 * dtype_get() refuses them. The i-quants, ternary and MXFP4 formats are listed so the reader can
 * size and name their tensors, but are not dequantized. */
static const struct dtype__entry dtype__table[DTYPE_MAX] = {
    T_PLAIN(DTYPE_F32, "f32", 4, dq_f32),
    T_PLAIN(DTYPE_F16, "f16", 2, dq_f16),
    T_BLOCK(DTYPE_Q4_0, "q4_0", QK, 18, dq_q4_0),
    T_BLOCK(DTYPE_Q4_1, "q4_1", QK, 20, dq_q4_1),
    T_BLOCK(DTYPE_Q5_0, "q5_0", QK, 22, dq_q5_0),
    T_BLOCK(DTYPE_Q5_1, "q5_1", QK, 24, dq_q5_1),
    T_BLOCK(DTYPE_Q8_0, "q8_0", QK, 34, dq_q8_0),
    T_BLOCK(DTYPE_Q8_1, "q8_1", QK, 36, dq_q8_1),
    T_BLOCK(DTYPE_Q2_K, "q2_K", QK_K, 84, NULL),  /* scales[16] qs[64] d dmin */
    T_BLOCK(DTYPE_Q3_K, "q3_K", QK_K, 110, NULL), /* hmask[32] qs[64] scales[12] d */
    T_BLOCK(DTYPE_Q4_K, "q4_K", QK_K, 144, dq_q4_k),
    T_BLOCK(DTYPE_Q5_K, "q5_K", QK_K, 176, dq_q5_k),
    T_BLOCK(DTYPE_Q6_K, "q6_K", QK_K, 210, dq_q6_k),
    T_BLOCK(DTYPE_Q8_K, "q8_K", QK_K, 292, NULL), /* f32 d, qs[256], i16 bsums[16] */
    T_BLOCK(16, "iq2_xxs", QK_K, 66, NULL),
    T_BLOCK(17, "iq2_xs", QK_K, 74, NULL),
    T_BLOCK(18, "iq3_xxs", QK_K, 98, NULL),
    T_BLOCK(19, "iq1_s", QK_K, 50, NULL),
    T_BLOCK(20, "iq4_nl", QK, 18, NULL),
    T_BLOCK(21, "iq3_s", QK_K, 110, NULL),
    T_BLOCK(22, "iq2_s", QK_K, 82, NULL),
    T_BLOCK(23, "iq4_xs", QK_K, 136, NULL),
    T_PLAIN(DTYPE_I8, "i8", 1, NULL),
    T_PLAIN(DTYPE_I16, "i16", 2, NULL),
    T_PLAIN(DTYPE_I32, "i32", 4, NULL),
    T_PLAIN(DTYPE_I64, "i64", 8, NULL),
    T_PLAIN(DTYPE_F64, "f64", 8, NULL),
    T_BLOCK(29, "iq1_m", QK_K, 56, NULL),
    T_PLAIN(DTYPE_BF16, "bf16", 2, dq_bf16),
    T_BLOCK(34, "tq1_0", QK_K, 54, NULL),
    T_BLOCK(35, "tq2_0", QK_K, 66, NULL),
    T_BLOCK(39, "mxfp4", QK, 17, NULL),
};

static const struct dtype__entry *dtype__entry(uint32_t type) {
  if (type >= DTYPE_MAX || dtype__table[type].info.name == NULL) return NULL;
  return &dtype__table[type];
}

const struct dtype_info *dtype_get(uint32_t type) {
  const struct dtype__entry *e = dtype__entry(type);
  return e ? &e->info : NULL;
}

const char *dtype_name(uint32_t type) {
  const struct dtype__entry *e = dtype__entry(type);
  return e ? e->info.name : "unknown";
}

int dtype_row_bytes(enum dtype t, uint64_t n, uint64_t *ret) {
  const struct dtype__entry *e = dtype__entry((uint32_t)t);
  if (!e) return KVD_E_UNSUPPORTED;
  if (n % e->info.block_elems != 0) return KVD_EINVAL;
  uint64_t nb = n / e->info.block_elems;
  if (nb > UINT64_MAX / e->info.block_bytes) return KVD_EOVERFLOW;
  *ret = nb * e->info.block_bytes;
  return 0;
}

int dtype_dequant_row(enum dtype t, const void *src, float *dst, uint64_t n) {
  const struct dtype__entry *e = dtype__entry((uint32_t)t);
  if (!e || !e->dequant) return KVD_E_UNSUPPORTED;
  if (n % e->info.block_elems != 0) return KVD_EINVAL;
  if (n > 0 && (!src || !dst)) return KVD_EINVAL;
  const uint8_t *s = src;
  uint64_t nb = n / e->info.block_elems;
  for (uint64_t i = 0; i < nb; i++)
    e->dequant(s + i * e->info.block_bytes, dst + i * e->info.block_elems);
  return 0;
}

/* --- quantizers (test models only) --------------------------------------------------------- */

bool dtype_can_quant(enum dtype t) {
  switch (t) {
  case DTYPE_F32:
  case DTYPE_F16:
  case DTYPE_BF16:
  case DTYPE_Q8_0:
  case DTYPE_Q4_0:
    return true;
  default:
    return false;
  }
}

/* The reference Q8_0 rule: d = amax / 127, q = roundf(x * (1/d)) (ties away from zero). The
 * reciprocal is of the float32 d, before d is rounded to the stored half, exactly as the
 * reference quantizer does, so files made here match llama-quantize's byte for byte. */
static void q_q8_0(const float *x, uint8_t *b) {
  float amax = 0.0f;
  for (int j = 0; j < QK; j++)
    amax = fmaxf(amax, fabsf(x[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  wr_u16(b, dtype_f32_to_f16(d));
  for (int j = 0; j < QK; j++)
    b[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
}

/* The reference Q4_0 rule: take the value of largest magnitude (the first one on a tie), keeping
 * its sign; d = max / -8 so that value maps to q = 0 (-8 after the offset) and the other side
 * gets the extra +7 step; q = min(15, trunc(x/d + 8.5)). */
static void q_q4_0(const float *x, uint8_t *b) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < QK; j++) {
    if (amax < fabsf(x[j])) {
      amax = fabsf(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  wr_u16(b, dtype_f32_to_f16(d));
  for (int j = 0; j < QK / 2; j++) {
    /* Two statements, so x * id is rounded before the + 8.5 even where contraction is on. */
    const float x0 = x[j] * id;
    const float x1 = x[j + QK / 2] * id;
    int q0 = (int)(x0 + 8.5f);
    int q1 = (int)(x1 + 8.5f);
    if (q0 > 15) q0 = 15;
    if (q1 > 15) q1 = 15;
    b[2 + j] = (uint8_t)(q0 | (q1 << 4));
  }
}

int dtype_quant_row(enum dtype t, const float *src, void *dst, uint64_t n) {
  const struct dtype__entry *e = dtype__entry((uint32_t)t);
  if (!e || !dtype_can_quant(t)) return KVD_E_UNSUPPORTED;
  if (n % e->info.block_elems != 0) return KVD_EINVAL;
  if (n > 0 && (!src || !dst)) return KVD_EINVAL;
  uint8_t *d = dst;
  switch (t) {
  case DTYPE_F32:
    for (uint64_t i = 0; i < n; i++) {
      uint32_t u = f32_to_bits(src[i]);
      for (int k = 0; k < 4; k++)
        d[4 * i + (uint64_t)k] = (uint8_t)(u >> (8 * k));
    }
    return 0;
  case DTYPE_F16:
    for (uint64_t i = 0; i < n; i++)
      wr_u16(d + 2 * i, dtype_f32_to_f16(src[i]));
    return 0;
  case DTYPE_BF16:
    for (uint64_t i = 0; i < n; i++)
      wr_u16(d + 2 * i, dtype_f32_to_bf16(src[i]));
    return 0;
  default:
    break;
  }
  /* The block quantizers convert values to integers, which is undefined for NaN and Inf: refuse
   * them up front rather than write a half-made row. */
  for (uint64_t i = 0; i < n; i++)
    if (!isfinite(src[i])) return KVD_EINVAL;
  uint64_t nb = n / QK;
  for (uint64_t i = 0; i < nb; i++) {
    if (t == DTYPE_Q8_0)
      q_q8_0(src + i * QK, d + i * e->info.block_bytes);
    else
      q_q4_0(src + i * QK, d + i * e->info.block_bytes);
  }
  return 0;
}
