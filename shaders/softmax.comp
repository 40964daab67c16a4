#version 450
// x[r] = exp(x[r] - max) / sum(exp(x[r] - max)) in place over the rows of x (n_rows, n) f32, one
// workgroup per row. Subtracting the row maximum first keeps every exp() in [0, 1], so no row
// overflows whatever its logits. Three passes over the row (max, sum, write) rather than a cache
// in shared memory, so any n fits.
#ifdef USE_SUBGROUP
#extension GL_KHR_shader_subgroup_arithmetic : require
#endif
#include "pc_ops.h"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 128;

layout(std430, binding = 0) buffer X { float x[]; };
layout(push_constant) uniform Push { pc_softmax p; };

#include "wg_reduce.glsl"

void main() {
  uint r = gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x;
  if (r >= p.n_rows) return; // uniform per workgroup
  uint tid = gl_LocalInvocationID.x;
  uint base = r * p.n;
  float m = -1.0 / 0.0;
  for (uint c = tid; c < p.n; c += WG) m = max(m, x[base + c]);
  m = wg_max(m);
  float s = 0.0;
  for (uint c = tid; c < p.n; c += WG) s += exp(x[base + c] - m);
  s = wg_sum(s);
  // Same invocation, same element as in the passes above: no hazard with other invocations.
  for (uint c = tid; c < p.n; c += WG) x[base + c] = exp(x[base + c] - m) / s;
}
