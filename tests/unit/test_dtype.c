/* Weight formats: the type table, row sizes, f16/bf16 conversion against independent oracles,
 * every dequantizer on hand-packed blocks with known values, the two quantizers' round trips, and
 * the real model files checked against each other.
 *
 * Hand-packed blocks are built from logical values (per-element quants, per-sub-block scales)
 * with packers written from the block layouts in the opposite direction to the dequantizers, and
 * the expected floats come from an exact double computation rounded once to float, which the
 * published reference says is bit-identical to ggml's to_float. */
#include "dtype.h"
#include "gguf.h"
#include "kt.h"
#include "kvd_error.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* --- small helpers ------------------------------------------------------------------------- */

static uint32_t f2u(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

static float u2f(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static void put16(uint8_t *p, uint16_t v) {
  p[0] = (uint8_t)(v & 0xff);
  p[1] = (uint8_t)(v >> 8);
}

static uint16_t get16(const uint8_t *p) {
  return (uint16_t)(p[0] | (p[1] << 8));
}

/* Counts mismatching floats by bit pattern and reports the first. */
static int bits_mismatch(const float *got, const float *want, size_t n) {
  int bad = 0;
  for (size_t i = 0; i < n; i++) {
    if (f2u(got[i]) != f2u(want[i])) {
      if (!bad)
        kt_log("first mismatch at %zu: got %.9g (0x%08x) want %.9g (0x%08x)", i, (double)got[i],
               f2u(got[i]), (double)want[i], f2u(want[i]));
      bad++;
    }
  }
  return bad;
}

/* Value of a half by its definition, independently of dtype_f16_to_f32. */
static double f16_value(uint16_t h) {
  int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  double v;
  if (e == 31) return m ? NAN : (s ? -INFINITY : INFINITY);
  if (e == 0)
    v = ldexp(m, -24);
  else
    v = ldexp(1024 + m, e - 25);
  return s ? -v : v;
}

/* --- the type table ------------------------------------------------------------------------ */

KT_TEST(table_sizes) {
  static const struct {
    uint32_t id;
    const char *name;
    uint32_t elems, bytes;
    bool dq;
  } want[] = {
      {DTYPE_F32, "f32", 1, 4, true},       {DTYPE_F16, "f16", 1, 2, true},
      {DTYPE_Q4_0, "q4_0", 32, 18, true},   {DTYPE_Q4_1, "q4_1", 32, 20, true},
      {DTYPE_Q5_0, "q5_0", 32, 22, true},   {DTYPE_Q5_1, "q5_1", 32, 24, true},
      {DTYPE_Q8_0, "q8_0", 32, 34, true},   {DTYPE_Q8_1, "q8_1", 32, 36, true},
      {DTYPE_Q2_K, "q2_K", 256, 84, false}, {DTYPE_Q3_K, "q3_K", 256, 110, false},
      {DTYPE_Q4_K, "q4_K", 256, 144, true}, {DTYPE_Q5_K, "q5_K", 256, 176, true},
      {DTYPE_Q6_K, "q6_K", 256, 210, true}, {DTYPE_Q8_K, "q8_K", 256, 292, false},
      {DTYPE_I8, "i8", 1, 1, false},        {DTYPE_I16, "i16", 1, 2, false},
      {DTYPE_I32, "i32", 1, 4, false},      {DTYPE_I64, "i64", 1, 8, false},
      {DTYPE_F64, "f64", 1, 8, false},      {DTYPE_BF16, "bf16", 1, 2, true},
      {16, "iq2_xxs", 256, 66, false},      {20, "iq4_nl", 32, 18, false},
      {23, "iq4_xs", 256, 136, false},      {39, "mxfp4", 32, 17, false},
  };
  for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
    const struct dtype_info *di = dtype_get(want[i].id);
    KT_ASSERT_MSG(di != NULL, "type %u missing", want[i].id);
    KT_ASSERT_STREQ(di->name, want[i].name);
    KT_ASSERT_STREQ(dtype_name(want[i].id), want[i].name);
    KT_CHECK_EQ(di->block_elems, want[i].elems);
    KT_CHECK_EQ(di->block_bytes, want[i].bytes);
    KT_CHECK_EQ(di->can_dequant, want[i].dq);
  }
  /* Withdrawn ids, in-memory-only repacked layouts and anything past the table are unknown. */
  static const uint32_t unknown[] = {4, 5, 31, 32, 33, 36, 37, 38, DTYPE_MAX, 41, 1000, UINT32_MAX};
  for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
    KT_CHECK(dtype_get(unknown[i]) == NULL);
    KT_ASSERT_STREQ(dtype_name(unknown[i]), "unknown");
  }
  /* Every named id has a sane block. */
  for (uint32_t id = 0; id < DTYPE_MAX; id++) {
    const struct dtype_info *di = dtype_get(id);
    if (!di) continue;
    KT_CHECK(di->block_elems == 1 || di->block_elems == 32 || di->block_elems == 256);
    KT_CHECK(di->block_bytes > 0);
  }
}

KT_TEST(row_bytes) {
  uint64_t r = 12345;
  KT_ASSERT_OK(dtype_row_bytes(DTYPE_F32, 3, &r));
  KT_CHECK_EQ(r, 12);
  KT_ASSERT_OK(dtype_row_bytes(DTYPE_BF16, 7, &r));
  KT_CHECK_EQ(r, 14);
  KT_ASSERT_OK(dtype_row_bytes(DTYPE_Q4_0, 64, &r));
  KT_CHECK_EQ(r, 36);
  KT_ASSERT_OK(dtype_row_bytes(DTYPE_Q8_0, 4096, &r));
  KT_CHECK_EQ(r, 128 * 34);
  KT_ASSERT_OK(dtype_row_bytes(DTYPE_Q6_K, 512, &r));
  KT_CHECK_EQ(r, 420);
  KT_ASSERT_OK(dtype_row_bytes(DTYPE_Q2_K, 256, &r)); /* sizes known even without dequant */
  KT_CHECK_EQ(r, 84);
  KT_ASSERT_OK(dtype_row_bytes(DTYPE_Q4_K, 0, &r));
  KT_CHECK_EQ(r, 0);

  /* Partial blocks are rejected and leave *ret alone. */
  r = 777;
  KT_CHECK_EQ(dtype_row_bytes(DTYPE_Q4_0, 33, &r), KVD_EINVAL);
  KT_CHECK_EQ(dtype_row_bytes(DTYPE_Q4_K, 255, &r), KVD_EINVAL);
  KT_CHECK_EQ(dtype_row_bytes(DTYPE_Q8_0, 172, &r), KVD_EINVAL); /* stories260K's ffn_down */
  KT_CHECK_EQ(dtype_row_bytes(DTYPE_Q6_K, 64, &r), KVD_EINVAL);
  KT_CHECK_EQ(r, 777);
  /* Unknown types and overflowing sizes. */
  KT_CHECK_EQ(dtype_row_bytes((enum dtype)4, 32, &r), KVD_E_UNSUPPORTED);
  KT_CHECK_EQ(dtype_row_bytes((enum dtype)DTYPE_MAX, 32, &r), KVD_E_UNSUPPORTED);
  KT_CHECK_EQ(dtype_row_bytes(DTYPE_F32, UINT64_MAX / 2, &r), KVD_EOVERFLOW);
  KT_CHECK_EQ(dtype_row_bytes(DTYPE_Q8_0, UINT64_MAX / 32 * 32, &r), KVD_EOVERFLOW);
  KT_CHECK_EQ(r, 777);
  KT_ASSERT_OK(dtype_row_bytes(DTYPE_I8, UINT64_MAX, &r)); /* the largest that fits */
  KT_CHECK(r == UINT64_MAX);
}

KT_TEST(dequant_rejects_bad_calls) {
  uint8_t blk[256] = {0};
  float out[256];
  KT_CHECK_EQ(dtype_dequant_row(DTYPE_Q4_0, blk, out, 31), KVD_EINVAL);
  KT_CHECK_EQ(dtype_dequant_row(DTYPE_Q4_K, blk, out, 32), KVD_EINVAL);
  KT_CHECK_EQ(dtype_dequant_row(DTYPE_Q2_K, blk, out, 256), KVD_E_UNSUPPORTED);
  KT_CHECK_EQ(dtype_dequant_row(DTYPE_Q8_K, blk, out, 256), KVD_E_UNSUPPORTED);
  KT_CHECK_EQ(dtype_dequant_row(DTYPE_I32, blk, out, 4), KVD_E_UNSUPPORTED);
  KT_CHECK_EQ(dtype_dequant_row((enum dtype)5, blk, out, 32), KVD_E_UNSUPPORTED);
  KT_CHECK_EQ(dtype_dequant_row(DTYPE_Q8_0, NULL, out, 32), KVD_EINVAL);
  KT_CHECK_EQ(dtype_dequant_row(DTYPE_Q8_0, blk, NULL, 32), KVD_EINVAL);
  KT_CHECK_EQ(dtype_dequant_row(DTYPE_Q8_0, NULL, NULL, 0), 0);
  KT_CHECK_EQ(dtype_quant_row(DTYPE_Q8_0, out, blk, 33), KVD_EINVAL);
  KT_CHECK_EQ(dtype_quant_row(DTYPE_Q4_1, out, blk, 32), KVD_E_UNSUPPORTED);
  KT_CHECK_EQ(dtype_quant_row(DTYPE_Q4_K, out, blk, 256), KVD_E_UNSUPPORTED);
  KT_CHECK_EQ(dtype_quant_row((enum dtype)4, out, blk, 32), KVD_E_UNSUPPORTED);
  KT_CHECK(dtype_can_quant(DTYPE_Q4_0) && dtype_can_quant(DTYPE_Q8_0) &&
           dtype_can_quant(DTYPE_BF16));
  KT_CHECK(!dtype_can_quant(DTYPE_Q5_0) && !dtype_can_quant(DTYPE_Q6_K));
}

