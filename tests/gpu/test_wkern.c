/* The weight-consuming kernels (matvec_<type>, matmul_<type>, embed_<type>) through the wkern
 * host API, for every weight type, against the CPU reference on fresh random inputs.
 *
 * Quantized weights are random bytes with sane scale fields (finite f16 of modest size), so every
 * bit pattern of the quants is exercised; plain types are random floats (F16 with some
 * subnormals). Each matrix sits at a random byte offset inside its buffer, activations at random
 * word offsets with strides past the row, so the aligned-binding + pushed-offset path is always
 * taken. Shapes are not multiples of the workgroup or tile sizes: one block, several blocks,
 * plain rows of odd length, token counts above the mat-vec's 8.
 * Mat-vec and mat-mul results are exactly dequantized weights summed in f32, so they must agree
 * within 1e-5 relative to sum(|w*x|) (cancellation cannot fake a failure); embeddings must be
 * bit-exact. A real Q4_K/Q6_K model file and forced row/token splits complete the set. */
#include "gguf.h"
#include "gpu_fixture.h"
#include "kvd_error.h"
#include "ref_ops.h"
#include "wkern.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define F32_TOL 1e-5

/* A non-fatal check with a message (the harness has only the fatal kind). */
#define CHECK_MSG(cond, ...)                                                                       \
  do {                                                                                             \
    if (!(cond)) kt__fail(__FILE__, __LINE__, __VA_ARGS__);                                        \
  } while (0)

static const enum dtype all_types[] = {DTYPE_F32,  DTYPE_F16,  DTYPE_BF16, DTYPE_Q8_0,
                                       DTYPE_Q4_0, DTYPE_Q4_1, DTYPE_Q5_0, DTYPE_Q5_1,
                                       DTYPE_Q4_K, DTYPE_Q5_K, DTYPE_Q6_K};
#define N_TYPES (sizeof all_types / sizeof all_types[0])

static bool is_plain(enum dtype t) {
  return t == DTYPE_F32 || t == DTYPE_F16 || t == DTYPE_BF16;
}

static void put_f16(uint8_t *p, float v) {
  uint16_t h = dtype_f32_to_f16(v);
  p[0] = (uint8_t)h;
  p[1] = (uint8_t)(h >> 8);
}

/* Offsets of the f16 scale fields in a block (-1 = none). */
static void scale_fields(enum dtype t, int *a, int *b) {
  *a = -1;
  *b = -1;
  switch (t) {
  case DTYPE_Q8_0:
  case DTYPE_Q4_0:
  case DTYPE_Q5_0:
    *a = 0;
    break;
  case DTYPE_Q4_1:
  case DTYPE_Q5_1:
  case DTYPE_Q4_K:
  case DTYPE_Q5_K:
    *a = 0;
    *b = 2;
    break;
  case DTYPE_Q6_K:
    *a = 208;
    break;
  default:
    break;
  }
}

/* rows x cols weights of type t: fills dst (rows * row_bytes bytes). */
static void rand_weights(enum dtype t, uint8_t *dst, uint32_t rows, uint32_t cols) {
  uint64_t rb = 0;
  dtype_row_bytes(t, cols, &rb);
  if (is_plain(t)) {
    float *row = malloc(cols * sizeof(float));
    for (uint32_t r = 0; r < rows; r++) {
      kt_rand_fill(row, cols, -1, 1);
      /* F16 subnormals (below 2^-14) must survive the shader's conversion too. */
      for (uint32_t c = 0; c < cols; c += 7)
        row[c] *= 1e-5f;
      dtype_quant_row(t, row, dst + r * rb, cols);
    }
    free(row);
    return;
  }
  const struct dtype_info *info = dtype_get(t);
  size_t n = (size_t)rows * rb;
  for (size_t i = 0; i < n; i++)
    dst[i] = (uint8_t)kt_rand_u64();
  int fa, fb;
  scale_fields(t, &fa, &fb);
  for (size_t blk = 0; blk < n / info->block_bytes; blk++) {
    uint8_t *b = dst + blk * info->block_bytes;
    put_f16(b + fa, kt_rand_float(-0.05f, 0.05f));
    if (fb >= 0) put_f16(b + fb, kt_rand_float(-0.05f, 0.05f));
  }
}

