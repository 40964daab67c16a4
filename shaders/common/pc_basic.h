/* Push constants of the foundation kernels (vector add, f32 mat-vec, f32 mat-mul). */
#ifndef KVD_PC_BASIC_H
#define KVD_PC_BASIC_H
#include "pc_common.h"

/* c[i] = a[i] + b[i] for i < n */
struct pc_vec_add {
  uint n;
};
PC_ASSERT_SIZE(pc_vec_add, 4)

/* y[r] = sum_c W[r][c] * x[c]; W is (rows, cols) row-major f32. */
struct pc_matvec {
  uint rows;
  uint cols;
};
PC_ASSERT_SIZE(pc_matvec, 8)

/* Y[i][j] = sum_k X[i][k] * W[j][k]: X is (m, k), W is (n, k), Y is (m, n), all row-major f32.
 * That is a batch of m mat-vecs against the same weights, the shape of a prefill step. */
struct pc_matmul {
  uint m;
  uint n;
  uint k;
};
PC_ASSERT_SIZE(pc_matmul, 12)

#endif