/* --- half and bfloat16 --------------------------------------------------------------------- */

KT_TEST(f16_to_f32_every_value) {
  /* All 65536 halves against the definition, and back again unchanged (NaNs stay NaN). */
  for (uint32_t h = 0; h < 65536; h++) {
    float f = dtype_f16_to_f32((uint16_t)h);
    double want = f16_value((uint16_t)h);
    if (isnan(want)) {
      KT_ASSERT_MSG(isnan(f), "0x%04x should be NaN", h);
      KT_ASSERT_MSG(isnan(dtype_f16_to_f32(dtype_f32_to_f16(f))), "NaN 0x%04x lost", h);
      continue;
    }
    KT_ASSERT_MSG((double)f == want && !!signbit(f) == !!signbit(want), "0x%04x: %.9g != %.9g", h,
                  (double)f, want);
    KT_ASSERT_MSG(dtype_f32_to_f16(f) == h, "0x%04x does not round-trip (0x%04x)", h,
                  dtype_f32_to_f16(f));
  }
}

KT_TEST(f16_edge_values) {
  KT_CHECK(dtype_f16_to_f32(0x0001) == ldexpf(1, -24)); /* smallest subnormal */
  KT_CHECK(dtype_f16_to_f32(0x03ff) == ldexpf(1023, -24));
  KT_CHECK(dtype_f16_to_f32(0x0400) == ldexpf(1, -14)); /* smallest normal */
  KT_CHECK(dtype_f16_to_f32(0x7bff) == 65504.0f);
  KT_CHECK(dtype_f16_to_f32(0x3555) == 0.333251953125f);
  KT_CHECK(isinf(dtype_f16_to_f32(0xfc00)) && dtype_f16_to_f32(0xfc00) < 0);
  KT_CHECK(signbit(dtype_f16_to_f32(0x8000)) && dtype_f16_to_f32(0x8000) == 0);

  KT_CHECK_EQ(dtype_f32_to_f16(1.0f), 0x3c00);
  KT_CHECK_EQ(dtype_f32_to_f16(-2.0f), 0xc000);
  KT_CHECK_EQ(dtype_f32_to_f16(-0.0f), 0x8000);
  KT_CHECK_EQ(dtype_f32_to_f16(65504.0f), 0x7bff);
  KT_CHECK_EQ(dtype_f32_to_f16(nextafterf(65520.0f, 0)), 0x7bff); /* just under the tie */
  KT_CHECK_EQ(dtype_f32_to_f16(65520.0f), 0x7c00);                /* the tie goes to even: Inf */
  KT_CHECK_EQ(dtype_f32_to_f16(1e10f), 0x7c00);
  KT_CHECK_EQ(dtype_f32_to_f16(-INFINITY), 0xfc00);
  KT_CHECK_EQ(dtype_f32_to_f16(FLT_MAX), 0x7c00);
  uint16_t nan = dtype_f32_to_f16(NAN);
  KT_CHECK((nan & 0x7c00) == 0x7c00 && (nan & 0x3ff) != 0);
  /* A NaN whose payload lives only in the low bits must not become Inf. */
  nan = dtype_f32_to_f16(u2f(0x7f800001));
  KT_CHECK((nan & 0x7c00) == 0x7c00 && (nan & 0x3ff) != 0);
  nan = dtype_f32_to_f16(u2f(0xff800001));
  KT_CHECK((nan & 0xfc00) == 0xfc00 && (nan & 0x3ff) != 0);

  /* Ties round to the even neighbour, above and below. */
  KT_CHECK_EQ(dtype_f32_to_f16(1.0f + ldexpf(1, -11)), 0x3c00);
  KT_CHECK_EQ(dtype_f32_to_f16(1.0f + 3 * ldexpf(1, -11)), 0x3c02);
  KT_CHECK_EQ(dtype_f32_to_f16(1.0f + ldexpf(1, -11) + ldexpf(1, -20)), 0x3c01);
  KT_CHECK_EQ(dtype_f32_to_f16(2047.0f + 0.5f), 0x67ff + 1); /* 2047.5 → 2048 (even) */
  /* Subnormal results: 2^-24 steps, ties to even, and rounding up into the normals. */
  KT_CHECK_EQ(dtype_f32_to_f16(ldexpf(1, -24)), 0x0001);
  KT_CHECK_EQ(dtype_f32_to_f16(ldexpf(1, -25)), 0x0000); /* tie between 0 and 1 */
  KT_CHECK_EQ(dtype_f32_to_f16(-ldexpf(1, -25)), 0x8000);
  KT_CHECK_EQ(dtype_f32_to_f16(nextafterf(ldexpf(1, -25), 1)), 0x0001);
  KT_CHECK_EQ(dtype_f32_to_f16(ldexpf(3, -25)), 0x0002);    /* 1.5 ulp: tie to even 2 */
  KT_CHECK_EQ(dtype_f32_to_f16(ldexpf(5, -25)), 0x0002);    /* 2.5 ulp: tie to even 2 */
  KT_CHECK_EQ(dtype_f32_to_f16(ldexpf(2047, -25)), 0x0400); /* 1023.5 ulp → smallest normal */
  KT_CHECK_EQ(dtype_f32_to_f16(ldexpf(1, -30)), 0x0000);
  KT_CHECK_EQ(dtype_f32_to_f16(u2f(0x00000001)), 0x0000); /* f32 subnormals flush by rounding */
}

/* Is h the correctly rounded (nearest, ties to even) half for the finite float f? */
static bool f16_is_nearest(float f, uint16_t h) {
  double x = f, v = f16_value(h);
  if (isinf(v)) return fabs(x) >= 65520.0 && !!signbit(v) == !!signbit(x);
  if (!!signbit(v) != !!signbit(x) && v != 0) return false;
  double err = fabs(x - v);
  uint16_t mag = h & 0x7fff;
  if (mag < 0x7bff) {
    double up = fabs(f16_value((uint16_t)((h & 0x8000) | (mag + 1))));
    if (fabs(fabs(x) - up) < err) return false;
    if (fabs(fabs(x) - up) == err && (mag & 1)) return false;
  } else if (fabs(x) >= 65520.0) {
    return false; /* should have been Inf */
  }
  if (mag > 0) {
    double down = fabs(f16_value((uint16_t)((h & 0x8000) | (mag - 1))));
    if (fabs(fabs(x) - down) < err) return false;
    if (fabs(fabs(x) - down) == err && (mag & 1)) return false;
  }
  return true;
}

/* Random floats, concentrated on the exponents a half can express and at exact ties. */
static float random_float_near(int lo_exp, int hi_exp) {
  uint32_t u = (uint32_t)kt_rand_u64();
  switch (kt_rand_range(0, 3)) {
  case 0:
    return u2f(u); /* anything, including NaN and Inf */
  case 1: {
    uint32_t e = kt_rand_range((uint32_t)(127 + lo_exp), (uint32_t)(127 + hi_exp));
    return u2f((u & 0x807fffffu) | (e << 23));
  }
  default: {
    /* A tie or a near-tie for the half (13 dropped bits) or the bfloat16 (16 dropped bits). */
    uint32_t e = kt_rand_range((uint32_t)(127 + lo_exp), (uint32_t)(127 + hi_exp));
    uint32_t v = (u & 0x807fffffu) | (e << 23);
    uint32_t low = kt_rand_range(0, 1) ? 0x1000u : 0x8000u;
    v = (v & ~(low * 2 - 1)) | low;
    return u2f(v + kt_rand_range(0, 2) - 1);
  }
  }
}

KT_TEST(f32_to_f16_is_nearest_even) {
  for (int i = 0; i < 400000; i++) {
    float f = random_float_near(-27, 17);
    uint16_t h = dtype_f32_to_f16(f);
    if (isnan(f)) {
      KT_ASSERT_MSG(isnan(f16_value(h)), "NaN 0x%08x became 0x%04x", f2u(f), h);
      continue;
    }
    KT_ASSERT_MSG(f16_is_nearest(f, h), "%.9g (0x%08x) -> 0x%04x", (double)f, f2u(f), h);
  }
}