/* A weight matrix on the host and the device: raw bytes at a random byte offset of the buffer
 * (garbage before it), the buffer ending at the next word past the last row, plus the exactly
 * dequantized floats. */
struct wmat {
  enum dtype type;
  uint32_t rows, cols, off;
  uint64_t rb;
  uint8_t *raw; /* off + rows * rb bytes, rounded up to 4 */
  size_t raw_bytes;
  float *deq; /* (rows, cols) */
  struct gpu_buffer *buf;
};

static void wmat_free(struct wmat *m) {
  free(m->raw);
  free(m->deq);
  gpu_buffer_free(m->buf);
  memset(m, 0, sizeof *m);
}

/* Builds the matrix; src (rows * rb bytes) is copied instead of random bytes when given. */
static int wmat_make(struct wmat *m, enum dtype t, uint32_t rows, uint32_t cols, uint32_t off,
                     const void *src) {
  memset(m, 0, sizeof *m);
  m->type = t;
  m->rows = rows;
  m->cols = cols;
  m->off = t == DTYPE_F32 ? off & ~3u : off; /* F32 rows are whole words */
  off = m->off;
  int rc = dtype_row_bytes(t, cols, &m->rb);
  uint64_t need = 0;
  if (rc == 0) rc = wkern_weight_bytes(t, rows, cols, &need);
  if (rc < 0) return rc;
  m->raw_bytes = (off + (size_t)rows * m->rb + 3) & ~(size_t)3;
  m->raw = malloc(m->raw_bytes);
  m->deq = malloc((size_t)rows * cols * sizeof(float));
  if (!m->raw || !m->deq) return KVD_ENOMEM;
  for (size_t i = 0; i < m->raw_bytes; i++)
    m->raw[i] = (uint8_t)kt_rand_u64();
  if (src)
    memcpy(m->raw + off, src, (size_t)rows * m->rb);
  else
    rand_weights(t, m->raw + off, rows, cols);
  for (uint32_t r = 0; r < rows && rc == 0; r++)
    rc = dtype_dequant_row(t, m->raw + off + r * m->rb, m->deq + (size_t)r * cols, cols);
  if (rc == 0) rc = gpu_buffer_new(fixture_device(), m->raw_bytes, GPU_MEM_DEVICE, "W", &m->buf);
  if (rc == 0) rc = gpu_buffer_upload(fixture_device(), m->buf, 0, m->raw, m->raw_bytes);
  return rc;
}

/* A strided f32 activation block (n, stride) at a random word offset, with its host copy. */
struct act {
  uint32_t n, width, stride, off; /* off in floats */
  float *host;                    /* off + n * stride */
  size_t len;
  struct gpu_buffer *buf;
};

static int act_make(struct act *a, uint32_t n, uint32_t width) {
  memset(a, 0, sizeof *a);
  a->n = n;
  a->width = width;
  a->stride = width + kt_rand_range(0, 3);
  a->off = kt_rand_range(0, 5);
  a->len = a->off + (size_t)n * a->stride;
  a->host = malloc(a->len * sizeof(float));
  if (!a->host) return KVD_ENOMEM;
  kt_rand_fill(a->host, a->len, -1, 1);
  int rc = gpu_buffer_new(fixture_device(), a->len * 4, GPU_MEM_DEVICE, "act", &a->buf);
  if (rc == 0) rc = gpu_buffer_upload(fixture_device(), a->buf, 0, a->host, a->len * 4);
  return rc;
}

static void act_free(struct act *a) {
  free(a->host);
  gpu_buffer_free(a->buf);
  memset(a, 0, sizeof *a);
}

static struct wkern_act act_view(const struct act *a) {
  return (struct wkern_act){a->buf, (uint64_t)a->off * 4, a->stride};
}

/* Runs one recorded operation to completion. */
typedef int (*record_fn)(const struct wkern *k, struct gpu_cmd *cmd, const void *arg);

