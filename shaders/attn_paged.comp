#version 450
// Paged attention, one workgroup per (query head, query token, KV split).
//
// The query's KV positions are read through the block table, so sequences never need contiguous
// memory. Within a split: scores q.k for every position (one position per invocation, strided),
// a workgroup max and sum (online-softmax statistics), then each invocation accumulates the
// exp-weighted V for a slice of head_dim. GQA: query head h reads KV head h / (n_head/n_head_kv).
// With one split the output is normalised here; with several, (m, l, o) partials go to attn_merge
// which combines them with the log-sum-exp trick, so long contexts spread over many workgroups.
#include "pc_attn.h"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;
layout(constant_id = 1) const uint CHUNK = 256;  // max positions per split (shared scores)
layout(constant_id = 2) const uint MAX_HD = 256; // max head_dim (shared query)

layout(std430, binding = 0) readonly buffer Q { float q[]; };
layout(std430, binding = 1) readonly buffer KCache { float k_cache[]; };
layout(std430, binding = 2) readonly buffer VCache { float v_cache[]; };
layout(std430, binding = 3) readonly buffer TokInfo { uvec2 tok_info[]; };
layout(std430, binding = 4) readonly buffer Tables { uint tables[]; };
layout(std430, binding = 5) writeonly buffer Out { float o[]; };
// (n_tokens, n_head, n_splits, head_dim + 2): o unnormalised, then m and l
layout(std430, binding = 6) writeonly buffer Partial { float part[]; };
layout(push_constant) uniform Push { pc_attn p; };

shared float qs[MAX_HD];
shared float scores[CHUNK];
shared float red[WG];

uint kv_base(uint table_off, uint kvh, uint pos) {
  uint block = tables[table_off + pos / p.block_size];
  return ((block * p.n_head_kv + kvh) * p.block_size + pos % p.block_size) * p.head_dim;
}

void main() {
  uint h = gl_WorkGroupID.x;
  uint t = gl_WorkGroupID.y;
  uint split = gl_WorkGroupID.z;
  uint tid = gl_LocalInvocationID.x;
  uint kvh = h / (p.n_head / p.n_head_kv);
  uint n_kv = tok_info[t].x;
  uint table_off = tok_info[t].y;
  uint p0 = split * p.chunk;
  uint p1 = min(p0 + p.chunk, n_kv);
  uint qo = t * p.q_stride + h * p.head_dim;
  uint po = ((t * p.n_head + h) * p.n_splits + split) * (p.head_dim + 2);

  for (uint d = tid; d < p.head_dim; d += WG) qs[d] = q[qo + d];
  barrier();

  // Scores and the running max.
  float mx = -1.0 / 0.0;
  for (uint i = p0 + tid; i < p1; i += WG) {
    uint kb = kv_base(table_off, kvh, i);
    float s = 0.0;
    for (uint d = 0; d < p.head_dim; d++) s += qs[d] * k_cache[kb + d];
    s *= p.scale;
    scores[i - p0] = s;
    mx = max(mx, s);
  }
  red[tid] = mx;
  barrier();
  for (uint s = WG / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] = max(red[tid], red[tid + s]);
    barrier();
  }
  float m = red[0];
  barrier();

  // Weights and their sum.
  float sum = 0.0;
  for (uint i = p0 + tid; i < p1; i += WG) {
    float e = exp(scores[i - p0] - m);
    scores[i - p0] = e;
    sum += e;
  }
  red[tid] = sum;
  barrier();
  for (uint s = WG / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    barrier();
  }
  float l = red[0];

  // Weighted V: each invocation owns a slice of head_dim.
  for (uint d = tid; d < p.head_dim; d += WG) {
    float acc = 0.0;
    for (uint i = p0; i < p1; i++) acc += scores[i - p0] * v_cache[kv_base(table_off, kvh, i) + d];
    if (p.n_splits == 1) {
      o[qo + d] = p1 > p0 ? acc / l : 0.0;
    } else {
      part[po + d] = acc;
    }
  }
  if (p.n_splits > 1 && tid == 0) {
    part[po + p.head_dim] = p1 > p0 ? m : -1.0 / 0.0;
    part[po + p.head_dim + 1] = p1 > p0 ? l : 0.0;
  }
}
