#version 450
// Rotary position embedding, in place on x (n_tokens, n_heads, head_dim) f32 (rows p.stride
// floats apart): pair i of every head of token t turns by theta = pos[t] * f_i with
// f_i = freq_scale * freq_base^(-2i / n_rot). One invocation per (token, head, pair), grid-stride.
//
// Why not theta = float(pos) * f in f32 and sin/cos of that: at position 4096 theta is ~4096 rad,
// where one f32 ulp is 5e-4 rad, so the output would be off by ~1e-4 whatever sin() does; and
// Vulkan only promises sin/cos to 2^-11 absolute even on [-pi, pi]. Instead the host computes
// f_i / (2 pi) in double and uploads its fractional part as a 64-bit fixed-point number of turns
// (freq[i] = (low word, high word)). Since pos is an integer, frac(pos * f_i / 2pi) is exactly
// (pos * freq[i]) mod 2^64, an integer product: no rounding at any position. The nearest quarter
// turn is split off in integers, the remainder (at most 1/8 turn, |a| <= pi/4) becomes a float,
// and sin/cos of it come from Taylor polynomials accurate to ~1e-9 there. The angle error is then
// ~1e-7 rad at every position, the same as for position 0.
#include "pc_ops.h"

layout(local_size_x_id = 0) in;

layout(std430, binding = 0) buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer Pos { uint pos[]; };    // (n_tokens)
layout(std430, binding = 2) readonly buffer Freq { uvec2 freq[]; }; // (n_rot / 2)
layout(push_constant) uniform Push { pc_rope p; };

const float TWO_PI = 6.28318530717958647692;
const float TWO_POW_M32 = 2.3283064365386963e-10; // 2^-32

// sin and cos of |a| <= pi/4 (a little beyond is harmless): truncation errors x^11/11! and
// x^12/12! are below 2e-9 there, under f32 rounding.
void sincos_small(float a, out float s, out float c) {
  float a2 = a * a;
  s = a * (1.0 + a2 * (-1.0 / 6.0 + a2 * (1.0 / 120.0 + a2 * (-1.0 / 5040.0 +
                                                              a2 * (1.0 / 362880.0)))));
  c = 1.0 + a2 * (-0.5 + a2 * (1.0 / 24.0 + a2 * (-1.0 / 720.0 + a2 * (1.0 / 40320.0 +
                                                                        a2 * (-1.0 / 3628800.0)))));
}

void main() {
  uint half_rot = p.n_rot / 2;
  uint total = p.n_tokens * p.n_heads * half_rot;
  uint step = gl_NumWorkGroups.x * gl_WorkGroupSize.x;
  for (uint k = gl_GlobalInvocationID.x; k < total; k += step) {
    uint i = k % half_rot;
    uint th = k / half_rot;
    uint h = th % p.n_heads, t = th / p.n_heads;

    // turns = pos * freq[i] mod 2^64, as (hi, lo) 32-bit words.
    uvec2 f = freq[i];
    uint ps = pos[t], hi, lo;
    umulExtended(ps, f.x, hi, lo);
    hi += ps * f.y; // the high word's product only matters mod 2^32
    // Nearest quarter turn q, and the remainder r in [-1/8, 1/8) turn (units of 2^-32 turn).
    uint q = (hi + 0x20000000u) >> 30;
    int r = int(hi - (q << 30));
    float a = (float(r) + float(lo) * TWO_POW_M32) * TWO_POW_M32 * TWO_PI;
    float sa, ca;
    sincos_small(a, sa, ca);
    sa *= p.mscale;
    ca *= p.mscale;
    // sin and cos of q * pi/2 + a (times mscale).
    q &= 3u;
    float sn = q == 0u ? sa : q == 1u ? ca : q == 2u ? -sa : -ca;
    float cs = q == 0u ? ca : q == 1u ? -sa : q == 2u ? -ca : sa;

    uint base = t * p.stride + h * p.head_dim;
    uint i0 = p.mode == 1u ? i : 2u * i;
    uint i1 = p.mode == 1u ? i + half_rot : 2u * i + 1u;
    float x0 = x[base + i0], x1 = x[base + i1];
    x[base + i0] = x0 * cs - x1 * sn;
    x[base + i1] = x0 * sn + x1 * cs;
  }
}