KT_TEST(bf16_conversions) {
  /* Every bfloat16 widens to the float with the same top bits and narrows back. */
  for (uint32_t h = 0; h < 65536; h++) {
    float f = dtype_bf16_to_f32((uint16_t)h);
    KT_ASSERT_EQ(f2u(f), h << 16);
    if (isnan(f))
      KT_ASSERT(isnan(dtype_bf16_to_f32(dtype_f32_to_bf16(f))));
    else
      KT_ASSERT_EQ(dtype_f32_to_bf16(f), h);
  }
  KT_CHECK_EQ(dtype_f32_to_bf16(1.0f), 0x3f80);
  KT_CHECK_EQ(dtype_f32_to_bf16(u2f(0x3f808000)), 0x3f80); /* tie, even below */
  KT_CHECK_EQ(dtype_f32_to_bf16(u2f(0x3f818000)), 0x3f82); /* tie, even above */
  KT_CHECK_EQ(dtype_f32_to_bf16(u2f(0x3f808001)), 0x3f81);
  KT_CHECK_EQ(dtype_f32_to_bf16(u2f(0x3f807fff)), 0x3f80);
  KT_CHECK_EQ(dtype_f32_to_bf16(FLT_MAX), 0x7f80); /* rounds up into Inf */
  KT_CHECK_EQ(dtype_f32_to_bf16(u2f(0x7f7f7fff)), 0x7f7f);
  KT_CHECK_EQ(dtype_f32_to_bf16(-INFINITY), 0xff80);
  KT_CHECK_EQ(dtype_f32_to_bf16(-0.0f), 0x8000);
  KT_CHECK_EQ(dtype_f32_to_bf16(u2f(0x00008000)), 0x0000); /* subnormal tie to even */
  KT_CHECK_EQ(dtype_f32_to_bf16(u2f(0x00018000)), 0x0002);
  KT_CHECK_EQ(dtype_f32_to_bf16(u2f(0x00008001)), 0x0001);
  KT_CHECK_EQ(dtype_f32_to_bf16(u2f(0x007fffff)), 0x0080); /* largest subnormal → FLT_MIN */
  KT_CHECK(dtype_bf16_to_f32(0x0001) == ldexpf(1, -133));
  uint16_t nan = dtype_f32_to_bf16(u2f(0x7f800001)); /* payload only in the dropped bits */
  KT_CHECK((nan & 0x7f80) == 0x7f80 && (nan & 0x7f) != 0);
  KT_CHECK(isnan(dtype_bf16_to_f32(dtype_f32_to_bf16(NAN))));

  /* Random floats: the result is the nearest bfloat16, ties to even, Inf past the top. */
  for (int i = 0; i < 400000; i++) {
    float f = random_float_near(-140, 127);
    uint16_t h = dtype_f32_to_bf16(f);
    if (isnan(f)) {
      KT_ASSERT(isnan(dtype_bf16_to_f32(h)));
      continue;
    }
    double x = f, v = dtype_bf16_to_f32(h);
    if (isinf(v)) {
      /* Only values at or past the midpoint between the largest bfloat16 and 2^128. */
      KT_ASSERT_MSG(isinf(x) || fabs(x) >= ldexp(0x1ffU, 119), "0x%08x -> Inf", f2u(f));
      continue;
    }
    double err = fabs(x - v);
    uint16_t mag = h & 0x7fff;
    double up = mag < 0x7f7f ? fabs((double)dtype_bf16_to_f32((uint16_t)(mag + 1))) : INFINITY;
    double down = mag > 0 ? fabs((double)dtype_bf16_to_f32((uint16_t)(mag - 1))) : 0;
    KT_ASSERT_MSG(err <= fabs(fabs(x) - up) && err <= fabs(fabs(x) - down), "0x%08x -> 0x%04x",
                  f2u(f), h);
    if (err == fabs(fabs(x) - up) || (mag > 0 && err == fabs(fabs(x) - down)))
      KT_ASSERT_MSG(err == 0 || !(mag & 1), "tie 0x%08x -> odd 0x%04x", f2u(f), h);
  }
}

/* --- plain rows ---------------------------------------------------------------------------- */

KT_TEST(plain_rows) {
  float src[64], out[64];
  uint8_t buf[64 * 4];
  kt_rand_fill(src, 64, -1000.0f, 1000.0f);
  src[0] = ldexpf(1, -20); /* an f16 subnormal */
  src[1] = -0.0f;
  KT_ASSERT_OK(dtype_quant_row(DTYPE_F32, src, buf, 64));
  KT_ASSERT_OK(dtype_dequant_row(DTYPE_F32, buf, out, 64));
  KT_CHECK_EQ(bits_mismatch(out, src, 64), 0);
  KT_CHECK_EQ(buf[4 * 1 + 3], 0x80); /* little-endian in the buffer */

  KT_ASSERT_OK(dtype_quant_row(DTYPE_F16, src, buf, 64));
  KT_ASSERT_OK(dtype_dequant_row(DTYPE_F16, buf, out, 64));
  for (int i = 0; i < 64; i++) {
    KT_CHECK_EQ(get16(buf + 2 * i), dtype_f32_to_f16(src[i]));
    KT_CHECK(f2u(out[i]) == f2u(dtype_f16_to_f32(dtype_f32_to_f16(src[i]))));
  }
  KT_ASSERT_OK(dtype_quant_row(DTYPE_BF16, src, buf, 64));
  KT_ASSERT_OK(dtype_dequant_row(DTYPE_BF16, buf, out, 64));
  for (int i = 0; i < 64; i++) {
    KT_CHECK_EQ(get16(buf + 2 * i), dtype_f32_to_bf16(src[i]));
    KT_CHECK(f2u(out[i]) == (uint32_t)dtype_f32_to_bf16(src[i]) << 16);
  }
  /* Rows may start at any byte: blocks in a file are packed, not aligned. */
  uint8_t odd[1 + 8];
  put16(odd + 1, 0x3c00);
  put16(odd + 3, 0xc000);
  KT_ASSERT_OK(dtype_dequant_row(DTYPE_F16, odd + 1, out, 2));
  KT_CHECK(out[0] == 1.0f && out[1] == -2.0f);
}

/* --- legacy 32-value blocks ---------------------------------------------------------------- */

/* The documented example: d = 0.5 and low nibbles 0..15 give (q - 8) * 0.5 in element order;
 * the high nibbles (15 - j) fill elements 16..31. */
KT_TEST(q4_0_block) {
  uint8_t b[2 * 18];
  float out[64], want[64];
  for (int k = 0; k < 2; k++) {
    uint8_t *p = b + 18 * k;
    put16(p, k == 0 ? 0x3800 : 0xb400); /* 0.5, then -0.25 */
    double d = k == 0 ? 0.5 : -0.25;
    for (int j = 0; j < 16; j++) {
      p[2 + j] = (uint8_t)(j | ((15 - j) << 4));
      want[32 * k + j] = (float)((j - 8) * d);
      want[32 * k + 16 + j] = (float)((15 - j - 8) * d);
    }
  }
  KT_ASSERT_OK(dtype_dequant_row(DTYPE_Q4_0, b, out, 64));
  KT_CHECK_EQ(bits_mismatch(out, want, 64), 0);
  KT_CHECK(out[0] == -4.0f && out[15] == 3.5f && out[16] == 3.5f && out[31] == -4.0f);
}

KT_TEST(q4_1_block) {
  uint8_t b[20];
  float out[32], want[32];
  put16(b, 0x3400);     /* d = 0.25 */
  put16(b + 2, 0xbe00); /* m = -1.5 */
  for (int j = 0; j < 16; j++)
    b[4 + j] = (uint8_t)(((j * 7) & 15) | ((j ^ 9) << 4));
  for (int j = 0; j < 16; j++) {
    want[j] = (float)(((j * 7) & 15) * 0.25 - 1.5);
    want[16 + j] = (float)((j ^ 9) * 0.25 - 1.5);
  }
  KT_ASSERT_OK(dtype_dequant_row(DTYPE_Q4_1, b, out, 32));
  KT_CHECK_EQ(bits_mismatch(out, want, 32), 0);

  /* A min that makes the sum inexact: one rounding of q*d + m, as the reference does. */
  put16(b, 0x3c01);     /* d = 1 + 2^-10 */
  put16(b + 2, 0x1001); /* m = 2^-11 * (1 + 2^-10) */
  for (int j = 0; j < 16; j++) {
    double d = 1 + ldexp(1, -10), m = ldexp(1 + ldexp(1, -10), -11);
    want[j] = (float)(((j * 7) & 15) * d + m);
    want[16 + j] = (float)((j ^ 9) * d + m);
  }
  KT_ASSERT_OK(dtype_dequant_row(DTYPE_Q4_1, b, out, 32));
  KT_CHECK_EQ(bits_mismatch(out, want, 32), 0);
}

