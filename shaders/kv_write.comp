#version 450
// Stores each new token's K and V (n_tokens, n_head_kv, head_dim) f32 into its cache slot, in the
// cache's KV type (daemon/kv/kv_format.h; one variant per type), through the per-token slot index
// the host computed from the block table. Grid-stride, so any batch fits the workgroup-count
// limit. One invocation per value (f32), per pair (f16), or per pair of quantization groups
// (q8_0, q4_0: the two groups' scales share a word, which one invocation writes whole).
#include "pc_attn.h"

layout(local_size_x_id = 0) in;

layout(std430, binding = 0) readonly buffer KNew { float k_new[]; };
layout(std430, binding = 1) readonly buffer VNew { float v_new[]; };
#if defined(KV_F32)
layout(std430, binding = 2) writeonly buffer KCache { float k_cache[]; };
layout(std430, binding = 3) writeonly buffer VCache { float v_cache[]; };
#else
layout(std430, binding = 2) writeonly buffer KCache { uint k_cache[]; };
layout(std430, binding = 3) writeonly buffer VCache { uint v_cache[]; };
#endif
layout(std430, binding = 4) readonly buffer Slots { uint slots[]; };
layout(push_constant) uniform Push { pc_kv_write p; };

// The first word of token t's row for KV head h.
uint row_base(uint t, uint h) {
  uint slot = slots[t];
  uint block = slot / p.block_size, off = slot % p.block_size;
  return ((block * p.n_head_kv + h) * p.block_size + off) * p.row_words;
}

#if defined(KV_Q8_0) || defined(KV_Q4_0)
#if defined(KV_Q8_0)
const uint PER_WORD = 4u, BITS = 8u;
#else
const uint PER_WORD = 8u, BITS = 4u;
#endif

// Quantizes group g of the row starting at src into the quant words after the sw scale words of
// row rb; returns the group's scale. q8_0: scale max|x| / 127, round to nearest even. q4_0: scale
// (the value of largest magnitude) / -8, nibble min(15, trunc(x / scale + 8.5)): ggml's formats.
float quant_group(bool is_k, uint src, uint rb, uint sw, uint g) {
  uint s0 = src + g * p.group;
  float amax = 0.0, mx = 0.0;
  for (uint i = 0u; i < p.group; i++) {
    float v = is_k ? k_new[s0 + i] : v_new[s0 + i];
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
      float v = is_k ? k_new[s0 + w * PER_WORD + i] : v_new[s0 + w * PER_WORD + i];
#if defined(KV_Q8_0)
      uint q = uint(int(roundEven(v * id))) & 0xffu;
#else
      uint q = uint(clamp(int(v * id + 8.5), 0, 15));
#endif
      word |= q << (BITS * i);
    }
    uint dst = rb + sw + g * p.group / PER_WORD + w;
    if (is_k) {
      k_cache[dst] = word;
    } else {
      v_cache[dst] = word;
    }
  }
  return d;
}
#endif

void main() {
  uint stride = gl_NumWorkGroups.x * gl_WorkGroupSize.x;
#if defined(KV_F32)
  uint per_row = p.head_dim;
#elif defined(KV_F16)
  uint per_row = p.head_dim / 2u;
#else
  uint n_groups = p.head_dim / p.group, sw = (n_groups + 1u) / 2u;
  uint per_row = sw;
#endif
  uint total = p.n_tokens * p.n_head_kv * per_row;
  for (uint i = gl_GlobalInvocationID.x; i < total; i += stride) {
    uint th = i / per_row, j = i % per_row;
    uint t = th / p.n_head_kv, h = th % p.n_head_kv;
    uint rb = row_base(t, h), src = t * p.src_stride + h * p.head_dim;
#if defined(KV_F32)
    k_cache[rb + j] = k_new[src + j];
    v_cache[rb + j] = v_new[src + j];
#elif defined(KV_F16)
    k_cache[rb + j] = packHalf2x16(vec2(k_new[src + 2u * j], k_new[src + 2u * j + 1u]));
    v_cache[rb + j] = packHalf2x16(vec2(v_new[src + 2u * j], v_new[src + 2u * j + 1u]));
#else
    // Scale word j holds groups 2j (low half) and 2j + 1 (high half, when there is one).
    for (uint kv = 0u; kv < 2u; kv++) {
      bool is_k = kv == 0u;
      float d0 = quant_group(is_k, src, rb, sw, 2u * j);
      float d1 = 2u * j + 1u < n_groups ? quant_group(is_k, src, rb, sw, 2u * j + 1u) : 0.0;
      uint word = packHalf2x16(vec2(d0, d1));
      if (is_k) {
        k_cache[rb + j] = word;
      } else {
        v_cache[rb + j] = word;
      }
    }
#endif
  }
}
