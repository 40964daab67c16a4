/* Push constants of the weight-consuming kernels (matvec_<type>, matmul_<type>, embed_<type>),
 * which read GGUF weights as they are stored and dequantize inside the shader.
 *
 * Weights (binding 0) are raw GGUF tensor bytes, row-major [out][in]: row r is
 * dtype_row_bytes(type, cols) bytes at byte w_off + r * row_bytes of the binding. The shaders read
 * the binding as 32-bit words and extract bytes and halves themselves, so w_off may be any byte
 * offset (blocks of 18, 22 or 210 bytes are not word-aligned anyway), except that F32 rows are
 * loaded as whole words and so start at a multiple of 4. The binding's range must extend to the
 * next multiple of 4 bytes past the last row (see wkern_weight_bytes()).
 * Activations are f32: token t of x starts at float x_off + t * x_stride of its binding, and of y
 * at y_off + t * y_stride, so the host can bind a whole activation buffer at an aligned offset and
 * address a row range of a split matrix inside it. */
#ifndef KVD_PC_MATMUL_H
#define KVD_PC_MATMUL_H
#include "pc_common.h"

/* Tokens one mat-vec dispatch handles: each dequantized weight is reused for all of them. */
#define WMAT_MAX_TOKENS 8u
/* flags: y += W x instead of y = W x (fuses the residual add). */
#define WMAT_ACCUMULATE 1u

/* y[t][r] (+)= sum_c W[r][c] * x[t][c] for r < rows, t < n_tokens; W is (rows, cols) in the
 * variant's weight type. matvec_* takes n_tokens <= WMAT_MAX_TOKENS; matmul_* any count. */
struct pc_wmat {
  uint rows; /* weight rows = outputs per token */
  uint cols; /* weight columns = inputs per token; a whole number of blocks */
  uint n_tokens;
  uint w_off;    /* byte offset of weight row 0 in binding 0 */
  uint x_off;    /* float offset of x[0][0] in binding 1 */
  uint x_stride; /* floats between tokens in x */
  uint y_off;    /* float offset of y[0][0] in binding 2 */
  uint y_stride; /* floats between tokens in y */
  uint flags;    /* WMAT_ACCUMULATE */
};
PC_ASSERT_SIZE(pc_wmat, 36)

/* out[t][:] = dequantized row ids[t] of a (n_vocab, dim) table, for the tokens whose id lies in
 * [row0, row0 + n_rows): the rows binding 0 holds, so a table larger than maxStorageBufferRange
 * is looked up with one dispatch per row range. Tokens outside the range are left untouched. */
struct pc_embed {
  uint n_tokens;
  uint dim;   /* values per row; a whole number of blocks */
  uint w_off; /* byte offset of table row row0 in binding 0 */
  uint row0;
  uint n_rows;
  uint ids_off;    /* uint offset of ids[0] in binding 1 */
  uint out_off;    /* float offset of out[0][0] in binding 2 */
  uint out_stride; /* floats between tokens in out */
};
PC_ASSERT_SIZE(pc_embed, 32)

#endif