/* Q5 blocks from 32 logical 5-bit values: nibbles as Q4, the fifth bit of value j in bit j of the
 * little-endian qh word. */
static void pack_q5(uint8_t *qh4, uint8_t *qs16, const int *q) {
  uint32_t qh = 0;
  for (int j = 0; j < 16; j++) {
    qs16[j] = (uint8_t)((q[j] & 15) | ((q[j + 16] & 15) << 4));
    qh |= (uint32_t)(q[j] >> 4) << j;
    qh |= (uint32_t)(q[j + 16] >> 4) << (j + 16);
  }
  for (int k = 0; k < 4; k++)
    qh4[k] = (uint8_t)(qh >> (8 * k));
}

KT_TEST(q5_0_block) {
  uint8_t b[22 * 3];
  float out[96], want[96];
  for (int k = 0; k < 3; k++) {
    int q[32];
    for (int j = 0; j < 32; j++)
      q[j] = (int)kt_rand_range(0, 31);
    q[0] = 0;
    q[31] = 31;
    q[17] = 16;
    uint8_t *p = b + 22 * k;
    put16(p, 0x3000); /* d = 0.125 */
    pack_q5(p + 2, p + 6, q);
    for (int j = 0; j < 32; j++)
      want[32 * k + j] = (float)((q[j] - 16) * 0.125);
  }
  KT_ASSERT_OK(dtype_dequant_row(DTYPE_Q5_0, b, out, 96));
  KT_CHECK_EQ(bits_mismatch(out, want, 96), 0);
  KT_CHECK(out[0] == -2.0f && out[31] == 1.875f && out[17] == 0.0f);
}

KT_TEST(q5_1_block) {
  uint8_t b[24];
  float out[32], want[32];
  int q[32];
  for (int j = 0; j < 32; j++)
    q[j] = (j * 13 + 5) & 31;
  put16(b, 0x2e66);     /* d = 0.0999755859375 */
  put16(b + 2, 0xc233); /* m = -3.099609375 */
  pack_q5(b + 4, b + 8, q);
  double d = f16_value(0x2e66), m = f16_value(0xc233);
  KT_ASSERT(d == 0.0999755859375 && m == -3.099609375);
  for (int j = 0; j < 32; j++)
    want[j] = (float)(q[j] * d + m);
  KT_ASSERT_OK(dtype_dequant_row(DTYPE_Q5_1, b, out, 32));
  KT_CHECK_EQ(bits_mismatch(out, want, 32), 0);
}

KT_TEST(q8_0_and_q8_1_blocks) {
  uint8_t b[34], c[36];
  float out[32], want[32];
  put16(b, 0x2c00); /* d = 2^-4 */
  put16(c, 0x2c00);
  put16(c + 2, 0x7bff); /* s is for dot products only: it must not leak into the values */
  for (int j = 0; j < 32; j++) {
    int q = j == 0 ? -128 : j == 1 ? 127 : j * 8 - 124;
    b[2 + j] = (uint8_t)(int8_t)q;
    c[4 + j] = (uint8_t)(int8_t)q;
    want[j] = (float)(q / 16.0);
  }
  KT_ASSERT_OK(dtype_dequant_row(DTYPE_Q8_0, b, out, 32));
  KT_CHECK_EQ(bits_mismatch(out, want, 32), 0);
  KT_CHECK(out[0] == -8.0f && out[1] == 7.9375f);
  KT_ASSERT_OK(dtype_dequant_row(DTYPE_Q8_1, c, out, 32));
  KT_CHECK_EQ(bits_mismatch(out, want, 32), 0);
}

/* --- K super-blocks ------------------------------------------------------------------------ */

/* Eight 6-bit scales and mins into the 12 bytes: sub-blocks 0..3 in the low 6 bits of bytes 0..3
 * (scales) and 4..7 (mins); sub-blocks 4..7 split as a low nibble in bytes 8..11 (scale low, min
 * high) and the top 2 bits in the spare bits 6-7 of bytes 0..3 (scale) and 4..7 (min). */