static int run_recorded(const struct wkern *k, record_fn fn, const void *arg) {
  struct gpu_cmd *cmd = NULL;
  int rc = gpu_cmd_new(fixture_device(), &cmd);
  if (rc == 0) rc = gpu_cmd_begin(cmd);
  if (rc == 0) {
    rc = fn(k, cmd, arg);
    int rc2 = gpu_cmd_submit(cmd);
    if (rc == 0) rc = rc2;
    if (rc == 0) rc = gpu_cmd_wait(cmd);
  }
  gpu_cmd_free(cmd);
  return rc;
}

struct mul_arg {
  enum wkern_op op;
  const struct wmat *w;
  const struct act *x, *y;
  bool accumulate;
};

static int record_mul(const struct wkern *k, struct gpu_cmd *cmd, const void *p) {
  const struct mul_arg *a = p;
  struct wkern_matrix wm = {a->w->buf, a->w->off, a->w->rows, a->w->cols};
  struct wkern_act xv = act_view(a->x), yv = act_view(a->y);
  if (a->op == WKERN_MATVEC) return wkern_matvec(k, cmd, &wm, &xv, &yv, a->x->n, a->accumulate);
  return wkern_matmul(k, cmd, &wm, &xv, &yv, a->x->n, a->accumulate);
}

/* Compares y (downloaded) with the double-precision product of the dequantized weights; words of
 * the y buffer outside the result (offset, stride padding) must be untouched. Returns the worst
 * error relative to sum(|w*x|) (+ |y0| when accumulating), INFINITY for a stray write. */
static double mul_err(const struct wmat *w, const struct act *x, const struct act *y,
                      const float *got, bool accumulate) {
  double worst = 0;
  for (size_t i = 0; i < y->len; i++) {
    size_t j = i - y->off;
    bool inside = i >= y->off && j % y->stride < w->rows;
    if (!inside && memcmp(&got[i], &y->host[i], 4) != 0) return INFINITY;
  }
  for (uint32_t t = 0; t < x->n; t++) {
    const float *xt = x->host + x->off + (size_t)t * x->stride;
    for (uint32_t r = 0; r < w->rows; r++) {
      const float *wr = w->deq + (size_t)r * w->cols;
      double want = 0, mag = 0;
      for (uint32_t c = 0; c < w->cols; c++) {
        double p = (double)wr[c] * xt[c];
        want += p;
        mag += fabs(p);
      }
      size_t o = y->off + (size_t)t * y->stride + r;
      if (accumulate) {
        want += y->host[o];
        mag += fabs(y->host[o]);
      }
      double e = fabs(got[o] - want) / (mag > 1e-30 ? mag : 1e-30);
      if (!(e <= worst)) worst = e; /* NaN propagates */
    }
  }
  return worst;
}

/* One product of a fresh random (rows, cols) matrix with n_tokens random activations; the error
 * (or INFINITY with *ret_rc set on failure). */
static double check_mul(const struct wkern *k, enum wkern_op op, uint32_t rows, uint32_t cols,
                        uint32_t n_tokens, bool accumulate, int *ret_rc) {
  struct wmat w;
  struct act x, y;
  memset(&x, 0, sizeof x);
  memset(&y, 0, sizeof y);
  /* Word-aligned F16/BF16 rows (even length at an offset of 0 or 4) take a faster load path. */
  uint32_t off =
      cols % 2 == 0 && kt_rand_range(0, 1) ? 4 * kt_rand_range(0, 1) : kt_rand_range(0, 7);
  int rc = wmat_make(&w, k->type, rows, cols, off, NULL);
  if (rc == 0) rc = act_make(&x, n_tokens, cols);
  if (rc == 0) rc = act_make(&y, n_tokens, rows);
  struct mul_arg arg = {op, &w, &x, &y, accumulate};
  if (rc == 0) rc = run_recorded(k, record_mul, &arg);
  float *got = rc == 0 ? fixture_download(y.buf, y.len * 4) : NULL;
  if (rc == 0 && !got) rc = KVD_EIO;
  double err = rc == 0 ? mul_err(&w, &x, &y, got, accumulate) : INFINITY;
  free(got);
  wmat_free(&w);
  act_free(&x);
  act_free(&y);
  *ret_rc = rc;
  return err;
}

static uint32_t block_elems(enum dtype t) {
  return dtype_get(t)->block_elems;
}

