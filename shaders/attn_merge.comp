#version 450
// Combines the (m, l, o) partials of attn_paged's KV splits: with M = max m_s,
// out = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M). Empty splits carry m = -inf, l = 0.
#include "pc_attn.h"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;

layout(std430, binding = 0) readonly buffer Partial { float part[]; };
layout(std430, binding = 1) writeonly buffer Out { float o[]; };
layout(push_constant) uniform Push { pc_attn p; };

void main() {
  uint h = gl_WorkGroupID.x;
  uint t = gl_WorkGroupID.y;
  uint tid = gl_LocalInvocationID.x;
  uint stride = p.head_dim + 2;
  uint base = (t * p.n_head + h) * p.n_splits * stride;
  float mx = -1.0 / 0.0;
  for (uint s = 0; s < p.n_splits; s++) mx = max(mx, part[base + s * stride + p.head_dim]);
  float l = 0.0;
  for (uint s = 0; s < p.n_splits; s++) {
    float ms = part[base + s * stride + p.head_dim];
    if (ms > -1.0 / 0.0) l += part[base + s * stride + p.head_dim + 1] * exp(ms - mx);
  }
  uint qo = t * p.q_stride + h * p.head_dim;
  for (uint d = tid; d < p.head_dim; d += WG) {
    float acc = 0.0;
    for (uint s = 0; s < p.n_splits; s++) {
      float ms = part[base + s * stride + p.head_dim];
      if (ms > -1.0 / 0.0) acc += part[base + s * stride + d] * exp(ms - mx);
    }
    o[qo + d] = l > 0.0 ? acc / l : 0.0;
  }
}
