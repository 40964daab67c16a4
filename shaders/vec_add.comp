#version 450
// c = a + b, element-wise. Grid-stride so any n fits inside maxComputeWorkGroupCount.
#include "pc_basic.h"

layout(local_size_x_id = 0) in;

layout(std430, binding = 0) readonly buffer A { float a[]; };
layout(std430, binding = 1) readonly buffer B { float b[]; };
layout(std430, binding = 2) writeonly buffer C { float c[]; };
layout(push_constant) uniform Push { pc_vec_add p; };

void main() {
  uint stride = gl_NumWorkGroups.x * gl_WorkGroupSize.x;
  for (uint i = gl_GlobalInvocationID.x; i < p.n; i += stride) {
    c[i] = a[i] + b[i];
  }
}
