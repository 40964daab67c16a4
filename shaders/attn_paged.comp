#version 450
// Paged attention, one workgroup per (query head, query token, KV split).
//
// The query's KV positions are read through the block table, so sequences never need contiguous
// memory. A split walks its positions in chunks of CHUNK with an online softmax: scores q.k for a
// chunk (one position per invocation, strided) into shared memory, the workgroup max and sum, then
// each invocation rescales and accumulates the exp-weighted V for its slice of head_dim. Any KV
// length fits any split count, so splits exist only to spread long contexts over the device.
// GQA: query head h reads KV head h / (n_head/n_head_kv). With one split the output is normalised
// here; with several, (m, l, o) partials go to attn_merge, which combines them (log-sum-exp).
// K and V are read as stored (kv_row.glsl): f16 and quantized rows are decoded in registers.
#include "pc_attn.h"
#include "tanh.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;
layout(constant_id = 1) const uint CHUNK = 256;  // max positions per split (shared scores)
layout(constant_id = 2) const uint MAX_HD = 256; // max head_dim (shared query)

layout(std430, binding = 0) readonly buffer Q { float q[]; };
#if defined(KV_F32)
layout(std430, binding = 1) readonly buffer KCache { float k_cache[]; };
layout(std430, binding = 2) readonly buffer VCache { float v_cache[]; };
#else
layout(std430, binding = 1) readonly buffer KCache { uint k_cache[]; };
layout(std430, binding = 2) readonly buffer VCache { uint v_cache[]; };
#endif
layout(std430, binding = 3) readonly buffer TokInfo { uvec2 tok_info[]; };
layout(std430, binding = 4) readonly buffer Tables { uint tables[]; };
layout(std430, binding = 5) writeonly buffer Out { float o[]; };
// (n_tokens, n_head, n_splits, head_dim + 2): o unnormalised, then m and l
layout(std430, binding = 6) writeonly buffer Partial { float part[]; };
layout(push_constant) uniform Push { pc_attn p; };

shared float qs[MAX_HD];
shared float scores[CHUNK];
shared float red[WG];

const uint ACC = (MAX_HD + WG - 1) / WG; // head_dim values each invocation accumulates

#define KV_DOT
#include "kv_row.glsl"

// The first word of position pos's row for KV head kvh.
uint kv_base(uint table_off, uint kvh, uint pos) {
  uint block = tables[table_off + pos / p.block_size];
  return ((block * p.n_head_kv + kvh) * p.block_size + pos % p.block_size) * p.row_words;
}

float reduce_max(float v, uint tid) {
  red[tid] = v;
  barrier();
  for (uint s = WG / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] = max(red[tid], red[tid + s]);
    barrier();
  }
  float r = red[0];
  barrier(); // everyone has read red[0] before it is reused
  return r;
}

float reduce_sum(float v, uint tid) {
  red[tid] = v;
  barrier();
  for (uint s = WG / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    barrier();
  }
  float r = red[0];
  barrier();
  return r;
}

void main() {
  uint h = gl_WorkGroupID.x;
  uint t = gl_WorkGroupID.y;
  uint split = gl_WorkGroupID.z;
  uint tid = gl_LocalInvocationID.x;
  uint kvh = h / (p.n_head / p.n_head_kv);
  uint n_kv = tok_info[t].x;
  uint table_off = tok_info[t].y;
  // A sliding window starts the range at n_kv - window; the splits divide what is left.
  uint kv0 = p.window != 0u && n_kv > p.window ? n_kv - p.window : 0u;
  uint p0 = min(kv0 + split * p.chunk, n_kv);
  uint p1 = min(p0 + p.chunk, n_kv);
  uint qo = t * p.q_stride + h * p.head_dim;
  uint po = ((t * p.n_head + h) * p.n_splits + split) * (p.head_dim + 2);

  for (uint d = tid; d < p.head_dim; d += WG) qs[d] = q[qo + d];
  barrier();

  float m = -1.0 / 0.0;
  float l = 0.0;
  float acc[ACC];
  for (uint j = 0; j < ACC; j++) acc[j] = 0.0;

  for (uint c0 = p0; c0 < p1; c0 += CHUNK) {
    uint c1 = min(c0 + CHUNK, p1);
    float cmax = -1.0 / 0.0;
    for (uint i = c0 + tid; i < c1; i += WG) {
      float s = k_dot(kv_base(table_off, kvh, i)) * p.scale;
      if (p.softcap > 0.0) s = p.softcap * kvd_tanh(s / p.softcap);
      scores[i - c0] = s;
      cmax = max(cmax, s);
    }
    float m_new = max(m, reduce_max(cmax, tid));
    float rescale = exp(m - m_new); // 0 on the first chunk (m = -inf)
    float csum = 0.0;
    for (uint i = c0 + tid; i < c1; i += WG) {
      float e = exp(scores[i - c0] - m_new);
      scores[i - c0] = e;
      csum += e;
    }
    l = l * rescale + reduce_sum(csum, tid); // the reduction's barriers publish scores[]
    for (uint j = 0; j < ACC; j++) {
      uint d = tid + j * WG;
      if (d >= p.head_dim) break;
      float a = acc[j] * rescale;
      for (uint i = c0; i < c1; i++) a += scores[i - c0] * v_at(kv_base(table_off, kvh, i), d);
      acc[j] = a;
    }
    m = m_new;
    barrier(); // the next chunk overwrites scores[]
  }

  for (uint j = 0; j < ACC; j++) {
    uint d = tid + j * WG;
    if (d >= p.head_dim) break;
    if (p.n_splits == 1) {
      o[qo + d] = l > 0.0 ? acc[j] / l : 0.0;
    } else {
      part[po + d] = acc[j];
    }
  }
  if (p.n_splits > 1 && tid == 0) {
    part[po + p.head_dim] = m;
    part[po + p.head_dim + 1] = l;
  }
}