/* (rows, cols, tokens) per type: one block, a few blocks, ~1024 values; plain types get odd
 * lengths. Rows and tokens are not multiples of any workgroup or tile; the mat-vec's token counts
 * reach its pipelines for 1, 4 (3 tokens), 8, and 8 + 2. */
static void shapes_for(enum dtype t, enum wkern_op op, uint32_t s[4][3]) {
  uint32_t be = block_elems(t);
  uint32_t c[4];
  if (be == 1) {
    c[0] = 1, c[1] = 7, c[2] = 1000, c[3] = 33;
  } else {
    c[0] = be, c[1] = 3 * be, c[2] = be * (1024 / be), c[3] = 2 * be;
  }
  static const uint32_t mv[4][2] = {{1, 1}, {37, 3}, {129, 8}, {65, 10}};
  static const uint32_t mm[4][2] = {{1, 1}, {45, 37}, {33, 70}, {130, 9}};
  for (int i = 0; i < 4; i++) {
    s[i][0] = op == WKERN_MATVEC ? mv[i][0] : mm[i][0];
    s[i][1] = c[i];
    s[i][2] = op == WKERN_MATVEC ? mv[i][1] : mm[i][1];
  }
}

static void check_type_op(enum dtype t, enum wkern_op op, const struct wkern_opts *opts,
                          const char *what) {
  struct wkern k;
  struct wkern_opts o = opts ? *opts : (struct wkern_opts){0};
  o.ops = 1u << op; /* pipelines take most of this suite's time on a CPU device */
  int rc = wkern_init(&k, fixture_device(), t, &o);
  KT_ASSERT_MSG(rc == 0, "wkern_init %s: %s (%s)", dtype_name(t), kvd_strerror(rc),
                gpu_error_detail());
  uint32_t s[4][3];
  shapes_for(t, op, s);
  double worst = 0;
  for (int i = 0; i < 4; i++) {
    bool acc = (i & 1) != 0;
    double e = check_mul(&k, op, s[i][0], s[i][1], s[i][2], acc, &rc);
    if (rc < 0) {
      wkern_destroy(&k);
      KT_ASSERT_MSG(0, "%s %s: %s (%s)", what, dtype_name(t), kvd_strerror(rc), gpu_error_detail());
    }
    CHECK_MSG(e < F32_TOL, "%s %s rows=%u cols=%u tokens=%u acc=%d: rel err %.3g", what,
              dtype_name(t), s[i][0], s[i][1], s[i][2], acc, e);
    if (!(e <= worst)) worst = e;
  }
  kt_log("%-17s %-6s max rel err %.2e", what, dtype_name(t), worst);
  wkern_destroy(&k);
}

KT_TEST(matvec_portable_every_type) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct wkern_opts o = {.subgroup = -1};
  for (size_t i = 0; i < N_TYPES; i++)
    check_type_op(all_types[i], WKERN_MATVEC, &o, "matvec");
  FIXTURE_CHECK_VALIDATION();
}

/* Rows per workgroup is a specialization constant: one row, and three (which leaves the last
 * workgroup of most shapes partly past the matrix). */
KT_TEST(matvec_other_row_counts_every_type) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  struct wkern_opts o1 = {.mv_rows = 1}, o3 = {.mv_rows = 3};
  for (size_t i = 0; i < N_TYPES; i++) {
    check_type_op(all_types[i], WKERN_MATVEC, &o1, "matvec_1row");
    check_type_op(all_types[i], WKERN_MATVEC, &o3, "matvec_3rows");
  }
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(matvec_subgroup_every_type) {
  FIXTURE_DEVICE(dev);
  if (!(gpu_device_caps(dev)->subgroup_ops & GPU_SG_ARITHMETIC)) {
    kt_log("no subgroup arithmetic: the portable variant is the one in use");
    return;
  }
  struct wkern_opts o = {.subgroup = 1};
  for (size_t i = 0; i < N_TYPES; i++)
    check_type_op(all_types[i], WKERN_MATVEC, &o, "matvec_sg");
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(matmul_every_type) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  for (size_t i = 0; i < N_TYPES; i++)
    check_type_op(all_types[i], WKERN_MATMUL, NULL, "matmul");
  FIXTURE_CHECK_VALIDATION();
}

