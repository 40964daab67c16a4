#version 450
// y[t] (+)= W x[t] for a few tokens (decode), W in any GGUF weight type, dequantized on the fly:
// the matvec_<type> variants. One workgroup per weight row; rows are spread over a 2D grid so row
// counts beyond maxComputeWorkGroupCount[0] still fit.
//
// Neighbouring invocations take neighbouring groups of 8 values (dequant.glsl), so the quantized
// row is read once, coalesced; each dequantized group is multiplied into all n_tokens
// (<= NT <= WMAT_MAX_TOKENS) activation rows before the next one is read, so a decode batch costs
// one pass over the weights. The host keeps a pipeline per NT in 1, 2, 4, 8 (wkern.c): the token
// loops then have constant trip counts. Partial sums are reduced per token: with subgroup
// arithmetic (USE_SUBGROUP) one subgroupAdd and a shared-memory pass over the subgroups, else a
// portable shared-memory tree (WG must then be a power of two).
#include "pc_matmul.h"
#ifdef USE_SUBGROUP
#extension GL_KHR_shader_subgroup_arithmetic : require
#endif

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;
layout(constant_id = 1) const uint NT = 1; // tokens the pipeline is specialised for (1..8)

layout(std430, binding = 0) readonly buffer Wq { uint wq[]; };
layout(std430, binding = 1) readonly buffer X { float x[]; };
layout(std430, binding = 2) buffer Y { float y[]; };
layout(push_constant) uniform Push { pc_wmat p; };

#include "dequant.glsl"

shared float red[NT * WG];

// Four activations of token row o from column e on; plain types may end mid-group, and the
// columns past the row are neither read nor counted.
vec4 load_x(uint o, uint e) {
#if DQ_PLAIN
  if (e + 4u > p.cols) {
    vec4 v = vec4(0.0);
    for (uint k = 0u; k < 4u; k++)
      if (e + k < p.cols) v[k] = x[o + e + k];
    return v;
  }
#endif
  return vec4(x[o + e], x[o + e + 1u], x[o + e + 2u], x[o + e + 3u]);
}

void main() {
  uint row = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
  if (row >= p.rows) return; // uniform per workgroup: no barrier is skipped by half a group
  uint tid = gl_LocalInvocationID.x;
  uint nt = min(p.n_tokens, NT);
  uint base = p.w_off + row * dq_row_bytes(p.cols);
  uint ng = dq_row_groups(p.cols);

  // Token rows past n_tokens repeat the last one: the loops below then have the constant trip
  // count NT and unroll, with no per-token branch (which a CPU device would run masked).
  uint xo[NT];
  for (uint t = 0u; t < NT; t++) xo[t] = p.x_off + min(t, nt - 1u) * p.x_stride;
  float acc[NT];
  for (uint t = 0u; t < NT; t++) acc[t] = 0.0;
  for (uint G = tid; G < ng; G += WG) {
    vec4 a, b;
    uint e0, e1;
    dq_load(base, G, p.cols, a, b, e0, e1);
    for (uint t = 0u; t < NT; t++) acc[t] += dot(a, load_x(xo[t], e0)) + dot(b, load_x(xo[t], e1));
  }

#ifdef USE_SUBGROUP
  for (uint t = 0u; t < NT; t++) {
    float s = subgroupAdd(acc[t]);
    if (gl_SubgroupInvocationID == 0u) red[t * gl_NumSubgroups + gl_SubgroupID] = s;
  }
  barrier();
  if (tid < nt) {
    float s = 0.0;
    for (uint i = 0u; i < gl_NumSubgroups; i++) s += red[tid * gl_NumSubgroups + i];
#else
  for (uint t = 0u; t < NT; t++) red[t * WG + tid] = acc[t];
  barrier();
  for (uint s = WG / 2u; s > 0u; s >>= 1) {
    if (tid < s)
      for (uint t = 0u; t < NT; t++) red[t * WG + tid] += red[t * WG + tid + s];
    barrier();
  }
  if (tid < nt) {
    float s = red[tid * WG];
#endif
    uint o = p.y_off + tid * p.y_stride + row;
    y[o] = (p.flags & WMAT_ACCUMULATE) != 0u ? y[o] + s : s;
  }
}
