// In-shader dequantization of GGUF weight rows, one section per type, selected by exactly one
// DQ_<TYPE> define (DQ_F32, DQ_F16, DQ_BF16, DQ_Q8_0, DQ_Q4_0, DQ_Q4_1, DQ_Q5_0, DQ_Q5_1, DQ_Q4_K,
// DQ_Q5_K, DQ_Q6_K). The includer declares the weights as 32-bit words first:
//   layout(std430, binding = 0) readonly buffer Wq { uint wq[]; };
//
// Why words: blocks are packed with no padding (Q4_0 is 18 bytes, Q6_K 210), so fields sit at any
// byte offset, and 8/16-bit storage is an optional device feature. Every field is assembled from
// the one or two words it spans; only words holding wanted bytes are read, so a binding that
// reaches the next multiple of 4 past the last row is never read beyond.
//
// The unit of work is a group of 8 values that share their scales: two runs of 4 consecutive
// values (vec4 a at element e0, vec4 b at e1 of the row). Runs follow the block's bit layout so a
// group reads whole 32-bit words of quants (Q4_0's nibbles pair value j with value j+16, so its
// runs are 16 apart). The exact layouts are those of daemon/model/dtype.c, the CPU reference;
// each value is computed with the same float operations, which are exact products plus at most one
// rounding (the offset of Q4_1/Q5_1/Q4_K/Q5_K), so results match dtype_dequant_row() bit for bit.
//
// Generic interface the kernels use:
//   DQ_PLAIN      1 for F32/F16/BF16 (any row length; the last group may be partial), else 0
//   DQ_SPAN       the groups of each aligned window of DQ_SPAN values hold exactly that window's
//                 values, in group order: a tile of k values (a multiple of DQ_SPAN, starting at a
//                 multiple) is groups [k0 / 8, (k0 + k) / 8) of the row
//   dq_row_bytes(cols), dq_row_groups(cols)
//   dq_pos(G, e0, e1)                  where group G of a row lives
//   dq_load(row, G, cols, a, b, e0, e1) dequantize group G of the row starting at byte `row`
//                 (plain types: values at or past cols come back as 0 and are never read)

// ---- byte access over 32-bit words ---------------------------------------------------------

// The word after word i, or the last word when i is the last: its bits are shifted out then (the
// field ends in word i), and the clamp keeps the read inside the binding without a branch, which
// a CPU device would run masked.
uint dq_next(uint i) {
  return wq[min(i + 1u, uint(wq.length()) - 1u)];
}

// (lo >> s) | (hi << (32 - s)) for s in 0..24 step 8; the shift by 32 that s == 0 would need is
// undefined, so hi moves in two steps.
uint dq_funnel(uint lo, uint hi, uint s) {
  return (lo >> s) | ((hi << 1) << (31u - s));
}

uint dq_u32(uint b) {
  uint i = b >> 2;
  return dq_funnel(wq[i], dq_next(i), (b & 3u) << 3);
}

uint dq_u16(uint b) {
  return dq_u32(b) & 0xffffu;
}

// 8 bytes from 2 or 3 words.
uvec2 dq_u32x2(uint b) {
  uint i = b >> 2, s = (b & 3u) << 3;
  uint w0 = wq[i], w1 = wq[i + 1u], w2 = dq_next(i + 1u);
  return uvec2(dq_funnel(w0, w1, s), dq_funnel(w1, w2, s));
}

// 16 bytes: whole words when b is word-aligned (an F16/BF16 row of even length at an aligned
// offset: then for every group alike, so the branch does not diverge), else assembled from 5.
void dq_u32x4(uint b, out uvec2 lo, out uvec2 hi) {
  uint i = b >> 2;
  if ((b & 3u) == 0u) {
    lo = uvec2(wq[i], wq[i + 1u]);
    hi = uvec2(wq[i + 2u], wq[i + 3u]);
  } else {
    lo = dq_u32x2(b);
    hi = dq_u32x2(b + 8u);
  }
}

float dq_half(uint b) {
  return unpackHalf2x16(dq_u16(b)).x;
}

