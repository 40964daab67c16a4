#version 450
// y = W x for an f32 (rows, cols) row-major matrix: one workgroup per row.
//
// Neighbouring invocations read neighbouring columns so every load is coalesced, then the
// partial sums are reduced: with subgroup arithmetic (USE_SUBGROUP) one subgroupAdd per subgroup
// and a shared-memory pass over the subgroups, else a portable shared-memory tree.
// Rows are spread over a 2D grid so row counts beyond maxComputeWorkGroupCount[0] still fit.
#include "pc_basic.h"
#ifdef USE_SUBGROUP
#extension GL_KHR_shader_subgroup_arithmetic : require
#endif

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;

layout(std430, binding = 0) readonly buffer W { float w[]; };
layout(std430, binding = 1) readonly buffer X { float x[]; };
layout(std430, binding = 2) writeonly buffer Y { float y[]; };
layout(push_constant) uniform Push { pc_matvec p; };

shared float partial[WG];

void main() {
  uint row = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
  if (row >= p.rows) return; // uniform per workgroup: no barrier is skipped by half a group
  uint tid = gl_LocalInvocationID.x;
  uint base = row * p.cols;
  float acc = 0.0;
  for (uint c = tid; c < p.cols; c += WG) acc += w[base + c] * x[c];

#ifdef USE_SUBGROUP
  acc = subgroupAdd(acc);
  if (gl_SubgroupInvocationID == 0) partial[gl_SubgroupID] = acc;
  barrier();
  if (tid == 0) {
    float s = 0.0;
    for (uint i = 0; i < gl_NumSubgroups; i++) s += partial[i];
    y[row] = s;
  }
#else
  partial[tid] = acc;
  barrier();
  for (uint s = WG / 2; s > 0; s >>= 1) {
    if (tid < s) partial[tid] += partial[tid + s];
    barrier();
  }
  if (tid == 0) y[row] = partial[0];
#endif
}