static void pack_k_scales(uint8_t *s, const int *sc, const int *mn) {
  for (int j = 0; j < 4; j++) {
    s[j] = (uint8_t)(sc[j] | ((sc[j + 4] >> 4) << 6));
    s[j + 4] = (uint8_t)(mn[j] | ((mn[j + 4] >> 4) << 6));
    s[j + 8] = (uint8_t)((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
  }
}

/* Q4_K/Q5_K element order: value i is in chunk i/64; within it the first 32 use the low nibbles
 * of the chunk's 32 qs bytes and the second 32 their high nibbles; Q5_K's fifth bit of value i
 * is bit (i/32) of qh[i % 32]. Sub-block i/32 supplies the scale and min. */
static void pack_k_quants(uint8_t *qs, uint8_t *qh, const int *q, int bits) {
  memset(qs, 0, 128);
  if (qh) memset(qh, 0, 32);
  for (int i = 0; i < 256; i++) {
    int c = i / 64, w = i % 64, l = w % 32;
    int nib = q[i] & 15;
    qs[32 * c + l] |= (uint8_t)(w < 32 ? nib : nib << 4);
    if (bits == 5 && (q[i] & 16)) qh[l] |= (uint8_t)(1u << (i / 32));
  }
}

static const int k_sc[8] = {1, 63, 17, 40, 0, 33, 62, 5};
static const int k_mn[8] = {0, 63, 9, 21, 60, 1, 48, 32};

static void check_k_block(int bits) {
  const int bytes = bits == 4 ? 144 : 176;
  uint8_t b[2 * 176];
  float out[512], want[512];
  for (int k = 0; k < 2; k++) {
    uint8_t *p = b + bytes * k;
    int q[256];
    for (int i = 0; i < 256; i++)
      q[i] = (int)kt_rand_range(0, (1u << bits) - 1);
    q[0] = 0;
    q[255] = (1 << bits) - 1;
    uint16_t dh = k == 0 ? 0x2a00 : 0x1e9a; /* 0.046875, then an untidy 1690 * 2^-18 */
    uint16_t mh = k == 0 ? 0x1c00 : 0x1555; /* 2^-8, then 0.00130176544189453125 */
    put16(p, dh);
    put16(p + 2, mh);
    int sc[8], mn[8];
    for (int j = 0; j < 8; j++) {
      sc[j] = k == 0 ? k_sc[j] : (int)kt_rand_range(0, 63);
      mn[j] = k == 0 ? k_mn[j] : (int)kt_rand_range(0, 63);
    }
    pack_k_scales(p + 4, sc, mn);
    if (bits == 4)
      pack_k_quants(p + 16, NULL, q, 4);
    else
      pack_k_quants(p + 48, p + 16, q, 5);
    double d = f16_value(dh), dmin = f16_value(mh);
    for (int i = 0; i < 256; i++)
      want[256 * k + i] = (float)(d * sc[i / 32] * q[i] - dmin * mn[i / 32]);
  }
  KT_ASSERT_OK(dtype_dequant_row(bits == 4 ? DTYPE_Q4_K : DTYPE_Q5_K, b, out, 512));
  KT_CHECK_EQ(bits_mismatch(out, want, 512), 0);
  /* Spot values of the first block, worked by hand: value 0 has q 0 in sub-block 0 (min 0), the
   * last q 15 (31) in sub-block 7 (scale 5, min 32). */
  KT_CHECK(out[0] == 0.0f);
  KT_CHECK(out[255] == (float)(0.046875 * 5 * ((1 << bits) - 1) - 32.0 / 256));
}

KT_TEST(q4_k_block) {
  check_k_block(4);
}

KT_TEST(q5_k_block) {
  check_k_block(5);
}

/* Packs a Q6_K block (layout below, at q6_k_block) from 256 6-bit quants, 16 scales and d. */
static void pack_q6_k(uint8_t *b, uint16_t d, const int *sc, const int *q) {
  memset(b, 0, 210);
  for (int i = 0; i < 256; i++) {
    int n = i / 128, v = i % 128, l = v % 32, g = v / 32;
    uint8_t *ql = b + 64 * n + l + 32 * (g & 1);
    *ql |= (uint8_t)(g < 2 ? (q[i] & 15) : (q[i] & 15) << 4);
    b[128 + 32 * n + l] |= (uint8_t)((q[i] >> 4) << (2 * g));
  }
  for (int j = 0; j < 16; j++)
    b[192 + j] = (uint8_t)(int8_t)sc[j];
  put16(b + 208, d);
}

/* Q6_K: value i of half n = i/128 (v = i % 128, l = v % 32, g = v / 32) has its low 4 bits in
 * ql[64n + l + 32*(g&1)] (low nibble for g < 2, high for g >= 2) and its top 2 bits at bits 2g of
 * qh[32n + l]; scale 8n + v/16 (signed); d is the last field. y = d * scale * (q - 32). */
KT_TEST(q6_k_block) {
  static const int sc[16] = {-128, 127, -1, 1, 0, 64, -64, 5, -7, 100, -100, 33, -33, 2, -2, 127};
  uint8_t b[210] = {0};
  float out[256], want[256];
  int q[256];
  for (int i = 0; i < 256; i++)
    q[i] = (int)kt_rand_range(0, 63);
  q[0] = 0;
  q[1] = 63;
  q[200] = 32;
  pack_q6_k(b, 0x1401, sc, q); /* d = 2^-10 * (1 + 2^-10) */
  double d = f16_value(0x1401);
  for (int i = 0; i < 256; i++)
    want[i] = (float)(d * sc[(i / 128) * 8 + (i % 128) / 16] * (q[i] - 32));
  KT_ASSERT_OK(dtype_dequant_row(DTYPE_Q6_K, b, out, 256));
  KT_CHECK_EQ(bits_mismatch(out, want, 256), 0);
  KT_CHECK(out[0] == (float)(d * -128 * -32)); /* largest magnitude: 2^12 * d */
  KT_CHECK(out[1] == (float)(d * -128 * 31));
  KT_CHECK(out[200] == 0.0f);
}

/* Random blocks of every dequantizable block type: quants, sub-block scales and mins drawn at
 * random and the half fields (d, dmin, m) from every finite half, subnormals and negatives
 * included. Each expected value is one double expression rounded once to float, and that double
 * is exact: its terms are below 2^16 (largest half) × 2^7 × 2^5 = 2^28 and multiples of 2^-24
 * (the smallest half step), so 52 bits suffice. ggml's float expression is single-rounded too
 * (its products fit float's 24 bits), so equal bits here mean the same bits as ggml's to_float. */
static uint16_t random_finite_half(void) {
  for (;;) {
    uint16_t h = (uint16_t)kt_rand_u64();
    if ((h & 0x7c00) != 0x7c00) return h;
  }
}

/* One random block of type t at p, its expected values in w. */
static void random_block(enum dtype t, uint8_t *p, float *w) {
  int q[256], sc[16], mn[8];
  uint16_t h0 = random_finite_half(), h1 = random_finite_half();
  double d = f16_value(h0), m = f16_value(h1);
  switch (t) {
  case DTYPE_Q4_0:
  case DTYPE_Q4_1: {
    int off = t == DTYPE_Q4_0 ? 2 : 4;
    put16(p, h0);
    if (t == DTYPE_Q4_1) put16(p + 2, h1);
    for (int j = 0; j < 32; j++)
      q[j] = (int)kt_rand_range(0, 15);
    for (int j = 0; j < 16; j++)
      p[off + j] = (uint8_t)(q[j] | (q[j + 16] << 4));
    for (int j = 0; j < 32; j++)
      w[j] = (float)(t == DTYPE_Q4_0 ? (q[j] - 8) * d : q[j] * d + m);
    break;
  }
  case DTYPE_Q5_0:
  case DTYPE_Q5_1: {
    int off = t == DTYPE_Q5_0 ? 2 : 4;
    put16(p, h0);
    if (t == DTYPE_Q5_1) put16(p + 2, h1);
    for (int j = 0; j < 32; j++)
      q[j] = (int)kt_rand_range(0, 31);
    pack_q5(p + off, p + off + 4, q);
    for (int j = 0; j < 32; j++)
      w[j] = (float)(t == DTYPE_Q5_0 ? (q[j] - 16) * d : q[j] * d + m);
    break;
  }
  case DTYPE_Q8_0:
  case DTYPE_Q8_1: {
    int off = t == DTYPE_Q8_0 ? 2 : 4;
    put16(p, h0);
    if (t == DTYPE_Q8_1) put16(p + 2, h1);
    for (int j = 0; j < 32; j++) {
      q[j] = (int)kt_rand_range(0, 255) - 128;
      p[off + j] = (uint8_t)(int8_t)q[j];
      w[j] = (float)(q[j] * d);
    }
    break;
  }
  case DTYPE_Q4_K:
  case DTYPE_Q5_K: {
    int bits = t == DTYPE_Q4_K ? 4 : 5;
    put16(p, h0);
    put16(p + 2, h1);
    for (int j = 0; j < 8; j++) {
      sc[j] = (int)kt_rand_range(0, 63);
      mn[j] = (int)kt_rand_range(0, 63);
    }
    for (int i = 0; i < 256; i++)
      q[i] = (int)kt_rand_range(0, (1u << bits) - 1);
    pack_k_scales(p + 4, sc, mn);
    if (bits == 4)
      pack_k_quants(p + 16, NULL, q, 4);
    else
      pack_k_quants(p + 48, p + 16, q, 5);
    for (int i = 0; i < 256; i++)
      w[i] = (float)(d * sc[i / 32] * q[i] - m * mn[i / 32]);
    break;
  }
  case DTYPE_Q6_K:
    for (int i = 0; i < 256; i++)
      q[i] = (int)kt_rand_range(0, 63);
    for (int j = 0; j < 16; j++)
      sc[j] = (int)kt_rand_range(0, 255) - 128;
    pack_q6_k(p, h0, sc, q);
    for (int i = 0; i < 256; i++)
      w[i] = (float)(d * sc[(i / 128) * 8 + (i % 128) / 16] * (q[i] - 32));
    break;
  default:
    break;
  }
}

static int random_blocks_mismatch(enum dtype t, int nblocks) {
  const struct dtype_info *di = dtype_get(t);
  const size_t bb = di->block_bytes, be = di->block_elems;
  uint8_t *b = calloc((size_t)nblocks, bb);
  float *want = malloc(sizeof(float) * be * (size_t)nblocks);
  float *got = malloc(sizeof(float) * be * (size_t)nblocks);
  int bad = -1;
  if (b && want && got) {
    for (int k = 0; k < nblocks; k++)
      random_block(t, b + bb * (size_t)k, want + be * (size_t)k);
    if (dtype_dequant_row(t, b, got, be * (uint64_t)nblocks) == 0)
      bad = bits_mismatch(got, want, be * (size_t)nblocks);
  }
  free(b);
  free(want);
  free(got);
  return bad;
}

KT_TEST(random_blocks_are_exact) {
  static const enum dtype types[] = {DTYPE_Q4_0, DTYPE_Q4_1, DTYPE_Q5_0, DTYPE_Q5_1, DTYPE_Q8_0,
                                     DTYPE_Q8_1, DTYPE_Q4_K, DTYPE_Q5_K, DTYPE_Q6_K};
  for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
    int n = dtype_get(types[i])->block_elems == 32 ? 8192 : 1024;
    int bad = random_blocks_mismatch(types[i], n);
    if (bad != 0)
      kt__fail(__FILE__, __LINE__, "%s: %d values of %d blocks differ", dtype_name(types[i]), bad,
               n);
  }
}

/* --- quantizers ---------------------------------------------------------------------------- */

KT_TEST(q4_0_quant_by_hand) {
  /* (j - 8) * 0.5: the largest magnitude is -4, so d = -4 / -8 = 0.5 and the nibbles are exactly
   * 0..15 in order; dequantization gives the inputs back. */
  float x[32], y[32];
  uint8_t b[18];
  for (int j = 0; j < 32; j++)
    x[j] = (float)(((j & 15) - 8) * 0.5);
  KT_ASSERT_OK(dtype_quant_row(DTYPE_Q4_0, x, b, 32));
  KT_CHECK_EQ(get16(b), 0x3800);
  for (int j = 0; j < 16; j++)
    KT_CHECK_EQ(b[2 + j], j | (j << 4));
  KT_ASSERT_OK(dtype_dequant_row(DTYPE_Q4_0, b, y, 32));
  KT_CHECK_EQ(bits_mismatch(y, x, 32), 0);
  /* With +4 the largest, d is negative: +4 maps to nibble 0 and -4 clamps to 15 (−3.5). */
  for (int j = 0; j < 32; j++)
    x[j] = -x[j];
  KT_ASSERT_OK(dtype_quant_row(DTYPE_Q4_0, x, b, 32));
  KT_CHECK_EQ(get16(b), 0xb800);
  KT_ASSERT_OK(dtype_dequant_row(DTYPE_Q4_0, b, y, 32));
  KT_CHECK(y[0] == 4.0f && y[15] == -3.5f && y[8] == 0.0f);
  /* Equal magnitudes of both signs: the first one sets the sign of d. */
  memset(x, 0, sizeof x);
  x[3] = -1.0f;
  x[9] = 1.0f;
  KT_ASSERT_OK(dtype_quant_row(DTYPE_Q4_0, x, b, 32));
  KT_CHECK_EQ(get16(b), 0x3000); /* d = -1 / -8 */
  /* The reference multiplies by the float reciprocal of d rather than dividing by d; here the
   * two disagree (x/d + 8.5 truncates to 1, x * (1/d) + 8.5 to 2). */
  memset(x, 0, sizeof x);
  x[0] = u2f(0x3f800347);
  x[1] = u2f(0x3f500554);
  KT_ASSERT_OK(dtype_quant_row(DTYPE_Q4_0, x, b, 32));
  KT_CHECK_EQ(b[3] & 15, 2);
  /* All zeros: every nibble 8, and d = 0 / -8 is -0 (0x8000), as the reference rule gives. */
  memset(x, 0, sizeof x);
  KT_ASSERT_OK(dtype_quant_row(DTYPE_Q4_0, x, b, 32));
  KT_CHECK_EQ(get16(b), 0x8000);
  for (int j = 0; j < 16; j++)
    KT_CHECK_EQ(b[2 + j], 0x88);
}

KT_TEST(q8_0_quant_by_hand) {
  float x[32], y[32];
  uint8_t b[34];
  for (int j = 0; j < 32; j++)
    x[j] = (float)(j - 16) * 0.25f; /* amax 4 → d = 4/127 */
  KT_ASSERT_OK(dtype_quant_row(DTYPE_Q8_0, x, b, 32));
  KT_CHECK_EQ(get16(b), dtype_f32_to_f16(4.0f / 127.0f));
  KT_CHECK_EQ((int8_t)b[2], -127);
  KT_CHECK_EQ((int8_t)b[2 + 16], 0);
  KT_CHECK_EQ((int8_t)b[2 + 31], (int)roundf(3.75f * 127.0f / 4.0f));
  KT_ASSERT_OK(dtype_dequant_row(DTYPE_Q8_0, b, y, 32));
  for (int j = 0; j < 32; j++)
    KT_CHECK(fabsf(y[j] - x[j]) <= 0.5f * 4.0f / 127.0f * 1.13f);
  /* As for Q4_0, q = roundf(x * (1/d)), which here is 14 where roundf(x / d) is 13. */
  memset(x, 0, sizeof x);
  x[0] = u2f(0x3f8020c5);
  x[1] = u2f(0x3dd9eb22);
  KT_ASSERT_OK(dtype_quant_row(DTYPE_Q8_0, x, b, 32));
  KT_CHECK_EQ(b[2 + 1], 14);
  /* Non-finite inputs are refused, not turned into undefined conversions. */
  x[5] = NAN;
  KT_CHECK_EQ(dtype_quant_row(DTYPE_Q8_0, x, b, 32), KVD_EINVAL);
  x[5] = INFINITY;
  KT_CHECK_EQ(dtype_quant_row(DTYPE_Q4_0, x, b, 32), KVD_EINVAL);
}

/* Quantize fresh random rows and bound every element's error. With d the float scale and d_h its
 * stored half (|d_h - d| <= 2^-11 |d|), a value quantized to q comes back as q*d_h, so
 *   |y - x| <= |q*d - x| + |q|*|d_h - d|:
 * Q8_0: |q*d - x| <= d/2 and |q| <= 127;
 * Q4_0: |q*d - x| <= |d|/2 except on the clamped side, where x/d + 8 may reach 16 and q stops at
 * 15, so |q*d - x| <= |d| * max(1/2, x/d - 7); |q| <= 8. */
static void check_round_trip(enum dtype t, float lo, float hi, int nblocks) {
  const int bb = t == DTYPE_Q8_0 ? 34 : 18;
  float *x = malloc(sizeof(float) * 32 * (size_t)nblocks);
  float *y = malloc(sizeof(float) * 32 * (size_t)nblocks);
  uint8_t *b = malloc((size_t)bb * (size_t)nblocks);
  KT_ASSERT(x && y && b);
  for (int k = 0; k < nblocks; k++) {
    /* Each block gets its own spread so the scales cover many binades. */
    float s = ldexpf(1.0f, (int)kt_rand_range(0, 40) - 30);
    kt_rand_fill(x + 32 * k, 32, lo * s, hi * s);
  }
  KT_ASSERT_OK(dtype_quant_row(t, x, b, 32 * (uint64_t)nblocks));
  KT_ASSERT_OK(dtype_dequant_row(t, b, y, 32 * (uint64_t)nblocks));
  int bad = 0;
  for (int k = 0; k < nblocks && !bad; k++) {
    const float *xb = x + 32 * k;
    double amax = 0, max = 0;
    for (int j = 0; j < 32; j++)
      if (fabs(xb[j]) > amax) amax = fabs(xb[j]), max = xb[j];
    double d = t == DTYPE_Q8_0 ? amax / 127 : max / -8;
    double dh = f16_value(get16(b + (size_t)bb * (size_t)k));
    for (int j = 0; j < 32; j++) {
      double err = fabs((double)y[32 * k + j] - xb[j]), bound;
      if (t == DTYPE_Q8_0) {
        bound = 0.5 * d + 127 * fabs(dh - d);
      } else {
        double r = d != 0 ? xb[j] / d : 0;
        bound = fabs(d) * fmax(0.5, r - 7) + 8 * fabs(dh - d);
      }
      bound = bound * (1 + 1e-6) + 1e-30; /* float evaluation of x/d and of the result */
      if (err > bound) {
        kt__fail(__FILE__, __LINE__, "%s block %d elem %d: x %.9g y %.9g err %.3g > %.3g",
                 dtype_name(t), k, j, (double)xb[j], (double)y[32 * k + j], err, bound);
        bad = 1;
        break;
      }
    }
  }
  free(x);
  free(y);
  free(b);
}

KT_TEST(q8_0_round_trip_random) {
  check_round_trip(DTYPE_Q8_0, -1.0f, 1.0f, 2048);
  check_round_trip(DTYPE_Q8_0, 0.0f, 3.0f, 512); /* one-signed blocks */
}

KT_TEST(q4_0_round_trip_random) {
  check_round_trip(DTYPE_Q4_0, -1.0f, 1.0f, 2048);
  check_round_trip(DTYPE_Q4_0, -3.0f, 0.0f, 512);
}

/* --- the real model files ------------------------------------------------------------------ */

/* Failing inside a helper: report and return -1 so the caller can close its files. */
#define FAILF(...)                                                                                 \
  do {                                                                                             \
    kt__fail(__FILE__, __LINE__, __VA_ARGS__);                                                     \
    return -1;                                                                                     \
  } while (0)

/* Opens models/<rel> under the shared directory: 1 and *ret on success, 0 when the file is absent
 * (the caller skips), -1 on a reader error (already reported). */
static int open_model(const char *rel, struct gguf_file **ret) {
  char p[256];
  snprintf(p, sizeof p, "models/%s", rel);
  const char *path = kt_shared_path(p);
  if (!path) return 0;
  struct gguf_error err;
  int rc = gguf_open(path, ret, &err);
  if (rc < 0)
    FAILF("%s: %s (%s at offset %llu)", rel, kt__strerror(rc), err.msg,
          (unsigned long long)err.offset);
  return 1;
}

static uint64_t tensor_elems(const struct gguf_tensor *t) {
  uint64_t n = 1;
  for (uint32_t i = 0; i < t->n_dims; i++)
    n *= t->ne[i];
  return n;
}

static void tensor_name(const struct gguf_tensor *t, char *buf, size_t cap) {
  snprintf(buf, cap, "%.*s", (int)t->name.len, t->name.ptr);
}

/* The whole tensor as float32 (malloc'd), after checking that its byte size is rows * row bytes. */
static float *dequant_tensor(const struct gguf_tensor *t) {
  char name[96];
  tensor_name(t, name, sizeof name);
  uint64_t n = tensor_elems(t), row = 0;
  int rc = dtype_row_bytes(t->type, t->ne[0], &row);
  if (rc < 0 || row * (n / t->ne[0]) != t->nbytes) {
    kt__fail(__FILE__, __LINE__, "%s: %s rows of %llu do not make %llu bytes", name,
             dtype_name(t->type), (unsigned long long)t->ne[0], (unsigned long long)t->nbytes);
    return NULL;
  }
  float *y = malloc(sizeof(float) * (size_t)n);
  if (!y) return NULL;
  rc = dtype_dequant_row(t->type, t->data, y, n);
  if (rc < 0) {
    kt__fail(__FILE__, __LINE__, "%s: dequant %s: %s", name, dtype_name(t->type), kt__strerror(rc));
    free(y);
    return NULL;
  }
  return y;
}

static const char *const all_files[] = {
    "stories260K.gguf",
    "stories260K-f16.gguf",
    "quant/stories260K-q8_0.gguf",
    "quant/stories260K-q4_0.gguf",
    "quant/stories260K-q4_1.gguf",
    "quant/stories260K-q5_0.gguf",
    "quant/stories260K-q5_1.gguf",
    "quant/wide-synth-q4_k_m.gguf",
    "quant/wide-synth-q5_k_m.gguf",
    "quant/wide-synth-q6_k.gguf",
    "quant/wide-synth-q8_0.gguf",
    "quant/wide-synth-bf16.gguf",
    "quant/wide-synth-f16.gguf",
};

/* The tensor types SOURCES.md lists per file, as "type:count" pairs. */
static const char *const all_types[] = {
    "f32:48",
    "f16:36 f32:11",
    "q8_0:32 f16:5 f32:11",
    "q4_0:31 q8_0:1 f16:5 f32:11",
    "q4_1:31 q8_0:1 f16:5 f32:11",
    "q5_0:31 q8_0:1 f16:5 f32:11",
    "q5_1:31 q8_0:1 f16:5 f32:11",
    "q4_K:25 q6_K:5 f32:9",
    "q5_K:25 q6_K:5 f32:9",
    "q6_K:30 f32:9",
    "q8_0:30 f32:9",
    "bf16:30 f32:9",
    "f16:30 f32:9",
};

static int check_file_dequantizes(const struct gguf_file *f, const char *rel, const char *types) {
  int count[DTYPE_MAX] = {0};
  for (uint64_t i = 0; i < f->n_tensors; i++) {
    const struct gguf_tensor *t = &f->tensors[i];
    char name[96];
    tensor_name(t, name, sizeof name);
    const struct dtype_info *di = dtype_get(t->type);
    if (!di || !di->can_dequant) FAILF("%s: %s has type %u", rel, name, t->type);
    count[t->type]++;
    float *y = dequant_tensor(t);
    if (!y) return -1;
    uint64_t n = tensor_elems(t);
    for (uint64_t j = 0; j < n; j++) {
      if (!isfinite(y[j])) {
        free(y);
        FAILF("%s: %s[%llu] is not finite", rel, name, (unsigned long long)j);
      }
    }
    free(y);
  }
  /* The type census matches the documented one. */
  char got[128] = "";
  static const uint32_t order[] = {DTYPE_Q4_0, DTYPE_Q4_1, DTYPE_Q5_0, DTYPE_Q5_1,
                                   DTYPE_Q4_K, DTYPE_Q5_K, DTYPE_Q6_K, DTYPE_Q8_0,
                                   DTYPE_BF16, DTYPE_F16,  DTYPE_F32};
  for (size_t k = 0; k < sizeof order / sizeof order[0]; k++) {
    if (!count[order[k]]) continue;
    size_t len = strlen(got);
    snprintf(got + len, sizeof got - len, "%s%s:%d", len ? " " : "", dtype_name(order[k]),
             count[order[k]]);
  }
  if (strcmp(got, types) != 0) FAILF("%s: types \"%s\", want \"%s\"", rel, got, types);
  return 0;
}

KT_TEST(real_files_every_tensor_dequantizes) {
  for (size_t i = 0; i < sizeof all_files / sizeof all_files[0]; i++) {
    struct gguf_file *f = NULL;
    int rc = open_model(all_files[i], &f);
    if (rc == 0) KT_SKIP("models/%s not found", all_files[i]);
    KT_ASSERT(rc > 0);
    rc = check_file_dequantizes(f, all_files[i], all_types[i]);
    gguf_close(f);
    KT_ASSERT(rc == 0);
  }
}

/* The largest error / bound ratio seen in the current file, logged to show how tight bounds are
 * (0 when every check was exact). The legacy bounds are exact worst cases and the real files
 * reach them (the clamped or largest value of a block), so they log as 0.9998..1.0000. */
static double g_worst;

/* Error bound for one element of a legacy block quantized from x by the reference rules (see
 * check_round_trip for Q8_0/Q4_0): dh and mh are the block's stored half scale and min, xb the
 * block's 32 float32 inputs.
 *   Q4_1/Q5_1: d = (max - min) / L (L = 15, 31), q*d within d/2 of x - min, stored as dh and mh:
 *              |y - x| <= d/2 + L*|dh - d| + |mh - min|.
 *   Q4_0/Q5_0: d = m / -H (m the signed largest-magnitude value, H = 8, 16); q clamps at 2H - 1:
 *              |y - x| <= |d| * max(1/2, x/d - (H - 1)) + H*|dh - d|.
 *   Q8_0:      d = amax / 127: |y - x| <= d/2 + 127*|dh - d|. */
static double legacy_bound(enum dtype t, const float *xb, int j, double dh, double mh) {
  double lo = xb[0], hi = xb[0], amax = 0, max = 0;
  for (int k = 0; k < 32; k++) {
    lo = fmin(lo, xb[k]);
    hi = fmax(hi, xb[k]);
    if (fabs(xb[k]) > amax) amax = fabs(xb[k]), max = xb[k];
  }
  double b;
  if (t == DTYPE_Q4_1 || t == DTYPE_Q5_1) {
    double levels = t == DTYPE_Q4_1 ? 15 : 31, d = (hi - lo) / levels;
    b = 0.5 * d + levels * fabs(dh - d) + fabs(mh - lo);
  } else if (t == DTYPE_Q4_0 || t == DTYPE_Q5_0) {
    double h = t == DTYPE_Q4_0 ? 8 : 16, d = max / -h;
    double r = d != 0 ? xb[j] / d : 0;
    b = fabs(d) * fmax(0.5, r - (h - 1)) + h * fabs(dh - d);
  } else {
    double d = amax / 127;
    b = 0.5 * d + 127 * fabs(dh - d);
  }
  return b * (1 + 1e-5) + 1e-12; /* float evaluation in the quantizer */
}

/* One tensor of a stories260K quantized file against the F32 original of the same name:
 * F32 copies are identical, F16 is the round-to-nearest-even of each value, Q8_0 and Q4_0 are
 * exactly what dtype_quant_row makes (the reference rules, so llama-quantize's bytes), and every
 * legacy type dequantizes to within the bound of its quantizer's rule. */
static int check_vs_f32(const struct gguf_tensor *q, const struct gguf_tensor *r,
                        const char *name) {
  uint64_t n = tensor_elems(q);
  if (r->type != DTYPE_F32 || tensor_elems(r) != n || r->ne[0] != q->ne[0])
    FAILF("%s: the F32 file's tensor does not match in shape", name);
  const float *x = r->data; /* GGUF aligns tensor data to 32 bytes: a float view is fine */
  const uint8_t *qb = q->data;
  int rc = 0;
  switch (q->type) {
  case DTYPE_F32:
    if (memcmp(q->data, r->data, n * 4) != 0) FAILF("%s: F32 copy differs", name);
    return 0;
  case DTYPE_F16:
    for (uint64_t i = 0; i < n; i++)
      if (get16(qb + 2 * i) != dtype_f32_to_f16(x[i]))
        FAILF("%s[%llu]: f16 0x%04x, want 0x%04x for %.9g", name, (unsigned long long)i,
              get16(qb + 2 * i), dtype_f32_to_f16(x[i]), (double)x[i]);
    return 0;
  case DTYPE_Q8_0:
  case DTYPE_Q4_0: {
    uint8_t *mine = malloc(q->nbytes);
    if (!mine) FAILF("out of memory");
    rc = dtype_quant_row(q->type, x, mine, n);
    size_t at = 0;
    while (rc == 0 && at < q->nbytes && mine[at] == qb[at])
      at++;
    free(mine);
    if (rc < 0) FAILF("%s: quant %s", name, kt__strerror(rc));
    if (at != q->nbytes)
      FAILF("%s: %s bytes differ from the reference quantizer's at byte %zu (block %zu)", name,
            dtype_name(q->type), at, at / dtype_get(q->type)->block_bytes);
    break;
  }
  default:
    break;
  }
  float *y = dequant_tensor(q);
  if (!y) return -1;
  const uint32_t bb = dtype_get(q->type)->block_bytes;
  double worst = 0;
  for (uint64_t blk = 0; blk < n / 32 && rc == 0; blk++) {
    const uint8_t *p = qb + blk * bb;
    double dh = f16_value(get16(p));
    double mh = (q->type == DTYPE_Q4_1 || q->type == DTYPE_Q5_1) ? f16_value(get16(p + 2)) : 0;
    for (int j = 0; j < 32; j++) {
      double err = fabs((double)y[32 * blk + j] - x[32 * blk + j]);
      double bound = legacy_bound(q->type, x + 32 * blk, j, dh, mh);
      worst = fmax(worst, err / bound);
      if (err > bound) {
        kt__fail(__FILE__, __LINE__, "%s[%llu]: %s %.9g vs %.9g, error %.3g > bound %.3g", name,
                 (unsigned long long)(32 * blk + (uint64_t)j), dtype_name(q->type),
                 (double)y[32 * blk + j], (double)x[32 * blk + j], err, bound);
        rc = -1;
        break;
      }
    }
  }
  free(y);
  g_worst = fmax(g_worst, worst);
  return rc;
}

static int compare_files(const struct gguf_file *qf, const struct gguf_file *rf,
                         int (*check)(const struct gguf_tensor *, const struct gguf_tensor *,
                                      const char *)) {
  for (uint64_t i = 0; i < qf->n_tensors; i++) {
    char name[96];
    tensor_name(&qf->tensors[i], name, sizeof name);
    const struct gguf_tensor *r = gguf_find_tensor(rf, name);
    if (!r) FAILF("%s: not in the reference file", name);
    if (check(&qf->tensors[i], r, name) < 0) return -1;
  }
  return 0;
}

KT_TEST(real_stories260K_quants_vs_f32) {
  static const char *const files[] = {
      "quant/stories260K-q8_0.gguf", "quant/stories260K-q4_0.gguf", "quant/stories260K-q4_1.gguf",
      "quant/stories260K-q5_0.gguf", "quant/stories260K-q5_1.gguf", "stories260K-f16.gguf",
  };
  struct gguf_file *rf = NULL;
  int rc = open_model("stories260K.gguf", &rf);
  if (rc == 0) KT_SKIP("models/stories260K.gguf not found");
  KT_ASSERT(rc > 0);
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
    struct gguf_file *qf = NULL;
    rc = open_model(files[i], &qf);
    if (rc == 0) {
      gguf_close(rf);
      KT_SKIP("models/%s not found", files[i]);
    }
    if (rc > 0) {
      g_worst = 0;
      rc = compare_files(qf, rf, check_vs_f32);
      if (rc < 0)
        kt_log("in %s", files[i]);
      else if (g_worst > 0)
        kt_log("%s: largest error is %.4f of its bound", files[i], g_worst);
      else
        kt_log("%s: matches exactly", files[i]);
    }
    gguf_close(qf);
    if (rc < 0) break;
  }
  gguf_close(rf);
}