// The four bytes of v as unsigned / signed values.
vec4 dq_u8x4(uint v) {
  return vec4(uvec4(v, v >> 8, v >> 16, v >> 24) & 0xffu);
}

vec4 dq_i8x4(uint v) {
  int i = int(v);
  return vec4(bitfieldExtract(i, 0, 8), bitfieldExtract(i, 8, 8), bitfieldExtract(i, 16, 8),
              bitfieldExtract(i, 24, 8));
}

// Bits 0..3 of h moved to bit 0 of bytes 0..3 (the fifth bits of Q5_0/Q5_1).
uint dq_spread4(uint h) {
  return (h & 1u) | ((h & 2u) << 7) | ((h & 4u) << 14) | ((h & 8u) << 21);
}

// ---- plain types: "blocks" of 8 values, one group each --------------------------------------

#if defined(DQ_F32) || defined(DQ_F16) || defined(DQ_BF16)
#define DQ_PLAIN 1
#define DQ_SPAN 8u

#if defined(DQ_F32)
// F32 rows start at a multiple of 4 bytes (the host checks the offset), so values are words.
const uint DQ_ES = 4u; // bytes per value
float dq_elem(uint b) {
  return uintBitsToFloat(wq[b >> 2]);
}
void dq_group8(uint b, out vec4 a, out vec4 c) {
  uint i = b >> 2;
  a = uintBitsToFloat(uvec4(wq[i], wq[i + 1u], wq[i + 2u], wq[i + 3u]));
  c = uintBitsToFloat(uvec4(wq[i + 4u], wq[i + 5u], wq[i + 6u], wq[i + 7u]));
}
#elif defined(DQ_F16)
const uint DQ_ES = 2u;
float dq_elem(uint b) {
  return dq_half(b);
}
void dq_group8(uint b, out vec4 a, out vec4 c) {
  uvec2 w0, w1;
  dq_u32x4(b, w0, w1);
  a = vec4(unpackHalf2x16(w0.x), unpackHalf2x16(w0.y));
  c = vec4(unpackHalf2x16(w1.x), unpackHalf2x16(w1.y));
}
#else // DQ_BF16: the top half of a float32
const uint DQ_ES = 2u;
float dq_elem(uint b) {
  return uintBitsToFloat(dq_u16(b) << 16);
}
vec4 dq_bf16x4(uvec2 w) {
  return uintBitsToFloat(uvec4(w.x << 16, w.x & 0xffff0000u, w.y << 16, w.y & 0xffff0000u));
}
void dq_group8(uint b, out vec4 a, out vec4 c) {
  uvec2 w0, w1;
  dq_u32x4(b, w0, w1);
  a = dq_bf16x4(w0);
  c = dq_bf16x4(w1);
}
#endif

uint dq_row_bytes(uint cols) {
  return cols * DQ_ES;
}
uint dq_row_groups(uint cols) {
  return (cols + 7u) >> 3;
}
void dq_pos(uint G, out uint e0, out uint e1) {
  e0 = G << 3;
  e1 = e0 + 4u;
}
void dq_load(uint row, uint G, uint cols, out vec4 a, out vec4 b, out uint e0, out uint e1) {
  dq_pos(G, e0, e1);
  uint p = row + e0 * DQ_ES;
  if (e0 + 8u <= cols) {
    dq_group8(p, a, b);
    return;
  }
  // The partial last group: read only the values the row has.
  float v[8];
  for (uint k = 0u; k < 8u; k++) v[k] = e0 + k < cols ? dq_elem(p + k * DQ_ES) : 0.0;
  a = vec4(v[0], v[1], v[2], v[3]);
  b = vec4(v[4], v[5], v[6], v[7]);
}

#else
#define DQ_PLAIN 0

// ---- block types: dq_group_<type>(blk, g, a, b) dequantizes group g of the block at byte blk,
// ---- dq_runs_<type>(g) says which values of the block it holds.

