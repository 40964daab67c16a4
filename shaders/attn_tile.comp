#version 450
// Query-tiled flash attention over the paged cache, for prefill: one workgroup per (group of
// query heads sharing a KV head, tile of consecutive tokens of one sequence). The workgroup's
// TR query rows (tokens x heads) are loaded once; then the KV range the tile reads is walked in
// tiles of TK positions: each K tile is decoded from its stored type into shared memory once and
// scored against every row, the rows' online softmax is updated, and the V tile (decoded into the
// same shared memory) is accumulated into every row's output. So a prompt of n tokens reads each
// K/V row n / TR times, not n times as attn_paged does (one workgroup per token and head).
// Each row masks positions outside its own causal (and sliding-window) range, so tiles need not
// align with blocks, windows or each other. Decode keeps attn_paged's split-K.
#include "pc_attn.h"
#include "tanh.glsl"

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;
layout(constant_id = 1) const uint TR = 16;     // query rows per workgroup
layout(constant_id = 2) const uint TK = 32;     // KV positions per tile
layout(constant_id = 3) const uint MAX_HD = 64; // head_dim the shared arrays hold

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
layout(std430, binding = 6) readonly buffer Tiles { uvec2 tiles[]; };
layout(push_constant) uniform Push { pc_attn p; };

// Rows of the query and K/V tiles are MAX_HD + 1 floats apart: lanes reading one element of
// different rows then hit different shared-memory banks.
const uint RS = MAX_HD + 1u;
shared float qs[TR * RS];  // the rows' queries
shared float kvs[TK * RS]; // the K tile, then the V tile, decoded
shared float ss[TR * TK];      // scores, then their exp weights
shared float row_m[TR], row_l[TR], row_r[TR]; // running max, sum, this tile's rescale
shared uint row_lo[TR], row_hi[TR];           // each row's KV range [lo, hi)

// Register tiles, so each value read from shared memory feeds several multiply-adds.
// Scores: lane (tid % KL, tid / KL) computes positions kl + KL*a (a < SKP) of rows
// rl + RLS*b (b < SRP). Output: lane (tid % DL, tid / DL) accumulates dimensions dl + DL*c
// (c < DPI) of rows rl + RLO*b (b < RPI).
const uint KL = TK < 8u ? TK : 8u, SKP = TK / KL, RLS = WG / KL, SRP = (TR + RLS - 1u) / RLS;
const uint RLO = 4u, DL = WG / RLO, RPI = (TR + RLO - 1u) / RLO, DPI = (MAX_HD + DL - 1u) / DL;

#include "kv_row.glsl"
KV_AT(k_at, k_cache)

uint kv_base(uint table_off, uint kvh, uint pos) {
  uint block = tables[table_off + pos / p.block_size];
  return ((block * p.n_head_kv + kvh) * p.block_size + pos % p.block_size) * p.row_words;
}