/* Tile sizes are specialization constants: lopsided tiles with a K step below every group
 * window but the plain types' (16) and above all of them (128) must give the same answers. */
KT_TEST(matmul_other_tiles_every_type) {
  FIXTURE_DEVICE(dev);
  (void)dev;
  for (size_t i = 0; i < N_TYPES; i++) {
    struct wkern_opts o1 = {.mm_tm = 1, .mm_tn = 2, .mm_bk = 16};
    struct wkern_opts o2 = {.mm_tm = 2, .mm_tn = 1, .mm_bk = 128};
    check_type_op(all_types[i], WKERN_MATMUL, &o1, "matmul_16x32_k16");
    check_type_op(all_types[i], WKERN_MATMUL, &o2, "matmul_32x16_k128");
  }
  FIXTURE_CHECK_VALIDATION();
}

struct embed_arg {
  const struct wmat *table;
  struct gpu_buffer *ids;
  uint32_t n;
  const struct act *out;
};

static int record_embed(const struct wkern *k, struct gpu_cmd *cmd, const void *p) {
  const struct embed_arg *a = p;
  struct wkern_matrix tm = {a->table->buf, a->table->off, a->table->rows, a->table->cols};
  struct wkern_act ov = act_view(a->out);
  return wkern_embed(k, cmd, &tm, a->ids, 4, a->n, &ov);
}

/* Looks up n random ids (repeats, the first and last row, and one id past the table whose output
 * row must stay untouched) and compares bit for bit with dtype_dequant_row. */
static void check_embed(const struct wkern *k, uint32_t n_vocab, uint32_t dim, uint32_t n) {
  struct wmat w;
  struct act out;
  memset(&out, 0, sizeof out);
  uint32_t *ids = malloc((n + 1) * sizeof *ids);
  KT_ASSERT(ids);
  ids[0] = 0xdeadbeef; /* ids start one word into their buffer */
  for (uint32_t i = 1; i <= n; i++)
    ids[i] = kt_rand_range(0, n_vocab - 1);
  ids[1] = n_vocab - 1;
  if (n > 1) ids[2] = 0;
  if (n > 2) ids[n] = n_vocab; /* out of range: skipped */
  struct gpu_buffer *bids = fixture_upload(ids, (n + 1) * sizeof *ids);
  int rc = bids ? wmat_make(&w, k->type, n_vocab, dim, kt_rand_range(0, 7), NULL) : KVD_ENOMEM;
  if (rc == 0) rc = act_make(&out, n, dim);
  struct embed_arg arg = {&w, bids, n, &out};
  if (rc == 0) rc = run_recorded(k, record_embed, &arg);
  float *got = rc == 0 ? fixture_download(out.buf, out.len * 4) : NULL;
  size_t bad = 0;
  for (size_t i = 0; got && i < out.len; i++) {
    const float *want = &out.host[i]; /* untouched unless it is a looked-up value */
    size_t j = i - out.off;
    if (i >= out.off && j % out.stride < dim && ids[1 + j / out.stride] < n_vocab)
      want = &w.deq[(size_t)ids[1 + j / out.stride] * dim + j % out.stride];
    if (memcmp(&got[i], want, 4) != 0) bad++;
  }
  free(got);
  free(ids);
  gpu_buffer_free(bids);
  wmat_free(&w);
  act_free(&out);
  KT_ASSERT_MSG(rc == 0, "embed %s: %s (%s)", dtype_name(k->type), kvd_strerror(rc),
                gpu_error_detail());
  CHECK_MSG(bad == 0, "embed %s vocab=%u dim=%u n=%u: %zu wrong words", dtype_name(k->type),
            n_vocab, dim, n, bad);
}

KT_TEST(embed_every_type_bit_exact) {
  FIXTURE_DEVICE(dev);
  for (size_t i = 0; i < N_TYPES; i++) {
    enum dtype t = all_types[i];
    struct wkern k;
    int rc = wkern_init(&k, dev, t, &(struct wkern_opts){.ops = 1u << WKERN_EMBED});
    KT_ASSERT_MSG(rc == 0, "wkern_init %s: %s", dtype_name(t), kvd_strerror(rc));
    uint32_t be = block_elems(t);
    check_embed(&k, 1, be == 1 ? 5 : be, 1);
    check_embed(&k, 50, be == 1 ? 67 : 3 * be, 7);
    check_embed(&k, 37, be == 1 ? 1000 : be * (1024 / be), 70);
    wkern_destroy(&k);
  }
  FIXTURE_CHECK_VALIDATION();
}