#if defined(DQ_Q8_0)
// Q8_0, 32 values in 34 bytes: f16 d | i8 qs[32]; y = q * d. Group g: values 8g .. 8g+7.
const uint DQ_BE = 32u, DQ_BB = 34u;
#define DQ_SPAN 8u
void dq_group_q8_0(uint blk, uint g, out vec4 a, out vec4 b) {
  float d = dq_half(blk);
  uvec2 q = dq_u32x2(blk + 2u + 8u * g);
  a = dq_i8x4(q.x) * d;
  b = dq_i8x4(q.y) * d;
}
uvec2 dq_runs_q8_0(uint g) {
  return uvec2(8u * g, 8u * g + 4u);
}
#define dq_group dq_group_q8_0
#define dq_runs dq_runs_q8_0

#elif defined(DQ_Q4_0)
// Q4_0, 32 values in 18 bytes: f16 d | u8 qs[16]; value j is the low nibble of qs[j], value
// j+16 its high nibble; y = (q - 8) * d. Group g: qs[4g .. 4g+3], values 4g.. and 16+4g...
const uint DQ_BE = 32u, DQ_BB = 18u;
#define DQ_SPAN 32u
void dq_group_q4_0(uint blk, uint g, out vec4 a, out vec4 b) {
  float d = dq_half(blk);
  uint q = dq_u32(blk + 2u + 4u * g);
  a = (dq_u8x4(q & 0x0f0f0f0fu) - 8.0) * d;
  b = (dq_u8x4((q >> 4) & 0x0f0f0f0fu) - 8.0) * d;
}
uvec2 dq_runs_q4_0(uint g) {
  return uvec2(4u * g, 16u + 4u * g);
}
#define dq_group dq_group_q4_0
#define dq_runs dq_runs_q4_0

#elif defined(DQ_Q4_1)
// Q4_1, 32 values in 20 bytes: f16 d | f16 m | u8 qs[16]; nibbles as Q4_0; y = q * d + m.
const uint DQ_BE = 32u, DQ_BB = 20u;
#define DQ_SPAN 32u
void dq_group_q4_1(uint blk, uint g, out vec4 a, out vec4 b) {
  vec2 dm = unpackHalf2x16(dq_u32(blk));
  uint q = dq_u32(blk + 4u + 4u * g);
  a = dq_u8x4(q & 0x0f0f0f0fu) * dm.x + dm.y;
  b = dq_u8x4((q >> 4) & 0x0f0f0f0fu) * dm.x + dm.y;
}
uvec2 dq_runs_q4_1(uint g) {
  return uvec2(4u * g, 16u + 4u * g);
}
#define dq_group dq_group_q4_1
#define dq_runs dq_runs_q4_1

#elif defined(DQ_Q5_0)
// Q5_0, 32 values in 22 bytes: f16 d | u32 qh | u8 qs[16]; nibbles as Q4_0, the fifth bit of
// value j is bit j of qh; y = (q - 16) * d.
const uint DQ_BE = 32u, DQ_BB = 22u;
#define DQ_SPAN 32u
void dq_group_q5_0(uint blk, uint g, out vec4 a, out vec4 b) {
  float d = dq_half(blk);
  uint qh = dq_u32(blk + 2u);
  uint q = dq_u32(blk + 6u + 4u * g);
  uint h0 = dq_spread4((qh >> (4u * g)) & 15u) << 4;
  uint h1 = dq_spread4((qh >> (16u + 4u * g)) & 15u) << 4;
  a = (dq_u8x4((q & 0x0f0f0f0fu) | h0) - 16.0) * d;
  b = (dq_u8x4(((q >> 4) & 0x0f0f0f0fu) | h1) - 16.0) * d;
}
uvec2 dq_runs_q5_0(uint g) {
  return uvec2(4u * g, 16u + 4u * g);
}
#define dq_group dq_group_q5_0
#define dq_runs dq_runs_q5_0

#elif defined(DQ_Q5_1)
// Q5_1, 32 values in 24 bytes: f16 d | f16 m | u32 qh | u8 qs[16]; bits as Q5_0; y = q * d + m.
const uint DQ_BE = 32u, DQ_BB = 24u;
#define DQ_SPAN 32u
void dq_group_q5_1(uint blk, uint g, out vec4 a, out vec4 b) {
  vec2 dm = unpackHalf2x16(dq_u32(blk));
  uint qh = dq_u32(blk + 4u);
  uint q = dq_u32(blk + 8u + 4u * g);
  uint h0 = dq_spread4((qh >> (4u * g)) & 15u) << 4;
  uint h1 = dq_spread4((qh >> (16u + 4u * g)) & 15u) << 4;
  a = dq_u8x4((q & 0x0f0f0f0fu) | h0) * dm.x + dm.y;
  b = dq_u8x4(((q >> 4) & 0x0f0f0f0fu) | h1) * dm.x + dm.y;
}
uvec2 dq_runs_q5_1(uint g) {
  return uvec2(4u * g, 16u + 4u * g);
}
#define dq_group dq_group_q5_1
#define dq_runs dq_runs_q5_1

