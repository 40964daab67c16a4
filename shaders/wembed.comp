#version 450
// Token embedding lookup, the embed_<type> variants: out[t][:] = dequantized row ids[t] of a
// (n_vocab, dim) table in any GGUF weight type. One workgroup per token (2D grid), its invocations
// taking neighbouring groups of 8 values of the row. Only ids in [row0, row0 + n_rows), the rows
// this binding holds, are written: a table beyond maxStorageBufferRange takes one dispatch per
// row range, and an out-of-range id never reads outside the binding.
#include "pc_matmul.h"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;

layout(std430, binding = 0) readonly buffer Wq { uint wq[]; };
layout(std430, binding = 1) readonly buffer Ids { uint ids[]; };
layout(std430, binding = 2) writeonly buffer Out { float outv[]; };
layout(push_constant) uniform Push { pc_embed p; };

#include "dequant.glsl"

void main() {
  uint t = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
  if (t >= p.n_tokens) return;
  uint r = ids[p.ids_off + t] - p.row0; // wraps past n_rows for ids below row0
  if (r >= p.n_rows) return;
  uint base = p.w_off + r * dq_row_bytes(p.dim);
  uint ng = dq_row_groups(p.dim);
  uint o = p.out_off + t * p.out_stride;
  for (uint G = gl_LocalInvocationID.x; G < ng; G += WG) {
    vec4 a, b;
    uint e0, e1;
    dq_load(base, G, p.dim, a, b, e0, e1);
    for (uint k = 0u; k < 4u; k++) {
#if DQ_PLAIN
      if (e0 + k < p.dim) outv[o + e0 + k] = a[k];
      if (e1 + k < p.dim) outv[o + e1 + k] = b[k];
#else
      outv[o + e0 + k] = a[k];
      outv[o + e1 + k] = b[k];
#endif
    }
  }
}
