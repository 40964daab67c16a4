#version 450
// Y = X W^T, f32, tiled through shared memory: X (m, k), W (n, k), Y (m, n), row-major.
//
// A 16x16 workgroup computes a (BM=16*TM) x (BN=16*TN) tile of Y; each invocation keeps a TM x TN
// block of accumulators in registers, so every value loaded into shared memory is used TM or TN
// times. K advances in steps of BK. Edges (m, n, k not multiples of the tile) are zero-padded in
// shared memory, never read out of bounds.
#include "pc_basic.h"

layout(local_size_x = 16, local_size_y = 16) in;
layout(constant_id = 0) const uint TM = 2;
layout(constant_id = 1) const uint TN = 2;
layout(constant_id = 2) const uint BK = 16;

const uint BM = 16 * TM;
const uint BN = 16 * TN;

layout(std430, binding = 0) readonly buffer W { float w[]; };
layout(std430, binding = 1) readonly buffer X { float x[]; };
layout(std430, binding = 2) writeonly buffer Y { float y[]; };
layout(push_constant) uniform Push { pc_matmul p; };

// +1 column of padding keeps column reads off a single shared-memory bank.
shared float xs[BM][BK + 1];
shared float ws[BN][BK + 1];

void main() {
  uint tx = gl_LocalInvocationID.x; // along n
  uint ty = gl_LocalInvocationID.y; // along m
  uint tid = ty * 16 + tx;
  uint m0 = gl_WorkGroupID.y * BM;
  uint n0 = gl_WorkGroupID.x * BN;

  float acc[TM][TN];
  for (uint i = 0; i < TM; i++)
    for (uint j = 0; j < TN; j++) acc[i][j] = 0.0;

  for (uint k0 = 0; k0 < p.k; k0 += BK) {
    for (uint e = tid; e < BM * BK; e += 256) {
      uint r = e / BK, c = e % BK;
      uint gm = m0 + r, gk = k0 + c;
      xs[r][c] = (gm < p.m && gk < p.k) ? x[gm * p.k + gk] : 0.0;
    }
    for (uint e = tid; e < BN * BK; e += 256) {
      uint r = e / BK, c = e % BK;
      uint gn = n0 + r, gk = k0 + c;
      ws[r][c] = (gn < p.n && gk < p.k) ? w[gn * p.k + gk] : 0.0;
    }
    barrier();
    for (uint kk = 0; kk < BK; kk++) {
      float wv[TN];
      for (uint j = 0; j < TN; j++) wv[j] = ws[tx + 16 * j][kk];
      for (uint i = 0; i < TM; i++) {
        float xv = xs[ty + 16 * i][kk];
        for (uint j = 0; j < TN; j++) acc[i][j] += xv * wv[j];
      }
    }
    barrier();
  }

  for (uint i = 0; i < TM; i++) {
    uint gm = m0 + ty + 16 * i;
    if (gm >= p.m) continue;
    for (uint j = 0; j < TN; j++) {
      uint gn = n0 + tx + 16 * j;
      if (gn < p.n) y[gm * p.n + gn] = acc[i][j];
    }
  }
}