#elif defined(DQ_Q4_K) || defined(DQ_Q5_K)
// The 12 scale bytes at sb hold eight 6-bit scales and mins. Sub-blocks 2c and 2c+1 (c < 4):
// j < 4 uses the low 6 bits of bytes j (scale) and j+4 (min); j >= 4 takes its low 4 bits from
// the nibbles of byte j+4 and its top 2 bits from the spare top bits of bytes j-4 and j.
void dq_kscales(uint sb, uint c, out vec2 sc, out vec2 mn) {
  uint s0 = dq_u32(sb), s1 = dq_u32(sb + 4u);
  uvec2 scv, mnv;
  if (c < 2u) {
    uint k = 16u * c;
    scv = uvec2(s0 >> k, s0 >> (k + 8u)) & 63u;
    mnv = uvec2(s1 >> k, s1 >> (k + 8u)) & 63u;
  } else {
    uint s2 = dq_u32(sb + 8u);
    uint k = 16u * (c - 2u);
    uvec2 lo = uvec2(s2 >> k, s2 >> (k + 8u));
    uvec2 hs = (uvec2(s0 >> k, s0 >> (k + 8u)) >> 6) & 3u;
    uvec2 hm = (uvec2(s1 >> k, s1 >> (k + 8u)) >> 6) & 3u;
    scv = (lo & 15u) | (hs << 4);
    mnv = ((lo >> 4) & 15u) | (hm << 4);
  }
  sc = vec2(scv);
  mn = vec2(mnv);
}
const uint DQ_BE = 256u;
#define DQ_SPAN 64u
// Both formats go in four chunks of 64 values: chunk c reads 32 quant bytes whose low nibbles
// are sub-block 2c and high nibbles sub-block 2c+1. Group g = 8c + i: bytes 4i .. 4i+3 of the
// chunk, values 64c + 4i.. and 64c + 32 + 4i...
uvec2 dq_runs_qk(uint g) {
  uint c = g >> 3, i = g & 7u;
  return uvec2(64u * c + 4u * i, 64u * c + 32u + 4u * i);
}

#if defined(DQ_Q4_K)
// Q4_K, 256 values in 144 bytes: f16 d | f16 dmin | u8 scales[12] | u8 qs[128];
// y = (d * sc) * q - dmin * m.
const uint DQ_BB = 144u;
void dq_group_q4_k(uint blk, uint g, out vec4 a, out vec4 b) {
  uint c = g >> 3, i = g & 7u;
  vec2 dm = unpackHalf2x16(dq_u32(blk));
  vec2 sc, mn;
  dq_kscales(blk + 4u, c, sc, mn);
  uint q = dq_u32(blk + 16u + 32u * c + 4u * i);
  a = (dm.x * sc.x) * dq_u8x4(q & 0x0f0f0f0fu) - dm.y * mn.x;
  b = (dm.x * sc.y) * dq_u8x4((q >> 4) & 0x0f0f0f0fu) - dm.y * mn.y;
}
#define dq_group dq_group_q4_k
#else
// Q5_K, 256 values in 176 bytes: f16 d | f16 dmin | u8 scales[12] | u8 qh[32] | u8 qs[128].
// As Q4_K plus a fifth bit: value l of chunk c's low half is bit 2c of qh[l], of its high half
// bit 2c+1.
const uint DQ_BB = 176u;
void dq_group_q5_k(uint blk, uint g, out vec4 a, out vec4 b) {
  uint c = g >> 3, i = g & 7u;
  vec2 dm = unpackHalf2x16(dq_u32(blk));
  vec2 sc, mn;
  dq_kscales(blk + 4u, c, sc, mn);
  uint qh = dq_u32(blk + 16u + 4u * i);
  uint q = dq_u32(blk + 48u + 32u * c + 4u * i);
  uint h0 = ((qh >> (2u * c)) & 0x01010101u) << 4;
  uint h1 = ((qh >> (2u * c + 1u)) & 0x01010101u) << 4;
  a = (dm.x * sc.x) * dq_u8x4((q & 0x0f0f0f0fu) | h0) - dm.y * mn.x;
  b = (dm.x * sc.y) * dq_u8x4(((q >> 4) & 0x0f0f0f0fu) | h1) - dm.y * mn.y;
}
#define dq_group dq_group_q5_k
#endif
#define dq_runs dq_runs_qk