/* Bindings capped far below maxStorageBufferRange force the row and token splits a 7B model's
 * output matrix or a long prefill takes on a real device: every chunk binds at an aligned offset
 * with the remainder pushed, and the pieces must add up to the unsplit result. */
KT_TEST(row_and_token_splits) {
  FIXTURE_DEVICE(dev);
  static const enum dtype types[] = {DTYPE_Q4_0, DTYPE_Q6_K, DTYPE_F16};
  for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
    enum dtype t = types[i];
    uint64_t rb;
    uint32_t cols = block_elems(t) == 1 ? 301 : 2 * block_elems(t);
    KT_ASSERT_OK(dtype_row_bytes(t, cols, &rb));
    /* ~5 rows and ~1 token of 300 floats per binding */
    struct wkern_opts o = {.max_binding = 5 * rb + 3 > 1300 ? 5 * rb + 3 : 1300};
    struct wkern k;
    KT_ASSERT_OK(wkern_init(&k, dev, t, &o));
    int rc;
    double e1 = check_mul(&k, WKERN_MATVEC, 53, cols, 11, true, &rc);
    double e2 = rc == 0 ? check_mul(&k, WKERN_MATMUL, 41, cols, 19, false, &rc) : INFINITY;
    if (rc == 0) check_embed(&k, 29, cols, 9);
    wkern_destroy(&k);
    KT_ASSERT_MSG(rc == 0, "split %s: %s (%s)", dtype_name(t), kvd_strerror(rc),
                  gpu_error_detail());
    CHECK_MSG(e1 < F32_TOL && e2 < F32_TOL, "split %s: rel err %.3g / %.3g", dtype_name(t), e1, e2);
  }
  FIXTURE_CHECK_VALIDATION();
}

/* Shape and buffer checks happen on the host, before anything is recorded. `call` runs alone in a
 * fresh recording: it must be refused with `want`, and since the refusal is stored in the gpu_cmd
 * (errors are sticky, gpu.h), so must the submission. */
#define CHECK_REFUSED(cmd, call, want)                                                             \
  do {                                                                                             \
    KT_ASSERT_OK(gpu_cmd_begin(cmd));                                                              \
    KT_CHECK_EQ((call), (want));                                                                   \
    KT_CHECK_EQ(gpu_cmd_submit(cmd), (want));                                                      \
  } while (0)

