// Workgroup-wide sum and max of one float per invocation, for the kernels that give one row to
// one workgroup (rmsnorm, softmax). The including shader declares the spec constant `WG` (its
// local_size_x) first and, for USE_SUBGROUP, enables GL_KHR_shader_subgroup_arithmetic.
//
// Every invocation must call these in uniform control flow; all get the same result. Each call
// ends with a barrier so that the next call may reuse the scratch array while nobody still reads
// the previous result from it. The portable path is a shared-memory tree, so WG must be a power
// of two (ops.c picks one). The subgroup path reduces within each subgroup first and then sums the
// per-subgroup values in one fixed order; it relies on gl_NumSubgroups, never on the subgroup
// size the caps report, because a driver may pick another size within its range.
#ifndef KVD_WG_REDUCE_GLSL
#define KVD_WG_REDUCE_GLSL

shared float wg_red[WG];

#ifdef USE_SUBGROUP

float wg_sum(float v) {
  v = subgroupAdd(v);
  if (gl_SubgroupInvocationID == 0) wg_red[gl_SubgroupID] = v;
  barrier();
  float r = 0.0;
  for (uint i = 0; i < gl_NumSubgroups; i++) r += wg_red[i];
  barrier();
  return r;
}

float wg_max(float v) {
  v = subgroupMax(v);
  if (gl_SubgroupInvocationID == 0) wg_red[gl_SubgroupID] = v;
  barrier();
  float r = wg_red[0];
  for (uint i = 1; i < gl_NumSubgroups; i++) r = max(r, wg_red[i]);
  barrier();
  return r;
}

#else

float wg_sum(float v) {
  uint tid = gl_LocalInvocationID.x;
  wg_red[tid] = v;
  barrier();
  for (uint s = WG / 2; s > 0; s >>= 1) {
    if (tid < s) wg_red[tid] += wg_red[tid + s];
    barrier();
  }
  float r = wg_red[0];
  barrier();
  return r;
}

float wg_max(float v) {
  uint tid = gl_LocalInvocationID.x;
  wg_red[tid] = v;
  barrier();
  for (uint s = WG / 2; s > 0; s >>= 1) {
    if (tid < s) wg_red[tid] = max(wg_red[tid], wg_red[tid + s]);
    barrier();
  }
  float r = wg_red[0];
  barrier();
  return r;
}

#endif
#endif