#elif defined(DQ_Q6_K)
// Q6_K, 256 values in 210 bytes: u8 ql[128] | u8 qh[64] | i8 scales[16] | f16 d (last).
// Two halves of 128; half n uses ql[64n..], qh[32n..], scales[8n..]. For l < 32, qh[l] holds the
// top 2 bits of values l (bits 0-1, low nibble of ql[l]), l+32 (2-3, low nibble of ql[l+32]),
// l+64 (4-5, high nibble of ql[l]) and l+96 (6-7, high nibble of ql[l+32]); q = 6 bits - 32,
// value v of a half uses scale v / 16; y = (d * scale) * q.
// Group g = 16n + 8h + j (h: low or high nibbles, l = 4j): values 128n + 64h + 4j.. and 32 later.
const uint DQ_BE = 256u, DQ_BB = 210u;
#define DQ_SPAN 64u
void dq_group_q6_k(uint blk, uint g, out vec4 a, out vec4 b) {
  uint n = g >> 4, h = (g >> 3) & 1u, j = g & 7u;
  float d = dq_half(blk + 208u);
  uint ql0 = dq_u32(blk + 64u * n + 4u * j);
  uint ql1 = dq_u32(blk + 64u * n + 32u + 4u * j);
  uint qh = dq_u32(blk + 128u + 32u * n + 4u * j);
  int scw = int(dq_u32(blk + 192u + 8u * n + 4u * h));
  uint sh = 4u * h;
  uint q0 = ((ql0 >> sh) & 0x0f0f0f0fu) | (((qh >> sh) & 0x03030303u) << 4);
  uint q1 = ((ql1 >> sh) & 0x0f0f0f0fu) | (((qh >> (sh + 2u)) & 0x03030303u) << 4);
  int s = int(8u * (j >> 2));
  a = (d * float(bitfieldExtract(scw, s, 8))) * (dq_u8x4(q0) - 32.0);
  b = (d * float(bitfieldExtract(scw, s + 16, 8))) * (dq_u8x4(q1) - 32.0);
}
uvec2 dq_runs_q6_k(uint g) {
  uint e = 128u * (g >> 4) + 64u * ((g >> 3) & 1u) + 4u * (g & 7u);
  return uvec2(e, e + 32u);
}
#define dq_group dq_group_q6_k
#define dq_runs dq_runs_q6_k

#else
#error "dequant.glsl: define one DQ_<TYPE>"
#endif

const uint DQ_GPB = DQ_BE / 8u; // groups per block

uint dq_row_bytes(uint cols) {
  return (cols / DQ_BE) * DQ_BB;
}
uint dq_row_groups(uint cols) {
  return (cols / DQ_BE) * DQ_GPB;
}
void dq_pos(uint G, out uint e0, out uint e1) {
  uint blk = G / DQ_GPB;
  uvec2 r = dq_runs(G % DQ_GPB);
  e0 = blk * DQ_BE + r.x;
  e1 = blk * DQ_BE + r.y;
}
void dq_load(uint row, uint G, uint cols, out vec4 a, out vec4 b, out uint e0, out uint e1) {
  uint blk = G / DQ_GPB, g = G % DQ_GPB;
  dq_group(row + blk * DQ_BB, g, a, b);
  uvec2 r = dq_runs(g);
  e0 = blk * DQ_BE + r.x;
  e1 = blk * DQ_BE + r.y;
}
#endif