KT_TEST(bad_shapes_are_refused) {
  FIXTURE_DEVICE(dev);
  struct wkern k;
  KT_CHECK_EQ(wkern_init(&k, dev, DTYPE_Q2_K, NULL), KVD_E_UNSUPPORTED);
  KT_CHECK(wkern_variant(DTYPE_Q2_K, WKERN_MATVEC, false) == NULL);
  KT_CHECK(wkern_variant(DTYPE_Q4_K, WKERN_MATVEC, true) != NULL);
  uint64_t bytes = 0;
  KT_CHECK_EQ(wkern_weight_bytes(DTYPE_Q4_0, 3, 33, &bytes), KVD_EINVAL);
  KT_ASSERT_OK(wkern_weight_bytes(DTYPE_Q4_0, 3, 32, &bytes));
  KT_CHECK_EQ(bytes, 56); /* 54 rounded up to a word */
  struct wkern_opts no_embed = {.ops = (1u << WKERN_MATVEC) | (1u << WKERN_MATMUL)};
  KT_ASSERT_OK(wkern_init(&k, dev, DTYPE_Q4_0, &no_embed));
  struct gpu_buffer *b;
  KT_ASSERT_OK(gpu_buffer_new(dev, 54, GPU_MEM_DEVICE, "short", &b));
  struct gpu_buffer *a;
  KT_ASSERT_OK(gpu_buffer_new(dev, 4096, GPU_MEM_DEVICE, "act", &a));
  struct gpu_cmd *cmd;
  KT_ASSERT_OK(gpu_cmd_new(dev, &cmd));
  struct wkern_matrix w = {b, 0, 3, 32};
  struct wkern_act x = {a, 0, 32}, y = {a, 2048, 3};
  /* 54 bytes hold the rows but not the word that ends them */
  CHECK_REFUSED(cmd, wkern_matvec(&k, cmd, &w, &x, &y, 1, false), KVD_ERANGE);
  w.cols = 48;
  CHECK_REFUSED(cmd, wkern_matvec(&k, cmd, &w, &x, &y, 1, false), KVD_EINVAL);
  w.cols = 32;
  x.stride = 31;
  CHECK_REFUSED(cmd, wkern_matmul(&k, cmd, &w, &x, &y, 1, false), KVD_EINVAL);
  x.stride = 32;
  struct wkern kf;
  KT_ASSERT_OK(wkern_init(&kf, dev, DTYPE_F32, &(struct wkern_opts){.ops = 1u << WKERN_MATVEC}));
  struct wkern_matrix wf = {a, 2, 3, 32}; /* F32 values must be whole words */
  CHECK_REFUSED(cmd, wkern_matvec(&kf, cmd, &wf, &x, &y, 1, false), KVD_EINVAL);
  wf.offset = 0;
  KT_ASSERT_OK(gpu_cmd_begin(cmd));
  KT_CHECK_EQ(wkern_matvec(&kf, cmd, &wf, &x, &y, 1, false), 0);
  KT_CHECK_EQ(gpu_cmd_submit(cmd), 0);
  KT_CHECK_EQ(gpu_cmd_wait(cmd), 0);
  CHECK_REFUSED(cmd, wkern_matmul(&kf, cmd, &wf, &x, &y, 1, false), KVD_EINVAL); /* not created */
  wkern_destroy(&kf);
  struct gpu_buffer *ids = b;
  CHECK_REFUSED(cmd, wkern_embed(&k, cmd, &w, ids, 0, 1, &y), KVD_EINVAL); /* not created */
  gpu_cmd_free(cmd);
  gpu_buffer_free(a);
  gpu_buffer_free(b);
  wkern_destroy(&k);
  FIXTURE_CHECK_VALIDATION();
}

/* A real model's tensors: wide-synth-q4_k_m carries Q4_K layers, a Q6_K classifier and a Q4_K
 * token embedding, as llama-quantize wrote them. */
static void check_real_tensor(const struct gguf_file *f, const char *name, enum dtype want) {
  const struct gguf_tensor *t = gguf_find_tensor(f, name);
  KT_ASSERT_MSG(t, "%s missing", name);
  KT_ASSERT_MSG(t->type == want, "%s is %s", name, dtype_name(t->type));
  uint32_t cols = (uint32_t)t->ne[0], rows = (uint32_t)t->ne[1];
  struct wkern k;
  KT_ASSERT_OK(wkern_init(&k, fixture_device(), t->type, NULL));
  struct wmat w;
  int rc = wmat_make(&w, t->type, rows, cols, 6, t->data); /* 6: not even word-aligned */
  struct act x, y, y2;
  memset(&x, 0, sizeof x);
  memset(&y, 0, sizeof y);
  memset(&y2, 0, sizeof y2);
  if (rc == 0) rc = act_make(&x, 20, cols);
  if (rc == 0) rc = act_make(&y, 3, rows);
  if (rc == 0) rc = act_make(&y2, 20, rows);
  /* Decode (3 tokens, accumulating) and prefill (20 tokens) against ref_matvec. */
  struct act x3 = x;
  x3.n = 3;
  struct mul_arg mv = {WKERN_MATVEC, &w, &x3, &y, true}, mm = {WKERN_MATMUL, &w, &x, &y2, false};
  if (rc == 0) rc = run_recorded(&k, record_mul, &mv);
  if (rc == 0) rc = run_recorded(&k, record_mul, &mm);
  float *g1 = rc == 0 ? fixture_download(y.buf, y.len * 4) : NULL;
  float *g2 = rc == 0 ? fixture_download(y2.buf, y2.len * 4) : NULL;
  float *ref = malloc(rows * sizeof(float)), *scratch = malloc(cols * sizeof(float));
  double e_mv = INFINITY, e_mm = INFINITY, e_ref = 0;
  if (g1 && g2 && ref && scratch) {
    e_mv = mul_err(&w, &x3, &y, g1, true);
    e_mm = mul_err(&w, &x, &y2, g2, false);
    /* ref_matvec on the file's own bytes (float output) for token 0 of the prefill. */
    rc = ref_matvec(ref, t->type, t->data, x.host + x.off, rows, cols, scratch);
    for (uint32_t r = 0; rc == 0 && r < rows; r++) {
      double mag = 0;
      for (uint32_t c = 0; c < cols; c++)
        mag += fabs((double)w.deq[(size_t)r * cols + c] * x.host[x.off + c]);
      double e = fabs(g2[y2.off + r] - ref[r]) / (mag > 1e-30 ? mag : 1e-30);
      if (!(e <= e_ref)) e_ref = e;
    }
  }
  free(g1);
  free(g2);
  free(ref);
  free(scratch);
  act_free(&x);
  act_free(&y);
  act_free(&y2);
  wmat_free(&w);
  wkern_destroy(&k);
  KT_ASSERT_MSG(rc == 0, "%s: %s (%s)", name, kvd_strerror(rc), gpu_error_detail());
  kt_log("%s (%s, %u x %u): matvec %.2e, matmul %.2e, vs ref_matvec %.2e", name, dtype_name(want),
         rows, cols, e_mv, e_mm, e_ref);
  CHECK_MSG(e_mv < F32_TOL && e_mm < F32_TOL && e_ref < F32_TOL, "%s: %.3g %.3g %.3g", name, e_mv,
            e_mm, e_ref);
}

