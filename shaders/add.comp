#version 450
// x += y over x (n_tokens, n) f32, or with bcast x[t] += y for a (n) vector y: the residual
// connection, and the q/k/v biases of qwen2 added to every token of a batch. The same walk
// scales x (gemma's embeddings) or soft-caps it (gemma2's logits): ops 1 and 2 (pc_ops.h).
// Grid-stride.
#include "pc_ops.h"
#include "tanh.glsl"

layout(local_size_x_id = 0) in;

layout(std430, binding = 0) buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer Y { float y[]; };
layout(push_constant) uniform Push { pc_add p; };

void main() {
  uint total = p.n_tokens * p.n;
  uint step = gl_NumWorkGroups.x * gl_WorkGroupSize.x;
  for (uint k = gl_GlobalInvocationID.x; k < total; k += step) {
    if (p.op == 1u) {
      x[k] *= p.a;
    } else if (p.op == 2u) {
      x[k] = p.a * kvd_tanh(x[k] / p.a);
    } else if (p.bcast != 0) {
      // A broadcast y holds only n floats: never index it by k.
      x[k] += y[k % p.n];
    } else {
      x[k] += y[k];
    }
  }
}