/* The two halves around h, as the interval of reals that round to h: [lo, hi] (end points may
 * belong to a neighbour on a tie, which only widens the check). */
static void f16_interval(uint16_t h, double *lo, double *hi) {
  double v = f16_value(h);
  uint16_t mag = h & 0x7fff;
  double up = mag < 0x7c00 ? fabs(f16_value((uint16_t)(mag + 1))) : INFINITY;
  if (mag == 0x7bff) up = 65536; /* the first value past the top rounds to Inf at 65520 */
  double down = mag > 0 ? fabs(f16_value((uint16_t)(mag - 1))) : -ldexp(1, -24);
  double a = (fabs(v) + down) / 2, b = (fabs(v) + up) / 2;
  if (h & 0x8000) {
    *lo = -b;
    *hi = -a;
  } else {
    *lo = a;
    *hi = b;
  }
}

/* One wide-synth tensor against the F16 file's (both made from the same F32 weights, which are
 * not stored). For each format the bound says how far its value may be from the original x, and
 * the F16 value is itself within half a half-ulp of x:
 *   BF16: both are round-to-nearest of the same x, so the bfloat16 must be the rounding of some
 *         value in the interval that rounds to the half: between bf16(lo) and bf16(hi). Exact.
 *   Q8_0: |y - x| <= d/2 + 127*|dh - d| with d = amax/127 (the reference rule); x's amax is
 *         within a half-ulp of the halves'.
 *   Q4_K/Q5_K/Q6_K: the quantizers search each sub-block's scale and min (a candidate may clip a
 *         range end by about a step) and then round them to 6 bits (8 for Q6_K's scales), so a
 *         value may land up to about a step and a half from its input, a step being the
 *         sub-block's range / (2^bits - 1). Allow 2 steps; a misplaced nibble, high bit or scale
 *         lands a good part of the range away. The RMS error is also held to its expected size
 *         (uniform rounding gives step/sqrt(12)). */
