#version 450
// out[t][c] = act(gate[t][c]) * up[t][c] for c < n (layouts in pc_ops.h): act is silu,
// silu(g) = g / (1 + exp(-g)), or GELU's tanh approximation (gemma's GeGLU). For g below about
// -88, exp(-g) overflows to +inf and g / inf gives the right limit, -0; no clamp needed. out may alias gate or up when its stride equals in_stride: each element is
// read and written by one invocation. Grid-stride, so any size fits the workgroup-count limit.
#include "pc_ops.h"
#include "tanh.glsl"

layout(local_size_x_id = 0) in;

layout(std430, binding = 0) readonly buffer Gate { float gate[]; };
layout(std430, binding = 1) readonly buffer Up { float up[]; };
layout(std430, binding = 2) writeonly buffer Out { float o[]; };
layout(push_constant) uniform Push { pc_swiglu p; };

void main() {
  uint total = p.n_tokens * p.n;
  uint step = gl_NumWorkGroups.x * gl_WorkGroupSize.x;
  for (uint k = gl_GlobalInvocationID.x; k < total; k += step) {
    uint t = k / p.n, c = k - t * p.n;
    float g = gate[t * p.in_stride + c];
    float u = up[t * p.in_stride + p.up_off + c];
    float a;
    if (p.act == 0u) {
      a = g / (1.0 + exp(-g));
    } else {
      float z = 0.7978845608 * (g + 0.044715 * g * g * g);
      a = 0.5 * g * (1.0 + kvd_tanh(z));
    }
    o[t * p.out_stride + c] = a * u;
  }
}