void main() {
  uint tid = gl_LocalInvocationID.x;
  uint th = p.tile_heads;
  uint h0 = gl_WorkGroupID.x * th;
  uint kvh = h0 / (p.n_head / p.n_head_kv);
  uvec2 tile = tiles[gl_WorkGroupID.y];
  uint t0 = tile.x, rows = min(tile.y * th, TR);
  uint table_off = tok_info[t0].y;
  uint hd = p.head_dim;

  for (uint r = tid; r < TR; r += WG) {
    uint lo = 0u, hi = 0u;
    if (r < rows) {
      hi = tok_info[t0 + r / th].x;
      lo = p.window != 0u && hi > p.window ? hi - p.window : 0u;
    }
    row_lo[r] = lo;
    row_hi[r] = hi;
    row_m[r] = -1.0 / 0.0;
    row_l[r] = 0.0;
  }
  for (uint e = tid; e < TR * hd; e += WG) {
    uint r = e / hd;
    qs[r * RS + e % hd] = r < rows ? q[(t0 + r / th) * p.q_stride + (h0 + r % th) * hd + e % hd] : 0.0;
  }
  barrier();
  // The tile's KV range: every row's range, united (the same in every invocation).
  uint lo = 0xffffffffu, hi = 0u;
  for (uint r = 0u; r < rows; r++) {
    lo = min(lo, row_lo[r]);
    hi = max(hi, row_hi[r]);
  }

  uint kl = tid % KL, rls = tid / KL, dl = tid % DL, rlo = tid / DL;
  float acc[RPI * DPI];
  for (uint j = 0u; j < RPI * DPI; j++) acc[j] = 0.0;

  for (uint k0 = lo; k0 < hi; k0 += TK) {
    uint nk = min(TK, hi - k0);
    for (uint e = tid; e < nk * hd; e += WG)
      kvs[(e / hd) * RS + e % hd] = k_at(kv_base(table_off, kvh, k0 + e / hd), e % hd);
    barrier();
    if (rls < TR) {
      float sc[SRP * SKP];
      for (uint j = 0u; j < SRP * SKP; j++) sc[j] = 0.0;
      for (uint i = 0u; i < hd; i++) {
        float kv[SKP];
        for (uint a = 0u; a < SKP; a++) kv[a] = kvs[(kl + KL * a) * RS + i];
        for (uint b = 0u; b < SRP; b++) {
          float qv = qs[min(rls + RLS * b, TR - 1u) * RS + i];
          for (uint a = 0u; a < SKP; a++) sc[b * SKP + a] += qv * kv[a];
        }
      }
      for (uint b = 0u; b < SRP; b++) {
        uint r = rls + RLS * b;
        if (r >= TR) break;
        for (uint a = 0u; a < SKP; a++) {
          uint k = kl + KL * a, pos = k0 + k;
          float s = -1.0 / 0.0;
          if (k < nk && pos >= row_lo[r] && pos < row_hi[r]) {
            s = sc[b * SKP + a] * p.scale;
            if (p.softcap > 0.0) s = p.softcap * kvd_tanh(s / p.softcap);
          }
          ss[r * TK + k] = s;
        }
      }
    }
    barrier(); // scores done: K is no longer needed
    for (uint r = tid; r < TR; r += WG) {
      float m = row_m[r], mx = m;
      for (uint k = 0u; k < nk; k++) mx = max(mx, ss[r * TK + k]);
      if (mx == -1.0 / 0.0) { // nothing of this row in the tile (yet)
        row_r[r] = 1.0;
        for (uint k = 0u; k < nk; k++) ss[r * TK + k] = 0.0;
        continue;
      }
      float sum = 0.0;
      for (uint k = 0u; k < nk; k++) {
        float w = exp(ss[r * TK + k] - mx); // masked: exp(-inf) = 0
        ss[r * TK + k] = w;
        sum += w;
      }
      float rescale = exp(m - mx); // 0 while m is -inf
      row_l[r] = row_l[r] * rescale + sum;
      row_m[r] = mx;
      row_r[r] = rescale;
    }
    for (uint e = tid; e < nk * hd; e += WG)
      kvs[(e / hd) * RS + e % hd] = v_at(kv_base(table_off, kvh, k0 + e / hd), e % hd);
    barrier();
    for (uint b = 0u; b < RPI; b++) {
      float rs = row_r[min(rlo + RLO * b, TR - 1u)];
      for (uint c = 0u; c < DPI; c++) acc[b * DPI + c] *= rs;
    }
    for (uint k = 0u; k < nk; k++) {
      float w[RPI];
      for (uint b = 0u; b < RPI; b++) w[b] = ss[min(rlo + RLO * b, TR - 1u) * TK + k];
      for (uint c = 0u; c < DPI; c++) {
        uint d = dl + DL * c;
        if (d >= hd) break;
        float v = kvs[k * RS + d];
        for (uint b = 0u; b < RPI; b++) acc[b * DPI + c] += w[b] * v;
      }
    }
    barrier(); // the next tile overwrites kvs and ss
  }

  for (uint b = 0u; b < RPI; b++) {
    uint r = rlo + RLO * b;
    if (r >= rows) break;
    float l = row_l[r];
    for (uint c = 0u; c < DPI; c++) {
      uint d = dl + DL * c;
      if (d >= hd) break;
      o[(t0 + r / th) * p.q_stride + (h0 + r % th) * hd + d] = l > 0.0 ? acc[b * DPI + c] / l : 0.0;
    }
  }
}
