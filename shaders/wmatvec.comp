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
layout(constant_id = 2) const uint NR = 1; // rows per workgroup (NR * NT <= WG)

layout(std430, binding = 0) readonly buffer Wq { uint wq[]; };
layout(std430, binding = 1) readonly buffer X { float x[]; };
layout(std430, binding = 2) buffer Y { float y[]; };
layout(push_constant) uniform Push { pc_wmat p; };

#include "dequant.glsl"

shared float red[NR * NT * WG];

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
  uint r0 = (gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x) * NR;
  if (r0 >= p.rows) return; // uniform per workgroup: no barrier is skipped by half a group
  uint tid = gl_LocalInvocationID.x;
  uint nt = min(p.n_tokens, NT);
  uint ng = dq_row_groups(p.cols);

  // Token rows past n_tokens repeat the last one, and rows past the matrix the last row: the
  // loops below then have constant trip counts and unroll, with no per-token or per-row branch
  // (which a CPU device would run masked). Only real rows and tokens are written.
  uint xo[NT];
  for (uint t = 0u; t < NT; t++) xo[t] = p.x_off + min(t, nt - 1u) * p.x_stride;
  uint base[NR];
  for (uint i = 0u; i < NR; i++)
    base[i] = p.w_off + min(r0 + i, p.rows - 1u) * dq_row_bytes(p.cols);
  float acc[NR * NT];
  for (uint v = 0u; v < NR * NT; v++) acc[v] = 0.0;
  for (uint G = tid; G < ng; G += WG) {
    // The activations of this group are the same for every row: loaded once, used NR times.
    uint e0, e1;
    dq_pos(G, e0, e1);
    vec4 xa[NT], xb[NT];
    for (uint t = 0u; t < NT; t++) {
      xa[t] = load_x(xo[t], e0);
      xb[t] = load_x(xo[t], e1);
    }
    for (uint i = 0u; i < NR; i++) {
      vec4 a, b;
      dq_load(base[i], G, p.cols, a, b, e0, e1);
      for (uint t = 0u; t < NT; t++) acc[i * NT + t] += dot(a, xa[t]) + dot(b, xb[t]);
    }
  }

  // Reduce the NR * NT partial sums over the workgroup; invocation v < NR * NT then writes
  // row r0 + v / NT, token v % NT.
#ifdef USE_SUBGROUP
  for (uint v = 0u; v < NR * NT; v++) {
    float s = subgroupAdd(acc[v]);
    if (gl_SubgroupInvocationID == 0u) red[v * gl_NumSubgroups + gl_SubgroupID] = s;
  }
  barrier();
  uint i = tid / NT, t = tid % NT;
  if (i < NR && t < nt && r0 + i < p.rows) {
    float s = 0.0;
    for (uint k = 0u; k < gl_NumSubgroups; k++) s += red[tid * gl_NumSubgroups + k];
#else
  for (uint v = 0u; v < NR * NT; v++) red[v * WG + tid] = acc[v];
  barrier();
  for (uint s = WG / 2u; s > 0u; s >>= 1) {
    if (tid < s)
      for (uint v = 0u; v < NR * NT; v++) red[v * WG + tid] += red[v * WG + tid + s];
    barrier();
  }
  uint i = tid / NT, t = tid % NT;
  if (i < NR && t < nt && r0 + i < p.rows) {
    float s = red[tid * WG];
#endif
    uint o = p.y_off + t * p.y_stride + r0 + i;
    y[o] = (p.flags & WMAT_ACCUMULATE) != 0u ? y[o] + s : s;
  }
}
