#version 450
// Context shift (daemon/kv/kv_shift.c): rewrites cache rows of one layer after tokens were dropped
// from the middle of a sequence. moves[i] = (src slot, dst slot); for i < n_rotate the key row is
// rotated back by p.delta positions on its way (RoPE angles add: the key stored for position p,
// turned by -delta, is the key for p - delta), values are copied; for the rest (the kept rows of
// a partial block) both are copied unchanged. src == dst rewrites in place: the workgroup reads
// the whole row into shared memory before anything writes it.
//
// One workgroup per (move, KV head), grid-stride over moves. The angle is computed as rope.comp
// does (64-bit fixed-point turns per position from the host's table, so no precision is lost at
// large positions), negated in two's complement; no mscale: the stored key already carries it.
// Rows are decoded from the cache's KV type and re-encoded into it (quantized keys are rounded
// once more; f32 is exact up to the rotation's own rounding).
#include "pc_attn.h"

layout(local_size_x_id = 0) in;
layout(constant_id = 1) const uint MAX_HD = 256;

#if defined(KV_F32)
layout(std430, binding = 0) buffer KCache { float k_cache[]; };
layout(std430, binding = 1) buffer VCache { float v_cache[]; };
#else
layout(std430, binding = 0) buffer KCache { uint k_cache[]; };
layout(std430, binding = 1) buffer VCache { uint v_cache[]; };
#endif
layout(std430, binding = 2) readonly buffer Moves { uvec2 moves[]; };
layout(std430, binding = 3) readonly buffer Freq { uvec2 freq[]; }; // (n_rot / 2)
layout(push_constant) uniform Push { pc_kv_shift p; };

#include "kv_row.glsl"
KV_AT(k_at, k_cache)

shared float row[MAX_HD];

const float TWO_PI = 6.28318530717958647692;
const float TWO_POW_M32 = 2.3283064365386963e-10; // 2^-32

void sincos_small(float a, out float s, out float c) {
  float a2 = a * a;
  s = a * (1.0 + a2 * (-1.0 / 6.0 + a2 * (1.0 / 120.0 + a2 * (-1.0 / 5040.0 +
                                                              a2 * (1.0 / 362880.0)))));
  c = 1.0 + a2 * (-0.5 + a2 * (1.0 / 24.0 + a2 * (-1.0 / 720.0 + a2 * (1.0 / 40320.0 +
                                                                        a2 * (-1.0 / 3628800.0)))));
}

uint row_base(uint slot, uint h) {
  uint block = slot / p.block_size, off = slot % p.block_size;
  return ((block * p.n_head_kv + h) * p.block_size + off) * p.row_words;
}

#if defined(KV_Q8_0) || defined(KV_Q4_0)
#if defined(KV_Q8_0)
const uint PER_WORD = 4u, BITS = 8u;
#else
const uint PER_WORD = 8u, BITS = 4u;
#endif
// kv_write.comp's quantization of group g, from the shared row (kv_format.c's definition).
float quant_group(uint rb, uint sw, uint g) {
  uint s0 = g * p.group;
  float amax = 0.0, mx = 0.0;
  for (uint i = 0u; i < p.group; i++) {
    float v = row[s0 + i];
    if (abs(v) > amax) {
      amax = abs(v);
      mx = v;
    }
  }
#if defined(KV_Q8_0)
  float d = amax / 127.0;
#else
  float d = mx / -8.0;
#endif
  float id = d != 0.0 ? 1.0 / d : 0.0;
  for (uint w = 0u; w < p.group / PER_WORD; w++) {
    uint word = 0u;
    for (uint i = 0u; i < PER_WORD; i++) {
      float v = row[s0 + w * PER_WORD + i];
#if defined(KV_Q8_0)
      uint q = uint(int(roundEven(v * id))) & 0xffu;
#else
      uint q = uint(clamp(int(v * id + 8.5), 0, 15));
#endif
      word |= q << (BITS * i);
    }
    k_cache[rb + sw + g * p.group / PER_WORD + w] = word;
  }
  return d;
}
#endif

void main() {
  uint lid = gl_LocalInvocationID.x, wg = gl_WorkGroupSize.x;
  uint h = gl_WorkGroupID.y;
  for (uint m = gl_WorkGroupID.x; m < p.n_moves; m += gl_NumWorkGroups.x) {
    uvec2 mv = moves[m];
    uint src = row_base(mv.x, h), dst = row_base(mv.y, h);
    bool rotate = m < p.n_rotate;
    if (src != dst) {
      for (uint w = lid; w < p.row_words; w += wg) {
        v_cache[dst + w] = v_cache[src + w];
        if (!rotate) k_cache[dst + w] = k_cache[src + w];
      }
    }
    if (rotate) {
      for (uint d = lid; d < p.head_dim; d += wg)
        row[d] = k_at(src, d);
      barrier();
      uint half_rot = p.n_rot / 2u;
      for (uint i = lid; i < half_rot; i += wg) {
        uvec2 f = freq[i];
        uint hi, lo;
        umulExtended(p.delta, f.x, hi, lo);
        hi += p.delta * f.y;
        // -(delta * f) mod 2^64: the turns of a rotation back by delta positions.
        lo = ~lo + 1u;
        hi = ~hi + (lo == 0u ? 1u : 0u);
        uint q = (hi + 0x20000000u) >> 30;
        int r = int(hi - (q << 30));
        float a = (float(r) + float(lo) * TWO_POW_M32) * TWO_POW_M32 * TWO_PI;
        float sa, ca;
        sincos_small(a, sa, ca);
        q &= 3u;
        float sn = q == 0u ? sa : q == 1u ? ca : q == 2u ? -sa : -ca;
        float cs = q == 0u ? ca : q == 1u ? -sa : q == 2u ? -ca : sa;
        uint i0 = p.mode == 1u ? i : 2u * i;
        uint i1 = p.mode == 1u ? i + half_rot : 2u * i + 1u;
        float x0 = row[i0], x1 = row[i1];
        row[i0] = x0 * cs - x1 * sn;
        row[i1] = x0 * sn + x1 * cs;
      }
      barrier();
#if defined(KV_F32)
      for (uint d = lid; d < p.head_dim; d += wg)
        k_cache[dst + d] = row[d];
#elif defined(KV_F16)
      for (uint w = lid; w < p.head_dim / 2u; w += wg)
        k_cache[dst + w] = packHalf2x16(vec2(row[2u * w], row[2u * w + 1u]));
#else
      uint n_groups = p.head_dim / p.group, sw = (n_groups + 1u) / 2u;
      for (uint j = lid; j < sw; j += wg) {
        float d0 = quant_group(dst, sw, 2u * j);
        float d1 = 2u * j + 1u < n_groups ? quant_group(dst, sw, 2u * j + 1u) : 0.0;
        k_cache[dst + j] = packHalf2x16(vec2(d0, d1));
      }
#endif
      barrier(); // the next move's reads of row[] wait for this one's writes
    }
  }
}
