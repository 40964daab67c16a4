#version 450
// Scatter each new token's K and V (n_tokens, n_head_kv, head_dim) into its cache slot through
// the per-token slot index the host computed from the block table. One invocation per value,
// grid-stride, so any batch fits in the workgroup-count limit.
#include "pc_attn.h"

layout(local_size_x_id = 0) in;

layout(std430, binding = 0) readonly buffer KNew { float k_new[]; };
layout(std430, binding = 1) readonly buffer VNew { float v_new[]; };
layout(std430, binding = 2) writeonly buffer KCache { float k_cache[]; };
layout(std430, binding = 3) writeonly buffer VCache { float v_cache[]; };
layout(std430, binding = 4) readonly buffer Slots { uint slots[]; };
layout(push_constant) uniform Push { pc_kv_write p; };

void main() {
  uint kv_dim = p.n_head_kv * p.head_dim;
  uint total = p.n_tokens * kv_dim;
  uint stride = gl_NumWorkGroups.x * gl_WorkGroupSize.x;
  for (uint i = gl_GlobalInvocationID.x; i < total; i += stride) {
    uint t = i / kv_dim, r = i % kv_dim;
    uint h = r / p.head_dim, d = r % p.head_dim;
    uint slot = slots[t];
    uint block = slot / p.block_size, off = slot % p.block_size;
    uint dst = ((block * p.n_head_kv + h) * p.block_size + off) * p.head_dim + d;
    uint src = t * p.src_stride + r;
    k_cache[dst] = k_new[src];
    v_cache[dst] = v_new[src];
  }
}