static int check_vs_f16(const struct gguf_tensor *q, const struct gguf_tensor *r,
                        const char *name) {
  uint64_t n = tensor_elems(q);
  if (tensor_elems(r) != n || r->ne[0] != q->ne[0])
    FAILF("%s: the F16 file's tensor does not match in shape", name);
  if (q->type == DTYPE_F32 || r->type == DTYPE_F32) {
    if (q->type != r->type || memcmp(q->data, r->data, n * 4) != 0)
      FAILF("%s: F32 tensors differ", name);
    return 0;
  }
  if (r->type != DTYPE_F16) FAILF("%s: reference is %s", name, dtype_name(r->type));
  const uint8_t *hb = r->data;
  if (q->type == DTYPE_F16) {
    if (memcmp(q->data, r->data, n * 2) != 0) FAILF("%s: F16 tensors differ", name);
    return 0;
  }
  float *y = dequant_tensor(q);
  if (!y) return -1;
  float *x = malloc(sizeof(float) * (size_t)n);
  if (!x || dtype_dequant_row(DTYPE_F16, hb, x, n) < 0) {
    free(x);
    free(y);
    FAILF("%s: reference dequant failed", name);
  }
  int rc = 0;
  if (q->type == DTYPE_BF16) {
    for (uint64_t i = 0; i < n && rc == 0; i++) {
      double lo, hi;
      f16_interval(get16(hb + 2 * i), &lo, &hi);
      float blo = dtype_bf16_to_f32(dtype_f32_to_bf16((float)lo));
      float bhi = dtype_bf16_to_f32(dtype_f32_to_bf16((float)hi));
      if (!(y[i] >= blo && y[i] <= bhi)) {
        kt__fail(__FILE__, __LINE__, "%s[%llu]: bf16 %.9g outside [%.9g, %.9g] (f16 %.9g)", name,
                 (unsigned long long)i, (double)y[i], (double)blo, (double)bhi, (double)x[i]);
        rc = -1;
      }
    }
  } else {
    const int sub = q->type == DTYPE_Q8_0 ? 32 : q->type == DTYPE_Q6_K ? 16 : 32;
    const double levels = q->type == DTYPE_Q4_K ? 15 : q->type == DTYPE_Q5_K ? 31 : 63;
    const double rms_max = q->type == DTYPE_Q4_K   ? 0.10
                           : q->type == DTYPE_Q5_K ? 0.05
                           : q->type == DTYPE_Q6_K ? 0.025
                                                   : 0.008;
    double se = 0, sx = 0, worst = 0;
    for (uint64_t s = 0; s < n && rc == 0; s += (uint64_t)sub) {
      double lo = x[s], hi = x[s], amax = 0;
      for (int j = 0; j < sub; j++) {
        lo = fmin(lo, x[s + j]);
        hi = fmax(hi, x[s + j]);
        amax = fmax(amax, fabs(x[s + j]));
      }
      double bound_q8 = 0;
      if (q->type == DTYPE_Q8_0) {
        double dh = f16_value(get16((const uint8_t *)q->data + s / 32 * 34));
        double d = amax * (1 + ldexp(1, -11)) / 127 + ldexp(1, -25);
        bound_q8 = 0.5 * d + 127 * (fabs(dh - amax / 127) + ldexp(1, -11) * d);
      }
      for (int j = 0; j < sub; j++) {
        double e = fabs((double)y[s + j] - x[s + j]);
        double halfulp = ldexp(1, -11) * fabs(x[s + j]) + ldexp(1, -25); /* x vs its half */
        double bound =
            (q->type == DTYPE_Q8_0 ? bound_q8 : 2 * (hi - lo) / levels) + 2 * halfulp + 1e-12;
        worst = fmax(worst, e / bound);
        se += e * e;
        sx += (double)x[s + j] * x[s + j];
        if (e > bound) {
          kt__fail(__FILE__, __LINE__, "%s[%llu]: %s %.9g vs f16 %.9g, error %.3g > %.3g", name,
                   (unsigned long long)(s + (uint64_t)j), dtype_name(q->type), (double)y[s + j],
                   (double)x[s + j], e, bound);
          rc = -1;
          break;
        }
      }
    }
    g_worst = fmax(g_worst, worst);
    if (rc == 0 && sqrt(se / sx) > rms_max)
      kt__fail(__FILE__, __LINE__, "%s: %s relative RMS error %.4f > %.3f", name,
               dtype_name(q->type), sqrt(se / sx), rms_max),
          rc = -1;
  }
  free(x);
  free(y);
  return rc;
}

KT_TEST(real_wide_synth_vs_f16) {
  static const char *const files[] = {
      "quant/wide-synth-bf16.gguf",   "quant/wide-synth-q8_0.gguf",   "quant/wide-synth-q6_k.gguf",
      "quant/wide-synth-q5_k_m.gguf", "quant/wide-synth-q4_k_m.gguf",
  };
  struct gguf_file *rf = NULL;
  int rc = open_model("quant/wide-synth-f16.gguf", &rf);
  if (rc == 0) KT_SKIP("models/quant/wide-synth-f16.gguf not found");
  KT_ASSERT(rc > 0);
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
    struct gguf_file *qf = NULL;
    rc = open_model(files[i], &qf);
    if (rc == 0) {
      gguf_close(rf);
      KT_SKIP("models/%s not found", files[i]);
    }
    if (rc > 0) {
      g_worst = 0;
      rc = compare_files(qf, rf, check_vs_f16);
      if (rc < 0)
        kt_log("in %s", files[i]);
      else if (g_worst > 0)
        kt_log("%s: largest error is %.4f of its bound", files[i], g_worst);
      else
        kt_log("%s: matches exactly", files[i]);
    }
    gguf_close(qf);
    if (rc < 0) break;
  }
  gguf_close(rf);
}
