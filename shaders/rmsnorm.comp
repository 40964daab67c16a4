#version 450
// out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w for x (n_tokens, dim) f32, one workgroup per
// token (rows spread over a 2D grid so any token count fits maxComputeWorkGroupCount).
//
// FUSE_ADD (the add_rmsnorm variants) first adds the residual branch, x[t] += y[t], writes the sum
// back to x and normalises that: the two steps that end every attention and feed-forward block
// in one dispatch and one pass over x instead of two dispatches and a barrier.
//
// out may alias x: element c of a row is read and written by the same invocation in both passes
// (the same strided loop), so no invocation reads what another one wrote.
#ifdef USE_SUBGROUP
#extension GL_KHR_shader_subgroup_arithmetic : require
#endif
#include "pc_ops.h"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 128;

#ifdef FUSE_ADD
layout(std430, binding = 0) buffer X { float x[]; };
#else
layout(std430, binding = 0) readonly buffer X { float x[]; };
#endif
layout(std430, binding = 1) readonly buffer Wt { float w[]; };
layout(std430, binding = 2) writeonly buffer Out { float o[]; };
#ifdef FUSE_ADD
layout(std430, binding = 3) readonly buffer Y { float y[]; };
#endif
layout(push_constant) uniform Push { pc_rmsnorm p; };

#include "wg_reduce.glsl"

void main() {
  uint t = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
  if (t >= p.n_tokens) return; // uniform per workgroup: no barrier is skipped by part of a group
  uint tid = gl_LocalInvocationID.x;
  uint base = t * p.dim;
  float ss = 0.0;
  for (uint c = tid; c < p.dim; c += WG) {
#ifdef FUSE_ADD
    float v = x[base + c] + y[base + c];
    x[base + c] = v;
#else
    float v = x[base + c];
#endif
    ss += v * v;
  }
  ss = wg_sum(ss);
  float scale = inversesqrt(ss / float(p.dim) + p.eps);
  for (uint c = tid; c < p.dim; c += WG) o[base + c] = x[base + c] * scale * w[c];
}