KT_TEST(real_model_q4_k_and_q6_k) {
  FIXTURE_DEVICE(dev);
  const char *path = kt_shared_path("models/quant/wide-synth-q4_k_m.gguf");
  if (!path) KT_SKIP("models/quant/wide-synth-q4_k_m.gguf not found");
  struct gguf_file *f;
  struct gguf_error err;
  int rc = gguf_open(path, &f, &err);
  KT_ASSERT_MSG(rc == 0, "gguf_open: %s at %llu", err.msg, (unsigned long long)err.offset);
  check_real_tensor(f, "blk.0.ffn_gate.weight", DTYPE_Q4_K);
  check_real_tensor(f, "blk.0.ffn_down.weight", DTYPE_Q4_K);
  check_real_tensor(f, "output.weight", DTYPE_Q6_K);

  /* The token embedding: a few ids, bit-exact against the CPU dequantizer. */
  const struct gguf_tensor *te = gguf_find_tensor(f, "token_embd.weight");
  KT_ASSERT(te && te->type == DTYPE_Q4_K);
  uint32_t dim = (uint32_t)te->ne[0], vocab = (uint32_t)te->ne[1];
  struct wkern k;
  KT_ASSERT_OK(wkern_init(&k, dev, te->type, NULL));
  struct wmat w;
  struct act out;
  memset(&out, 0, sizeof out);
  uint32_t ids[6] = {0, 1, vocab - 1, kt_rand_range(0, vocab - 1), kt_rand_range(0, vocab - 1), 0};
  struct gpu_buffer *bids = fixture_upload(ids, sizeof ids);
  rc = bids ? wmat_make(&w, te->type, vocab, dim, 0, te->data) : KVD_ENOMEM;
  if (rc == 0) rc = act_make(&out, 5, dim);
  struct embed_arg arg = {&w, bids, 5, &out};
  if (rc == 0) rc = run_recorded(&k, record_embed, &arg);
  float *got = rc == 0 ? fixture_download(out.buf, out.len * 4) : NULL;
  size_t bad = 0;
  for (uint32_t t = 0; got && t < 5; t++) /* record_embed reads ids from word 1 on */
    bad += memcmp(got + out.off + t * out.stride, w.deq + (size_t)ids[t + 1] * dim,
                  dim * sizeof(float)) != 0;
  free(got);
  gpu_buffer_free(bids);
  act_free(&out);
  wmat_free(&w);
  wkern_destroy(&k);
  gguf_close(f);
  KT_ASSERT_OK(rc);
  KT_CHECK_EQ(bad, 0);
  FIXTURE_CHECK_VALIDATION();
}
