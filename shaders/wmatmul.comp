#version 450
// Y (+)= X W^T for many tokens (prefill, batches), W in any GGUF weight type: the matmul_<type>
// variants. X is (n_tokens, cols) f32, W is (rows, cols) quantized, Y is (n_tokens, rows) f32.
//
// A 16x16 workgroup computes a (BM = 16*TM tokens) x (BN = 16*TN rows) tile of Y; each invocation
// keeps TM x TN accumulators in registers. K advances BK values at a time: the BN x BK weight tile
// is dequantized once into shared memory (each invocation one group of 8 values per step) and
// then used by all BM tokens, so the quantized weights are read once per BM tokens. BK is a
// multiple of 8 and either a multiple or a divisor of DQ_SPAN: the tile then lies inside one
// window of WIN = max(BK, DQ_SPAN) values, whose groups are exactly the row's groups
// [win0/8, (win0+WIN)/8). When BK < DQ_SPAN (the K-quants' 64-value windows with BK = 32) each
// group is decoded once per tile it touches and stores only its runs inside the tile: decoding is
// cheap next to the BM tokens' multiply-adds, and small K steps leave room for larger tiles.
// Shared memory is (BM + BN) * (BK + 1) floats: the host picks TM/TN/BK within the device limit.
// Edges (tokens, rows or columns past the end) are zero-padded, never read out of bounds.
#include "pc_matmul.h"

layout(local_size_x = 16, local_size_y = 16) in;
layout(constant_id = 0) const uint TM = 2;
layout(constant_id = 1) const uint TN = 2;
layout(constant_id = 2) const uint BK = 64;

const uint BM = 16 * TM;
const uint BN = 16 * TN;

layout(std430, binding = 0) readonly buffer Wq { uint wq[]; };
layout(std430, binding = 1) readonly buffer X { float x[]; };
layout(std430, binding = 2) buffer Y { float y[]; };
layout(push_constant) uniform Push { pc_wmat p; };

#include "dequant.glsl"

// +1 column of padding keeps column reads off a single shared-memory bank.
shared float xs[BM][BK + 1];
shared float ws[BN][BK + 1];

void main() {
  uint tx = gl_LocalInvocationID.x; // along rows of W (columns of Y)
  uint ty = gl_LocalInvocationID.y; // along tokens
  uint tid = ty * 16u + tx;
  uint m0 = gl_WorkGroupID.y * BM;
  uint n0 = gl_WorkGroupID.x * BN;
  uint rb = dq_row_bytes(p.cols);
  uint ng = dq_row_groups(p.cols);
  const uint WIN = BK > DQ_SPAN ? BK : DQ_SPAN;
  const uint GPT = WIN / 8u; // groups per tile row

  float acc[TM][TN];
  for (uint i = 0; i < TM; i++)
    for (uint j = 0; j < TN; j++) acc[i][j] = 0.0;

  for (uint k0 = 0; k0 < p.cols; k0 += BK) {
    for (uint e = tid; e < BM * BK; e += 256u) {
      uint r = e / BK, c = e % BK;
      uint gm = m0 + r, gk = k0 + c;
      xs[r][c] = (gm < p.n_tokens && gk < p.cols) ? x[p.x_off + gm * p.x_stride + gk] : 0.0;
    }
    uint win0 = k0 - k0 % WIN;
    for (uint e = tid; e < BN * GPT; e += 256u) {
      uint r = e / GPT, G = win0 / 8u + e % GPT;
      uint gn = n0 + r;
      vec4 a = vec4(0.0), b = vec4(0.0);
      uint e0, e1;
      if (gn < p.rows && G < ng)
        dq_load(p.w_off + gn * rb, G, p.cols, a, b, e0, e1);
      else
        dq_pos(G, e0, e1);
      e0 -= k0; // runs before the tile wrap around to large values and are skipped too
      e1 -= k0;
      for (uint q = 0u; q < 4u; q++) {
        if (e0 < BK) ws[r][e0 + q] = a[q];
        if (e1 < BK) ws[r][e1 + q] = b[q];
      }
    }
    barrier();
    for (uint kk = 0; kk < BK; kk++) {
      float wv[TN];
      for (uint j = 0; j < TN; j++) wv[j] = ws[tx + 16u * j][kk];
      for (uint i = 0; i < TM; i++) {
        float xv = xs[ty + 16u * i][kk];
        for (uint j = 0; j < TN; j++) acc[i][j] += xv * wv[j];
      }
    }
    barrier();
  }

  bool accum = (p.flags & WMAT_ACCUMULATE) != 0u;
  for (uint i = 0; i < TM; i++) {
    uint gm = m0 + ty + 16u * i;
    if (gm >= p.n_tokens) continue;
    for (uint j = 0; j < TN; j++) {
      uint gn = n0 + tx + 16u * j;
      if (gn >= p.rows) continue;
      uint o = p.y_off + gm * p.y_stride + gn;
      y[o] = accum ? y[o] + acc[i][j] : acc[i][j];
    }
  }
}
