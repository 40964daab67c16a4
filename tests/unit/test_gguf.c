/* GGUF reader, printer, writer and synthetic generator.
 *
 * The reader is checked against the real models in ../shared/models (known facts from
 * SOURCES.md), against every truncation of a real file's header and tensor-info region, and
 * against hand-built files with one field corrupted at a time: each must give KVD_E_FORMAT with a
 * message naming the field, never a crash (the ASan build checks the "never reads out of
 * bounds" half: every buffer handed to the reader is an exact-size heap copy). */
#include "kt.h"

#include "gguf.h"
#include "gguf_write.h"
#include "kvd_error.h"
#include "ref.h"
#include "synth.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- helpers ---- */

static bool read_all(const char *path, uint8_t **ret, size_t *ret_size) {
  FILE *f = fopen(path, "rb");
  if (!f) return false;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  uint8_t *p = malloc(n > 0 ? (size_t)n : 1);
  bool ok = p && n >= 0 && fread(p, 1, (size_t)n, f) == (size_t)n;
  fclose(f);
  if (!ok) {
    free(p);
    return false;
  }
  *ret = p;
  *ret_size = (size_t)n;
  return true;
}

/* Opens an exact-size heap copy of p[0, n) (so ASan sees any read past n) and closes it again. */
static int open_copy(const uint8_t *p, size_t n, struct gguf_error *err) {
  uint8_t *copy = n ? malloc(n) : NULL;
  if (n) memcpy(copy, p, n);
  struct gguf_file *f = NULL;
  int rc = gguf_open_memory(copy, n, &f, err);
  if (rc == 0) gguf_close(f);
  free(copy);
  return rc;
}

#define EXPECT_FORMAT(buf, n, substr)                                                              \
  do {                                                                                             \
    struct gguf_error e_;                                                                          \
    int rc_ = open_copy((buf), (n), &e_);                                                          \
    KT_ASSERT_MSG(rc_ == KVD_E_FORMAT, "rc %d, want KVD_E_FORMAT (msg '%s')", rc_, e_.msg);        \
    KT_ASSERT_MSG(strstr(e_.msg, (substr)) != NULL, "message '%s' lacks '%s'", e_.msg, (substr));  \
  } while (0)

static void put_u32(uint8_t *p, size_t at, uint32_t v) {
  for (int i = 0; i < 4; i++)
    p[at + (size_t)i] = (uint8_t)(v >> (8 * i));
}

static void put_u64(uint8_t *p, size_t at, uint64_t v) {
  for (int i = 0; i < 8; i++)
    p[at + (size_t)i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_u64(const uint8_t *p, size_t at) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++)
    v |= (uint64_t)p[at + (size_t)i] << (8 * i);
  return v;
}

/* The file offset of a tensor info (its name's length field), found by its name. */
static size_t find_tinfo(const uint8_t *p, size_t n, const char *name) {
  size_t len = strlen(name);
  for (size_t at = 24; at + 8 + len <= n; at++)
    if (get_u64(p, at) == len && memcmp(p + at + 8, name, len) == 0) return at;
  return 0;
}

/* A byte builder for hand-made files. */
struct bb {
  uint8_t *p;
  size_t n, cap;
};

static void bb_raw(struct bb *b, const void *d, size_t n) {
  if (b->n + n > b->cap) {
    b->cap = (b->n + n) * 2 + 64;
    b->p = realloc(b->p, b->cap);
    if (!b->p) abort();
  }
  memcpy(b->p + b->n, d, n);
  b->n += n;
}

static void bb_u32(struct bb *b, uint32_t v) {
  uint8_t t[4];
  put_u32(t, 0, v);
  bb_raw(b, t, 4);
}

static void bb_u64(struct bb *b, uint64_t v) {
  uint8_t t[8];
  put_u64(t, 0, v);
  bb_raw(b, t, 8);
}

static void bb_str(struct bb *b, const char *s) {
  bb_u64(b, strlen(s));
  bb_raw(b, s, strlen(s));
}

static void bb_header(struct bb *b, uint64_t n_tensors, uint64_t n_kv) {
  bb_raw(b, "GGUF", 4);
  bb_u32(b, 3);
  bb_u64(b, n_tensors);
  bb_u64(b, n_kv);
}

static void bb_tinfo(struct bb *b, const char *name, uint32_t n_dims, const uint64_t *ne,
                     uint32_t type, uint64_t offset) {
  bb_str(b, name);
  bb_u32(b, n_dims);
  for (uint32_t d = 0; d < n_dims; d++)
    bb_u64(b, ne[d]);
  bb_u32(b, type);
  bb_u64(b, offset);
}

static void bb_pad_zero(struct bb *b, size_t align, size_t extra) {
  static const uint8_t z[4096];
  while (b->n % align)
    bb_raw(b, z, 1);
  while (extra) {
    size_t k = extra < sizeof z ? extra : sizeof z;
    bb_raw(b, z, k);
    extra -= k;
  }
}

/* A file with one tensor with the given info and `data` bytes of zeros after the infos. */
static struct bb one_tensor(uint32_t n_dims, const uint64_t *ne, uint32_t type, uint64_t offset,
                            size_t data) {
  struct bb b = {0};
  bb_header(&b, 1, 0);
  bb_tinfo(&b, "t", n_dims, ne, type, offset);
  bb_pad_zero(&b, 32, data);
  return b;
}

static const char *model(const char *rel) {
  return kt_shared_path(rel);
}

/* ---- real models ---- */

KT_TEST(stories260K_known_facts) {
  const char *path = model("models/stories260K.gguf");
  if (!path) KT_SKIP("models/stories260K.gguf not found");
  struct gguf_file *f;
  struct gguf_error err;
  KT_ASSERT_OK(gguf_open(path, &f, &err));
  KT_CHECK_EQ(f->version, 3);
  KT_CHECK_EQ(f->n_tensors, 48);
  KT_CHECK_EQ(f->n_kv, 19);
  KT_CHECK_EQ(f->alignment, 32);
  KT_CHECK(f->mapped);
  KT_CHECK_EQ(f->size, 1185376);
  KT_CHECK_EQ(f->data_offset, 14176);

  struct gguf_str s;
  KT_ASSERT_OK(gguf_get_str(f, "general.architecture", &s));
  KT_CHECK(gguf_str_eq(s, "llama"));
  const struct gguf_value *tokens;
  KT_ASSERT_OK(gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_VT_STRING, &tokens));
  KT_CHECK_EQ(tokens->v.arr.count, 512);
  KT_CHECK(gguf_str_eq(tokens->v.arr.elems[0].v.str, "<unk>"));
  KT_CHECK(gguf_str_eq(tokens->v.arr.elems[1].v.str, "<s>"));
  KT_CHECK(gguf_str_eq(tokens->v.arr.elems[3].v.str, "<0x00>"));
  KT_CHECK(gguf_str_eq(tokens->v.arr.elems[403].v.str, "\xe2\x96\x81Once"));
  const struct gguf_value *types;
  KT_ASSERT_OK(gguf_get_arr(f, "tokenizer.ggml.token_type", GGUF_VT_INT32, &types));
  struct gguf_value e;
  KT_ASSERT_OK(gguf_arr_get(types, 0, &e));
  KT_CHECK_EQ(e.v.i64, 2);
  KT_ASSERT_OK(gguf_arr_get(types, 3, &e));
  KT_CHECK_EQ(e.v.i64, 6);
  KT_CHECK_EQ(gguf_arr_get(types, 512, &e), KVD_ERANGE);

  const struct gguf_tensor *t = gguf_find_tensor(f, "token_embd.weight");
  KT_ASSERT(t != NULL);
  KT_CHECK_EQ(t->n_dims, 2);
  KT_CHECK_EQ(t->ne[0], 64);
  KT_CHECK_EQ(t->ne[1], 512);
  KT_CHECK_EQ(t->ne[2], 1);
  KT_CHECK_EQ(t->type, DTYPE_F32);
  KT_CHECK_EQ(t->nbytes, 64 * 512 * 4);
  KT_CHECK_EQ(gguf_tensor_nelements(t), 64 * 512);
  KT_CHECK((const uint8_t *)t->data == f->base + f->data_offset + t->offset);
  t = gguf_find_tensor(f, "blk.4.ffn_down.weight");
  KT_ASSERT(t != NULL);
  KT_CHECK_EQ(t->ne[0], 172);
  KT_CHECK_EQ(t->ne[1], 64);
  KT_CHECK(gguf_find_tensor(f, "blk.5.ffn_down.weight") == NULL);
  KT_CHECK(gguf_find_tensor(f, "") == NULL);
  /* the first embedding value is a plain float in the mapping */
  float x;
  memcpy(&x, gguf_find_tensor(f, "token_embd.weight")->data, sizeof x);
  KT_CHECK(isfinite(x));
  gguf_close(f);
}

KT_TEST(typed_getters_convert_or_refuse) {
  const char *path = model("models/stories260K.gguf");
  if (!path) KT_SKIP("models/stories260K.gguf not found");
  struct gguf_file *f;
  KT_ASSERT_OK(gguf_open(path, &f, NULL));
  uint32_t u32 = 7;
  uint64_t u64 = 7;
  int64_t i64 = 7;
  float f32 = 7;
  bool b = true;
  struct gguf_str s;
  const struct gguf_value *arr;
  KT_CHECK_EQ(gguf_get_u32(f, "llama.embedding_length", &u32), 0);
  KT_CHECK_EQ(u32, 64);
  KT_CHECK_EQ(gguf_get_u64(f, "llama.block_count", &u64), 0);
  KT_CHECK_EQ(u64, 5);
  KT_CHECK_EQ(gguf_get_i64(f, "llama.attention.head_count_kv", &i64), 0);
  KT_CHECK_EQ(i64, 4);
  KT_CHECK_EQ(gguf_get_u32(f, "tokenizer.ggml.padding_token_id", &u32), 0);
  KT_CHECK(u32 == UINT32_MAX);
  KT_CHECK_EQ(gguf_get_f32(f, "llama.attention.layer_norm_rms_epsilon", &f32), 0);
  KT_CHECK(fabsf(f32 - 1e-5f) < 1e-9f);
  /* wrong types: the output stays untouched */
  u32 = 99;
  KT_CHECK_EQ(gguf_get_u32(f, "general.architecture", &u32), KVD_E_FORMAT);
  KT_CHECK_EQ(u32, 99);
  KT_CHECK_EQ(gguf_get_f32(f, "llama.block_count", &f32), KVD_E_FORMAT);
  KT_CHECK_EQ(gguf_get_bool(f, "llama.block_count", &b), KVD_E_FORMAT);
  KT_CHECK_EQ(gguf_get_str(f, "llama.block_count", &s), KVD_E_FORMAT);
  KT_CHECK_EQ(gguf_get_u32(f, "tokenizer.ggml.tokens", &u32), KVD_E_FORMAT);
  KT_CHECK_EQ(gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_VT_INT32, &arr), KVD_E_FORMAT);
  KT_CHECK_EQ(gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_VT_COUNT, &arr), 0);
  KT_CHECK_EQ(gguf_get_arr(f, "general.name", GGUF_VT_COUNT, &arr), KVD_E_FORMAT);
  /* missing keys */
  KT_CHECK_EQ(gguf_get_u32(f, "llama.nope", &u32), KVD_ENOENT);
  KT_CHECK_EQ(gguf_get_str(f, "", &s), KVD_ENOENT);
  KT_CHECK(gguf_find_kv(f, "general.alignment") == NULL);
  KT_CHECK(gguf_find_kv(f, NULL) == NULL);
  KT_CHECK(gguf_find_kv(NULL, "x") == NULL);
  KT_CHECK_EQ(gguf_get_u32(NULL, "x", &u32), KVD_EINVAL);
  gguf_close(f);
  gguf_close(NULL);
}

KT_TEST(vocab_files_open_with_no_tensors) {
  const char *names[] = {"models/vocab/ggml-vocab-llama-spm.gguf",
                         "models/vocab/ggml-vocab-gpt-2.gguf"};
  for (size_t i = 0; i < 2; i++) {
    const char *path = model(names[i]);
    if (!path) KT_SKIP("%s not found", names[i]);
    struct gguf_file *f;
    struct gguf_error err;
    int rc = gguf_open(path, &f, &err);
    KT_ASSERT_MSG(rc == 0, "%s: %d %s", names[i], rc, err.msg);
    KT_CHECK_EQ(f->n_tensors, 0);
    KT_CHECK(f->n_kv > 10);
    KT_CHECK(f->data_offset <= f->size);
    const struct gguf_value *tokens;
    KT_ASSERT_OK(gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_VT_STRING, &tokens));
    KT_CHECK(tokens->v.arr.count == 32000 || tokens->v.arr.count == 50257);
    gguf_close(f);
  }
}

KT_TEST(quantized_files_have_the_documented_types) {
  static const struct {
    const char *file;
    unsigned n_tensors;
    enum dtype main;
    unsigned n_main;
  } cases[] = {
      {"models/quant/stories260K-q8_0.gguf", 48, DTYPE_Q8_0, 32},
      {"models/quant/stories260K-q4_0.gguf", 48, DTYPE_Q4_0, 31},
      {"models/quant/stories260K-q4_1.gguf", 48, DTYPE_Q4_1, 31},
      {"models/quant/stories260K-q5_0.gguf", 48, DTYPE_Q5_0, 31},
      {"models/quant/stories260K-q5_1.gguf", 48, DTYPE_Q5_1, 31},
      {"models/quant/wide-synth-q4_k_m.gguf", 39, DTYPE_Q4_K, 25},
      {"models/quant/wide-synth-q5_k_m.gguf", 39, DTYPE_Q5_K, 25},
      {"models/quant/wide-synth-q6_k.gguf", 39, DTYPE_Q6_K, 30},
      {"models/quant/wide-synth-q8_0.gguf", 39, DTYPE_Q8_0, 30},
      {"models/quant/wide-synth-bf16.gguf", 39, DTYPE_BF16, 30},
      {"models/quant/wide-synth-f16.gguf", 39, DTYPE_F16, 30},
      {"models/stories260K-f16.gguf", 47, DTYPE_F16, 36},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const char *path = model(cases[i].file);
    if (!path) KT_SKIP("%s not found", cases[i].file);
    struct gguf_file *f;
    struct gguf_error err;
    int rc = gguf_open(path, &f, &err);
    KT_ASSERT_MSG(rc == 0, "%s: %d %s", cases[i].file, rc, err.msg);
    KT_CHECK_EQ(f->n_tensors, cases[i].n_tensors);
    unsigned n_main = 0, n_f32 = 0;
    for (uint64_t k = 0; k < f->n_tensors; k++) {
      n_main += f->tensors[k].type == cases[i].main;
      n_f32 += f->tensors[k].type == DTYPE_F32;
    }
    KT_CHECK_EQ(n_main, cases[i].n_main);
    KT_CHECK(n_f32 == 9 || n_f32 == 11);
    gguf_close(f);
  }
}

KT_TEST(every_truncation_fails_cleanly) {
  const char *path = model("models/stories260K.gguf");
  if (!path) KT_SKIP("models/stories260K.gguf not found");
  uint8_t *buf;
  size_t size;
  KT_ASSERT(read_all(path, &buf, &size));
  /* Every byte of the header, kv and tensor-info region and the padding, then sampled cuts
   * through the data (the last tensor ends exactly at the end of this file). */
  size_t data_offset = 14176;
  for (size_t cut = 0; cut < size; cut += cut <= data_offset + 64 ? 1 : 29989) {
    struct gguf_error err;
    int rc = open_copy(buf, cut, &err);
    if (rc != KVD_E_FORMAT || err.msg[0] == '\0' || err.offset > cut) {
      kt__fail(__FILE__, __LINE__, "cut at %zu: rc %d offset %llu msg '%s'", cut, rc,
               (unsigned long long)err.offset, err.msg);
      break;
    }
  }
  struct gguf_error err;
  KT_CHECK_EQ(open_copy(buf, size - 1, &err), KVD_E_FORMAT);
  KT_CHECK(strstr(err.msg, "blk.4.ffn_norm.weight") != NULL);
  KT_CHECK(strstr(err.msg, "past end of file") != NULL);
  KT_CHECK_EQ(open_copy(buf, size, &err), 0);
  free(buf);
}

KT_TEST(truncated_vocab_files_fail_cleanly) {
  const char *path = model("models/vocab/ggml-vocab-llama-spm.gguf");
  if (!path) KT_SKIP("vocab file not found");
  uint8_t *buf;
  size_t size;
  KT_ASSERT(read_all(path, &buf, &size));
  for (size_t cut = 0; cut < size; cut += cut < 4096 ? 1 : 7919) {
    struct gguf_error err;
    int rc = open_copy(buf, cut, &err);
    if (rc != KVD_E_FORMAT) {
      kt__fail(__FILE__, __LINE__, "cut at %zu: rc %d msg '%s'", cut, rc, err.msg);
      break;
    }
  }
  free(buf);
}

KT_TEST(file_errors_map_to_codes) {
  struct gguf_file *f = NULL;
  struct gguf_error err;
  KT_CHECK_EQ(gguf_open("/nonexistent/model.gguf", &f, &err), KVD_ENOENT);
  KT_CHECK(err.msg[0] != '\0');
  KT_CHECK_EQ(gguf_open(kt_tmp_dir(), &f, &err), KVD_EINVAL);
  KT_CHECK_EQ(gguf_open(NULL, &f, &err), KVD_EINVAL);
  KT_CHECK_EQ(gguf_open_memory(NULL, 5, &f, &err), KVD_EINVAL);
  KT_CHECK_EQ(gguf_open_memory(NULL, 0, &f, &err), KVD_E_FORMAT);

  /* short files on disk go through the mmap path, the empty one through none */
  static const uint8_t head[24] = {'G', 'G', 'U', 'F', 3};
  char path[512];
  snprintf(path, sizeof path, "%s/short.gguf", kt_tmp_dir());
  for (size_t n = 0; n <= sizeof head; n++) {
    FILE *out = fopen(path, "wb");
    KT_ASSERT(out != NULL);
    fwrite(head, 1, n, out);
    fclose(out);
    int rc = gguf_open(path, &f, &err);
    if (n < sizeof head) {
      KT_ASSERT_MSG(rc == KVD_E_FORMAT, "%zu bytes: rc %d", n, rc);
    } else {
      /* 24 bytes with zero counts is the smallest valid file */
      KT_ASSERT_MSG(rc == 0, "%zu bytes: rc %d %s", n, rc, err.msg);
      KT_CHECK_EQ(f->n_kv, 0);
      KT_CHECK_EQ(f->n_tensors, 0);
      gguf_close(f);
    }
  }
}

/* ---- corrupted fields ---- */

KT_TEST(bad_magic_and_versions) {
  const char *path = model("models/stories260K.gguf");
  if (!path) KT_SKIP("models/stories260K.gguf not found");
  uint8_t *buf;
  size_t size;
  KT_ASSERT(read_all(path, &buf, &size));
  uint8_t *c = malloc(size);
  KT_ASSERT(c != NULL);

  memcpy(c, buf, size);
  c[0] = 'X';
  EXPECT_FORMAT(c, size, "bad magic");
  memcpy(c, "tjgg", 4); /* a GGJT file */
  EXPECT_FORMAT(c, size, "legacy");

  memcpy(c, buf, size);
  put_u32(c, 4, 1);
  EXPECT_FORMAT(c, size, "version 1");
  put_u32(c, 4, 4);
  EXPECT_FORMAT(c, size, "version 4");
  put_u32(c, 4, 0);
  EXPECT_FORMAT(c, size, "version 0");
  put_u32(c, 4, 0x03000000);
  EXPECT_FORMAT(c, size, "big-endian");
  put_u32(c, 4, 2); /* v2 has the v3 layout */
  struct gguf_error err;
  KT_CHECK_EQ(open_copy(c, size, &err), 0);

  free(c);
  free(buf);
}

KT_TEST(huge_counts_and_lengths) {
  const char *path = model("models/stories260K.gguf");
  if (!path) KT_SKIP("models/stories260K.gguf not found");
  uint8_t *buf;
  size_t size;
  KT_ASSERT(read_all(path, &buf, &size));
  uint8_t *c = malloc(size);
  KT_ASSERT(c != NULL);
  struct gguf_error err;

  memcpy(c, buf, size);
  put_u64(c, 8, UINT64_MAX);
  EXPECT_FORMAT(c, size, "tensor count");
  put_u64(c, 8, 1ull << 40);
  EXPECT_FORMAT(c, size, "tensor count");
  memcpy(c, buf, size);
  put_u64(c, 16, UINT64_MAX);
  EXPECT_FORMAT(c, size, "kv count");
  put_u64(c, 16, size / 14);
  EXPECT_FORMAT(c, size, "kv");
  /* Counts off by one misread what follows; whatever that gives, it must not crash. */
  for (int d = -1; d <= 1; d += 2) {
    memcpy(c, buf, size);
    put_u64(c, 8, (uint64_t)(48 + d));
    (void)open_copy(c, size, &err);
    memcpy(c, buf, size);
    put_u64(c, 16, (uint64_t)(19 + d));
    (void)open_copy(c, size, &err);
  }

  /* the first key's length, then the first token string's length */
  memcpy(c, buf, size);
  put_u64(c, 24, UINT64_MAX);
  EXPECT_FORMAT(c, size, "kv 0: key length 18446744073709551615 past end of file");
  put_u64(c, 24, size);
  EXPECT_FORMAT(c, size, "past end of file");
  memcpy(c, buf, size);
  put_u64(c, 24, 0);
  EXPECT_FORMAT(c, size, "empty key");
  /* tokenizer.ggml.tokens: key at 24, type at 53, element type at 57, count at 61 */
  memcpy(c, buf, size);
  put_u64(c, 61, 1ull << 60);
  EXPECT_FORMAT(c, size, "array of");
  memcpy(c, buf, size);
  put_u64(c, 69, 1ull << 62);
  EXPECT_FORMAT(c, size, "tokenizer.ggml.tokens'[0]: string length");
  memcpy(c, buf, size);
  put_u32(c, 53, 13);
  EXPECT_FORMAT(c, size, "unknown value type 13");
  put_u32(c, 53, UINT32_MAX);
  EXPECT_FORMAT(c, size, "unknown value type");
  memcpy(c, buf, size);
  put_u32(c, 57, 13);
  EXPECT_FORMAT(c, size, "unknown array element type 13");

  free(c);
  free(buf);
}

KT_TEST(tensor_info_fields_of_a_real_file) {
  const char *path = model("models/stories260K.gguf");
  if (!path) KT_SKIP("models/stories260K.gguf not found");
  uint8_t *buf;
  size_t size;
  KT_ASSERT(read_all(path, &buf, &size));
  uint8_t *c = malloc(size);
  KT_ASSERT(c != NULL);
  size_t at = find_tinfo(buf, 14176, "output.weight");
  KT_ASSERT(at != 0);
  size_t ndims_at = at + 8 + 13, ne_at = ndims_at + 4, type_at = ne_at + 16, off_at = type_at + 4;
  KT_ASSERT_EQ(get_u64(buf, ne_at), 64);

  memcpy(c, buf, size);
  put_u64(c, off_at, 1ull << 40);
  EXPECT_FORMAT(c, size, "tensor 2 'output.weight': data [");
  EXPECT_FORMAT(c, size, "past end of file (1185376 bytes)");
  struct gguf_error err;
  KT_CHECK_EQ(open_copy(c, size, &err), KVD_E_FORMAT);
  KT_CHECK_EQ(err.offset, off_at);
  put_u64(c, off_at, UINT64_MAX - 31); /* aligned, and the end overflows */
  EXPECT_FORMAT(c, size, "past end of file");
  put_u64(c, off_at, 4);
  EXPECT_FORMAT(c, size, "not a multiple of the alignment 32");
  put_u64(c, off_at, 0); /* token_embd's data */
  EXPECT_FORMAT(c, size, "overlaps");

  memcpy(c, buf, size);
  for (uint32_t bad = 4; bad <= 5; bad++) { /* ids ggml retired */
    put_u32(c, type_at, bad);
    EXPECT_FORMAT(c, size, "unknown tensor type");
  }
  put_u32(c, type_at, 99);
  EXPECT_FORMAT(c, size, "unknown tensor type 99");
  put_u32(c, type_at, DTYPE_MAX);
  EXPECT_FORMAT(c, size, "unknown tensor type");
  put_u32(c, type_at, UINT32_MAX);
  EXPECT_FORMAT(c, size, "unknown tensor type");
  put_u32(c, type_at, DTYPE_Q4_K); /* rows of 64 are not whole 256-blocks */
  EXPECT_FORMAT(c, size, "not a multiple of the q4_K block size 256");

  memcpy(c, buf, size);
  put_u32(c, ndims_at, 0);
  EXPECT_FORMAT(c, size, "n_dims 0");
  put_u32(c, ndims_at, 5);
  EXPECT_FORMAT(c, size, "n_dims 5");
  memcpy(c, buf, size);
  put_u64(c, ne_at, 0);
  EXPECT_FORMAT(c, size, "dimension 0 is zero");
  put_u64(c, ne_at, UINT64_MAX);
  EXPECT_FORMAT(c, size, "exceeds INT64_MAX");
  put_u64(c, ne_at, 1ull << 62);
  put_u64(c, ne_at + 8, 1ull << 62);
  EXPECT_FORMAT(c, size, "element count overflows");

  /* duplicate name: rename blk.0.attn_k.weight to blk.0.attn_q.weight (same length) */
  memcpy(c, buf, size);
  size_t k_at = find_tinfo(buf, 14176, "blk.0.attn_k.weight");
  KT_ASSERT(k_at != 0);
  c[k_at + 8 + strlen("blk.0.attn_")] = 'q';
  EXPECT_FORMAT(c, size, "duplicate name 'blk.0.attn_q.weight'");
  /* a name with a NUL in it could never be looked up */
  c[k_at + 8 + 3] = '\0';
  EXPECT_FORMAT(c, size, "NUL");

  free(c);
  free(buf);
}

KT_TEST(hand_built_tensor_infos) {
  uint64_t ne[4] = {32, 2, 1, 1};
  struct bb b = one_tensor(2, ne, DTYPE_F32, 0, 256);
  struct gguf_error err;
  KT_CHECK_EQ(open_copy(b.p, b.n, &err), 0);
  KT_CHECK_EQ(open_copy(b.p, b.n - 1, &err), KVD_E_FORMAT);
  free(b.p);

  /* q8_0 rows must be whole 32-value blocks */
  ne[0] = 48;
  b = one_tensor(2, ne, DTYPE_Q8_0, 0, 512);
  EXPECT_FORMAT(b.p, b.n, "not a multiple of the q8_0 block size 32");
  free(b.p);
  ne[0] = 64;
  b = one_tensor(2, ne, DTYPE_Q8_0, 0, 2 * 68);
  KT_CHECK_EQ(open_copy(b.p, b.n, &err), 0);
  free(b.p);

  /* 4 dims, all accepted; element count overflow caught at the dim that overflows */
  uint64_t big[4] = {1u << 20, 1u << 20, 1u << 20, 1u << 20};
  b = one_tensor(4, big, DTYPE_F32, 0, 0);
  EXPECT_FORMAT(b.p, b.n, "overflows at dimension 3");
  free(b.p);
  /* the byte size overflows though the element count does not */
  uint64_t wide[2] = {1ull << 31, 1ull << 31};
  b = one_tensor(2, wide, DTYPE_F64, 0, 0);
  EXPECT_FORMAT(b.p, b.n, "byte size overflows");
  free(b.p);
  uint64_t four[4] = {2, 3, 4, 5};
  b = one_tensor(4, four, DTYPE_F32, 0, 480);
  KT_CHECK_EQ(open_copy(b.p, b.n, &err), 0);
  free(b.p);

  /* names: empty, too long */
  b = (struct bb){0};
  bb_header(&b, 1, 0);
  bb_tinfo(&b, "", 1, ne, DTYPE_F32, 0);
  bb_pad_zero(&b, 32, 256);
  EXPECT_FORMAT(b.p, b.n, "empty name");
  free(b.p);
  char longname[GGUF_MAX_TENSOR_NAME + 2];
  memset(longname, 'x', sizeof longname - 1);
  longname[sizeof longname - 1] = '\0';
  b = (struct bb){0};
  bb_header(&b, 1, 0);
  bb_tinfo(&b, longname, 1, ne, DTYPE_F32, 0);
  bb_pad_zero(&b, 32, 256);
  EXPECT_FORMAT(b.p, b.n, "name length 64 exceeds 63");
  free(b.p);

  /* two tensors whose data overlap by one block */
  uint64_t n64[1] = {64};
  b = (struct bb){0};
  bb_header(&b, 2, 0);
  bb_tinfo(&b, "a", 1, n64, DTYPE_F32, 0);
  bb_tinfo(&b, "b", 1, n64, DTYPE_F32, 224);
  bb_pad_zero(&b, 32, 512);
  EXPECT_FORMAT(b.p, b.n, "tensor 'b' data [+224, +480) overlaps tensor 'a' [+0, +256)");
  free(b.p);

  /* the data section itself past the end: infos end unaligned, file ends there */
  b = (struct bb){0};
  bb_header(&b, 1, 0);
  bb_tinfo(&b, "abc", 1, n64, DTYPE_F32, 0);
  EXPECT_FORMAT(b.p, b.n, "data section");
  free(b.p);
}

KT_TEST(hand_built_metadata) {
  struct bb b = {0};
  struct gguf_error err;

  /* bool values other than 0 and 1 */
  bb_header(&b, 0, 1);
  bb_str(&b, "flag");
  bb_u32(&b, GGUF_VT_BOOL);
  bb_raw(&b, "\x02", 1);
  EXPECT_FORMAT(b.p, b.n, "bool value is 2");
  free(b.p);
  b = (struct bb){0};
  bb_header(&b, 0, 1);
  bb_str(&b, "flags");
  bb_u32(&b, GGUF_VT_ARRAY);
  bb_u32(&b, GGUF_VT_BOOL);
  bb_u64(&b, 3);
  bb_raw(&b, "\x01\x00\x07", 3);
  EXPECT_FORMAT(b.p, b.n, "bool element 2 is 7");
  free(b.p);

  /* duplicate keys */
  b = (struct bb){0};
  bb_header(&b, 0, 3);
  bb_str(&b, "a.b");
  bb_u32(&b, GGUF_VT_UINT8);
  bb_raw(&b, "\x01", 1);
  bb_str(&b, "a.c");
  bb_u32(&b, GGUF_VT_UINT8);
  bb_raw(&b, "\x01", 1);
  bb_str(&b, "a.b");
  bb_u32(&b, GGUF_VT_STRING);
  bb_str(&b, "again");
  EXPECT_FORMAT(b.p, b.n, "kv 2: duplicate key 'a.b' (first at kv 0)");
  KT_CHECK_EQ(open_copy(b.p, b.n, &err), KVD_E_FORMAT);
  KT_CHECK_EQ(err.offset, 24 + 2 * (8 + 3 + 4 + 1));
  free(b.p);

  /* a key with a NUL byte */
  b = (struct bb){0};
  bb_header(&b, 0, 1);
  bb_u64(&b, 3);
  bb_raw(&b, "a\0b", 3);
  bb_u32(&b, GGUF_VT_UINT8);
  bb_raw(&b, "\x01", 1);
  EXPECT_FORMAT(b.p, b.n, "NUL");
  free(b.p);

  /* general.alignment: must be a uint32 power of two */
  static const uint32_t bad_align[] = {0, 3, 48, 0x80000001u};
  for (size_t i = 0; i < sizeof bad_align / sizeof bad_align[0]; i++) {
    b = (struct bb){0};
    bb_header(&b, 0, 1);
    bb_str(&b, "general.alignment");
    bb_u32(&b, GGUF_VT_UINT32);
    bb_u32(&b, bad_align[i]);
    EXPECT_FORMAT(b.p, b.n, "general.alignment");
    EXPECT_FORMAT(b.p, b.n, "power of two");
    free(b.p);
  }
  b = (struct bb){0};
  bb_header(&b, 0, 1);
  bb_str(&b, "general.alignment");
  bb_u32(&b, GGUF_VT_UINT64);
  bb_u64(&b, 64);
  EXPECT_FORMAT(b.p, b.n, "general.alignment has type uint64, must be uint32");
  free(b.p);

  /* an alignment of 64 moves the data section and constrains offsets */
  uint64_t n16[1] = {16};
  b = (struct bb){0};
  bb_header(&b, 1, 1);
  bb_str(&b, "general.alignment");
  bb_u32(&b, GGUF_VT_UINT32);
  bb_u32(&b, 64);
  bb_tinfo(&b, "t", 1, n16, DTYPE_F32, 32);
  bb_pad_zero(&b, 64, 128);
  EXPECT_FORMAT(b.p, b.n, "not a multiple of the alignment 64");
  free(b.p);
  b = (struct bb){0};
  bb_header(&b, 1, 1);
  bb_str(&b, "general.alignment");
  bb_u32(&b, GGUF_VT_UINT32);
  bb_u32(&b, 64);
  bb_tinfo(&b, "t", 1, n16, DTYPE_F32, 0);
  size_t infos_end = b.n;
  bb_pad_zero(&b, 64, 64);
  {
    struct gguf_file *f;
    KT_ASSERT_OK(gguf_open_memory(b.p, b.n, &f, &err));
    KT_CHECK_EQ(f->alignment, 64);
    KT_CHECK_EQ(f->data_offset, (infos_end + 63) / 64 * 64);
    gguf_close(f);
  }
  free(b.p);

  /* arrays nested GGUF_MAX_ARRAY_DEPTH deep are fine, one more is refused */
  for (int depth = GGUF_MAX_ARRAY_DEPTH; depth <= GGUF_MAX_ARRAY_DEPTH + 1; depth++) {
    b = (struct bb){0};
    bb_header(&b, 0, 1);
    bb_str(&b, "nest");
    bb_u32(&b, GGUF_VT_ARRAY);
    for (int d = 1; d < depth; d++) {
      bb_u32(&b, GGUF_VT_ARRAY);
      bb_u64(&b, 1);
    }
    bb_u32(&b, GGUF_VT_UINT8);
    bb_u64(&b, 1);
    bb_raw(&b, "\x2a", 1);
    int rc = open_copy(b.p, b.n, &err);
    if (depth == GGUF_MAX_ARRAY_DEPTH) {
      KT_CHECK_EQ(rc, 0);
    } else {
      KT_CHECK_EQ(rc, KVD_E_FORMAT);
      KT_CHECK(strstr(err.msg, "nested deeper") != NULL);
    }
    free(b.p);
  }

  /* an array of strings whose count cannot fit */
  b = (struct bb){0};
  bb_header(&b, 0, 1);
  bb_str(&b, "s");
  bb_u32(&b, GGUF_VT_ARRAY);
  bb_u32(&b, GGUF_VT_STRING);
  bb_u64(&b, 1000);
  bb_str(&b, "only one");
  EXPECT_FORMAT(b.p, b.n, "array of 1000 strings cannot fit");
  free(b.p);
}

/* ---- writer ---- */

/* Adds one of every value type, nested arrays included, and three tensors. */
static int build_all_types(struct gguf_writer *w) {
  static const uint8_t au8[] = {1, 2, 255};
  static const int8_t ai8[] = {-1, 0, 127};
  static const uint16_t au16[] = {0, 65535};
  static const int16_t ai16[] = {-32768, 32767};
  static const uint32_t au32[] = {7, 4000000000u};
  static const int32_t ai32[] = {-2000000000, 5};
  static const uint64_t au64[] = {1, UINT64_MAX};
  static const int64_t ai64[] = {INT64_MIN, INT64_MAX};
  static const float af32[] = {1.5f, -0.25f, 3e38f};
  static const double af64[] = {3.141592653589793, -1e-300};
  static const bool abool[] = {true, false, true};
  static const char *const strs[] = {"", "x", "h\xc3\xa9llo", "\xe2\x96\x81the"};
  int rc = 0;
#define ADD(call)                                                                                  \
  do {                                                                                             \
    if (rc == 0) rc = (call);                                                                      \
  } while (0)
  ADD(gguf_writer_add_u8(w, "t.u8", 200));
  ADD(gguf_writer_add_i8(w, "t.i8", -100));
  ADD(gguf_writer_add_u16(w, "t.u16", 60000));
  ADD(gguf_writer_add_i16(w, "t.i16", -30000));
  ADD(gguf_writer_add_u32(w, "t.u32", 4000000000u));
  ADD(gguf_writer_add_i32(w, "t.i32", -2000000000));
  ADD(gguf_writer_add_u64(w, "t.u64", (1ull << 63) + 5));
  ADD(gguf_writer_add_i64(w, "t.i64", INT64_MIN + 1));
  ADD(gguf_writer_add_f32(w, "t.f32", 1.5f));
  ADD(gguf_writer_add_f64(w, "t.f64", 3.141592653589793));
  ADD(gguf_writer_add_bool(w, "t.true", true));
  ADD(gguf_writer_add_bool(w, "t.false", false));
  ADD(gguf_writer_add_str(w, "t.str", "h\xc3\xa9llo \xe2\x96\x81world"));
  ADD(gguf_writer_add_str(w, "t.empty", ""));
  ADD(gguf_writer_add_strn(w, "t.nul", "a\0b", 3));
  ADD(gguf_writer_add_arr(w, "a.u8", GGUF_VT_UINT8, au8, 3));
  ADD(gguf_writer_add_arr(w, "a.i8", GGUF_VT_INT8, ai8, 3));
  ADD(gguf_writer_add_arr(w, "a.u16", GGUF_VT_UINT16, au16, 2));
  ADD(gguf_writer_add_arr(w, "a.i16", GGUF_VT_INT16, ai16, 2));
  ADD(gguf_writer_add_arr(w, "a.u32", GGUF_VT_UINT32, au32, 2));
  ADD(gguf_writer_add_arr(w, "a.i32", GGUF_VT_INT32, ai32, 2));
  ADD(gguf_writer_add_arr(w, "a.u64", GGUF_VT_UINT64, au64, 2));
  ADD(gguf_writer_add_arr(w, "a.i64", GGUF_VT_INT64, ai64, 2));
  ADD(gguf_writer_add_arr(w, "a.f32", GGUF_VT_FLOAT32, af32, 3));
  ADD(gguf_writer_add_arr(w, "a.f64", GGUF_VT_FLOAT64, af64, 2));
  ADD(gguf_writer_add_arr(w, "a.bool", GGUF_VT_BOOL, abool, 3));
  ADD(gguf_writer_add_arr(w, "a.empty", GGUF_VT_UINT32, NULL, 0));
  ADD(gguf_writer_add_str_arr(w, "a.str", strs, 4));
  ADD(gguf_writer_add_str_arr(w, "a.str_empty", NULL, 0));

  /* [[1, 2], [3], []] of uint16, [["a"], ["b", "c"]], and [[[7]]] */
  static const uint8_t le12[] = {1, 0, 2, 0}, le3[] = {3, 0};
  struct gguf_value inner[3] = {
      {.type = GGUF_VT_ARRAY}, {.type = GGUF_VT_ARRAY}, {.type = GGUF_VT_ARRAY}};
  inner[0].v.arr.type = inner[1].v.arr.type = inner[2].v.arr.type = GGUF_VT_UINT16;
  inner[0].v.arr.count = 2;
  inner[0].v.arr.data = le12;
  inner[1].v.arr.count = 1;
  inner[1].v.arr.data = le3;
  struct gguf_value outer = {.type = GGUF_VT_ARRAY};
  outer.v.arr.type = GGUF_VT_ARRAY;
  outer.v.arr.count = 3;
  outer.v.arr.elems = inner;
  ADD(gguf_writer_add_value(w, "n.u16", &outer));

  struct gguf_value sa[3] = {{.type = GGUF_VT_STRING, .v.str = {1, "a"}},
                             {.type = GGUF_VT_STRING, .v.str = {1, "b"}},
                             {.type = GGUF_VT_STRING, .v.str = {1, "c"}}};
  struct gguf_value sarr[2] = {{.type = GGUF_VT_ARRAY}, {.type = GGUF_VT_ARRAY}};
  sarr[0].v.arr.type = sarr[1].v.arr.type = GGUF_VT_STRING;
  sarr[0].v.arr.count = 1;
  sarr[0].v.arr.elems = &sa[0];
  sarr[1].v.arr.count = 2;
  sarr[1].v.arr.elems = &sa[1];
  struct gguf_value souter = {.type = GGUF_VT_ARRAY};
  souter.v.arr.type = GGUF_VT_ARRAY;
  souter.v.arr.count = 2;
  souter.v.arr.elems = sarr;
  ADD(gguf_writer_add_value(w, "n.str", &souter));

  static const uint8_t seven[] = {7, 0, 0, 0};
  struct gguf_value l3 = {.type = GGUF_VT_ARRAY}, l2 = {.type = GGUF_VT_ARRAY},
                    l1 = {.type = GGUF_VT_ARRAY};
  l3.v.arr.type = GGUF_VT_INT32;
  l3.v.arr.count = 1;
  l3.v.arr.data = seven;
  l2.v.arr.type = GGUF_VT_ARRAY;
  l2.v.arr.count = 1;
  l2.v.arr.elems = &l3;
  l1.v.arr.type = GGUF_VT_ARRAY;
  l1.v.arr.count = 1;
  l1.v.arr.elems = &l2;
  ADD(gguf_writer_add_value(w, "n.deep", &l1));

  /* tensors: f32 [4, 3], f16 [8], q8_0 [32, 2], f32 [2, 3, 4, 1] */
  float m[12];
  for (int i = 0; i < 12; i++)
    m[i] = (float)i * 0.5f;
  uint16_t h[8];
  for (int i = 0; i < 8; i++)
    h[i] = (uint16_t)(0x3c00 + i);
  uint8_t q[68];
  for (int i = 0; i < 68; i++)
    q[i] = (uint8_t)(i * 7);
  float cube[24];
  for (int i = 0; i < 24; i++)
    cube[i] = (float)-i;
  ADD(gguf_writer_add_tensor(w, "m.weight", 2, (const uint64_t[]){4, 3}, DTYPE_F32, m, sizeof m));
  ADD(gguf_writer_add_tensor(w, "h", 1, (const uint64_t[]){8}, DTYPE_F16, h, sizeof h));
  ADD(gguf_writer_add_tensor(w, "q", 2, (const uint64_t[]){32, 2}, DTYPE_Q8_0, q, sizeof q));
  ADD(gguf_writer_add_tensor(w, "cube", 4, (const uint64_t[]){2, 3, 4, 1}, DTYPE_F32, cube,
                             sizeof cube));
#undef ADD
  return rc;
}

static void check_all_types(const struct gguf_file *f) {
  uint32_t u32;
  uint64_t u64;
  int64_t i64;
  float f32;
  bool b;
  struct gguf_str s;
  const struct gguf_kv *kv;
  const struct gguf_value *a;
  struct gguf_value e;

  KT_ASSERT((kv = gguf_find_kv(f, "t.u8")) && kv->value.type == GGUF_VT_UINT8);
  KT_CHECK_EQ(kv->value.v.u64, 200);
  KT_ASSERT((kv = gguf_find_kv(f, "t.i8")) && kv->value.type == GGUF_VT_INT8);
  KT_CHECK_EQ(kv->value.v.i64, -100);
  KT_ASSERT((kv = gguf_find_kv(f, "t.u16")) && kv->value.type == GGUF_VT_UINT16);
  KT_CHECK_EQ(kv->value.v.u64, 60000);
  KT_ASSERT((kv = gguf_find_kv(f, "t.i16")) && kv->value.type == GGUF_VT_INT16);
  KT_CHECK_EQ(kv->value.v.i64, -30000);
  KT_ASSERT_OK(gguf_get_u32(f, "t.u32", &u32));
  KT_CHECK(u32 == 4000000000u);
  KT_CHECK_EQ(gguf_get_i64(f, "t.i32", &i64), 0);
  KT_CHECK_EQ(i64, -2000000000);
  KT_CHECK_EQ(gguf_get_u32(f, "t.i32", &u32), KVD_E_FORMAT); /* negative */
  KT_ASSERT_OK(gguf_get_u64(f, "t.u64", &u64));
  KT_CHECK(u64 == (1ull << 63) + 5);
  KT_CHECK_EQ(gguf_get_i64(f, "t.u64", &i64), KVD_E_FORMAT); /* does not fit */
  KT_CHECK_EQ(gguf_get_u32(f, "t.u64", &u32), KVD_E_FORMAT);
  KT_ASSERT_OK(gguf_get_i64(f, "t.i64", &i64));
  KT_CHECK(i64 == INT64_MIN + 1);
  KT_ASSERT_OK(gguf_get_f32(f, "t.f32", &f32));
  KT_CHECK(f32 == 1.5f);
  KT_ASSERT((kv = gguf_find_kv(f, "t.f64")) && kv->value.type == GGUF_VT_FLOAT64);
  KT_CHECK(kv->value.v.f64 == 3.141592653589793);
  KT_ASSERT_OK(gguf_get_f32(f, "t.f64", &f32));
  KT_ASSERT_OK(gguf_get_bool(f, "t.true", &b));
  KT_CHECK(b);
  KT_ASSERT_OK(gguf_get_bool(f, "t.false", &b));
  KT_CHECK(!b);
  KT_ASSERT_OK(gguf_get_str(f, "t.str", &s));
  KT_CHECK(gguf_str_eq(s, "h\xc3\xa9llo \xe2\x96\x81world"));
  KT_ASSERT_OK(gguf_get_str(f, "t.empty", &s));
  KT_CHECK_EQ(s.len, 0);
  KT_CHECK(gguf_str_eq(s, ""));
  KT_ASSERT_OK(gguf_get_str(f, "t.nul", &s));
  KT_CHECK(s.len == 3 && memcmp(s.ptr, "a\0b", 3) == 0);

  KT_ASSERT_OK(gguf_get_arr(f, "a.u8", GGUF_VT_UINT8, &a));
  KT_ASSERT_EQ(a->v.arr.count, 3);
  KT_ASSERT_OK(gguf_arr_get(a, 2, &e));
  KT_CHECK_EQ(e.v.u64, 255);
  KT_ASSERT_OK(gguf_get_arr(f, "a.i8", GGUF_VT_INT8, &a));
  KT_ASSERT_OK(gguf_arr_get(a, 0, &e));
  KT_CHECK_EQ(e.v.i64, -1);
  KT_ASSERT_OK(gguf_get_arr(f, "a.u16", GGUF_VT_UINT16, &a));
  KT_ASSERT_OK(gguf_arr_get(a, 1, &e));
  KT_CHECK_EQ(e.v.u64, 65535);
  KT_ASSERT_OK(gguf_get_arr(f, "a.i16", GGUF_VT_INT16, &a));
  KT_ASSERT_OK(gguf_arr_get(a, 0, &e));
  KT_CHECK_EQ(e.v.i64, -32768);
  KT_ASSERT_OK(gguf_get_arr(f, "a.u32", GGUF_VT_UINT32, &a));
  KT_ASSERT_OK(gguf_arr_get(a, 1, &e));
  KT_CHECK(e.v.u64 == 4000000000u);
  KT_ASSERT_OK(gguf_get_arr(f, "a.i32", GGUF_VT_INT32, &a));
  KT_ASSERT_OK(gguf_arr_get(a, 0, &e));
  KT_CHECK_EQ(e.v.i64, -2000000000);
  KT_ASSERT_OK(gguf_get_arr(f, "a.u64", GGUF_VT_UINT64, &a));
  KT_ASSERT_OK(gguf_arr_get(a, 1, &e));
  KT_CHECK(e.v.u64 == UINT64_MAX);
  KT_CHECK_EQ(gguf_value_to_i64(&e, &i64), KVD_E_FORMAT);
  KT_ASSERT_OK(gguf_get_arr(f, "a.i64", GGUF_VT_INT64, &a));
  KT_ASSERT_OK(gguf_arr_get(a, 0, &e));
  KT_CHECK(e.v.i64 == INT64_MIN);
  KT_CHECK_EQ(gguf_value_to_u64(&e, &u64), KVD_E_FORMAT);
  KT_ASSERT_OK(gguf_get_arr(f, "a.f32", GGUF_VT_FLOAT32, &a));
  KT_ASSERT_OK(gguf_arr_get(a, 1, &e));
  KT_CHECK(e.type == GGUF_VT_FLOAT32 && e.v.f64 == -0.25);
  KT_ASSERT_OK(gguf_arr_get(a, 2, &e));
  KT_CHECK((float)e.v.f64 == 3e38f);
  KT_ASSERT_OK(gguf_get_arr(f, "a.f64", GGUF_VT_FLOAT64, &a));
  KT_ASSERT_OK(gguf_arr_get(a, 1, &e));
  double d;
  KT_ASSERT_OK(gguf_value_to_f64(&e, &d));
  KT_CHECK(d == -1e-300);
  KT_ASSERT_OK(gguf_get_arr(f, "a.bool", GGUF_VT_BOOL, &a));
  KT_ASSERT_OK(gguf_arr_get(a, 1, &e));
  KT_CHECK(e.type == GGUF_VT_BOOL && e.v.u64 == 0);
  KT_ASSERT_OK(gguf_get_arr(f, "a.empty", GGUF_VT_UINT32, &a));
  KT_CHECK_EQ(a->v.arr.count, 0);
  KT_CHECK_EQ(gguf_arr_get(a, 0, &e), KVD_ERANGE);
  KT_ASSERT_OK(gguf_get_arr(f, "a.str", GGUF_VT_STRING, &a));
  KT_ASSERT_EQ(a->v.arr.count, 4);
  KT_CHECK(gguf_str_eq(a->v.arr.elems[0].v.str, ""));
  KT_CHECK(gguf_str_eq(a->v.arr.elems[2].v.str, "h\xc3\xa9llo"));
  KT_ASSERT_OK(gguf_arr_get(a, 3, &e));
  KT_CHECK(e.type == GGUF_VT_STRING && gguf_str_eq(e.v.str, "\xe2\x96\x81the"));
  KT_ASSERT_OK(gguf_get_arr(f, "a.str_empty", GGUF_VT_STRING, &a));
  KT_CHECK_EQ(a->v.arr.count, 0);

  KT_ASSERT_OK(gguf_get_arr(f, "n.u16", GGUF_VT_ARRAY, &a));
  KT_ASSERT_EQ(a->v.arr.count, 3);
  const struct gguf_value *in = &a->v.arr.elems[0];
  KT_ASSERT(in->type == GGUF_VT_ARRAY && in->v.arr.type == GGUF_VT_UINT16);
  KT_ASSERT_EQ(in->v.arr.count, 2);
  KT_ASSERT_OK(gguf_arr_get(in, 1, &e));
  KT_CHECK_EQ(e.v.u64, 2);
  KT_ASSERT_OK(gguf_arr_get(a, 1, &e)); /* a nested array element, through the getter */
  KT_ASSERT(e.type == GGUF_VT_ARRAY && e.v.arr.count == 1);
  KT_CHECK_EQ(a->v.arr.elems[2].v.arr.count, 0);
  KT_ASSERT_OK(gguf_get_arr(f, "n.str", GGUF_VT_ARRAY, &a));
  KT_ASSERT_EQ(a->v.arr.count, 2);
  KT_ASSERT_EQ(a->v.arr.elems[1].v.arr.count, 2);
  KT_CHECK(gguf_str_eq(a->v.arr.elems[1].v.arr.elems[1].v.str, "c"));
  KT_ASSERT_OK(gguf_get_arr(f, "n.deep", GGUF_VT_ARRAY, &a));
  const struct gguf_value *l3 = &a->v.arr.elems[0].v.arr.elems[0];
  KT_ASSERT(l3->type == GGUF_VT_ARRAY && l3->v.arr.type == GGUF_VT_INT32);
  KT_ASSERT_OK(gguf_arr_get(l3, 0, &e));
  KT_CHECK_EQ(e.v.i64, 7);

  KT_ASSERT_EQ(f->n_tensors, 4);
  const struct gguf_tensor *t = gguf_find_tensor(f, "m.weight");
  KT_ASSERT(t && t->type == DTYPE_F32 && t->n_dims == 2 && t->ne[0] == 4 && t->ne[1] == 3);
  float m[12];
  memcpy(m, t->data, sizeof m);
  KT_CHECK(m[11] == 5.5f);
  t = gguf_find_tensor(f, "h");
  KT_ASSERT(t && t->type == DTYPE_F16 && t->nbytes == 16);
  KT_CHECK(((const uint8_t *)t->data)[2] == 0x01 && ((const uint8_t *)t->data)[3] == 0x3c);
  t = gguf_find_tensor(f, "q");
  KT_ASSERT(t && t->type == DTYPE_Q8_0 && t->nbytes == 68);
  KT_CHECK(((const uint8_t *)t->data)[67] == (uint8_t)(67 * 7));
  t = gguf_find_tensor(f, "cube");
  KT_ASSERT(t && t->n_dims == 4 && t->ne[2] == 4 && t->ne[3] == 1 && t->nbytes == 96);
  for (uint64_t i = 0; i < f->n_tensors; i++) {
    t = &f->tensors[i];
    KT_CHECK_EQ(t->offset % f->alignment, 0);
    KT_CHECK_EQ(((const uint8_t *)t->data - f->base) % f->alignment, 0);
  }
}

KT_TEST(writer_round_trips_every_value_type) {
  struct gguf_writer *w;
  KT_ASSERT_OK(gguf_writer_new(&w));
  KT_ASSERT_OK(build_all_types(w));
  void *buf;
  size_t size;
  KT_ASSERT_OK(gguf_writer_write_mem(w, &buf, &size));
  KT_CHECK_EQ(size, gguf_writer_file_size(w));
  KT_CHECK_EQ(size % 32, 0);
  struct gguf_file *f;
  struct gguf_error err;
  int rc = gguf_open_memory(buf, size, &f, &err);
  KT_ASSERT_MSG(rc == 0, "%d %s", rc, err.msg);
  KT_CHECK_EQ(f->version, 3);
  KT_CHECK_EQ(f->alignment, 32);
  KT_CHECK_EQ(f->n_kv, 32);
  KT_CHECK(gguf_str_eq(f->kv[0].key, "t.u8")); /* order kept */
  check_all_types(f);
  gguf_close(f);
  free(buf);
  gguf_writer_free(w);
}

KT_TEST(writer_v2_with_alignment_64_through_a_file) {
  struct gguf_writer *w;
  KT_ASSERT_OK(gguf_writer_new(&w));
  KT_ASSERT_OK(gguf_writer_set_version(w, 2));
  KT_CHECK_EQ(gguf_writer_set_version(w, 1), KVD_EINVAL);
  KT_ASSERT_OK(gguf_writer_add_u32(w, "general.alignment", 64));
  KT_ASSERT_OK(build_all_types(w));
  char path[512];
  snprintf(path, sizeof path, "%s/all.gguf", kt_tmp_dir());
  KT_ASSERT_OK(gguf_writer_write_file(w, path));
  struct gguf_file *f;
  struct gguf_error err;
  int rc = gguf_open(path, &f, &err);
  KT_ASSERT_MSG(rc == 0, "%d %s", rc, err.msg);
  KT_CHECK(f->mapped);
  KT_CHECK_EQ(f->version, 2);
  KT_CHECK_EQ(f->alignment, 64);
  KT_CHECK_EQ(f->data_offset % 64, 0);
  KT_CHECK_EQ(f->size, gguf_writer_file_size(w));
  check_all_types(f);
  gguf_close(f);
  gguf_writer_free(w);
}

static int fill_fail(void *ctx, void *dst, uint64_t n) {
  (void)ctx;
  memset(dst, 0, (size_t)n);
  return KVD_EIO;
}

static int fill_ramp(void *ctx, void *dst, uint64_t n) {
  (void)ctx;
  for (uint64_t i = 0; i < n; i++)
    ((uint8_t *)dst)[i] = (uint8_t)i;
  return 0;
}

KT_TEST(writer_refuses_what_the_reader_would) {
  struct gguf_writer *w;
  KT_ASSERT_OK(gguf_writer_new(&w));
  float x[64] = {0};
  KT_CHECK_EQ(gguf_writer_add_u32(w, "k", 1), 0);
  KT_CHECK_EQ(gguf_writer_add_str(w, "k", "again"), KVD_EEXIST);
  KT_CHECK_EQ(gguf_writer_add_u32(w, "", 1), KVD_EINVAL);
  KT_CHECK_EQ(gguf_writer_add_u32(w, "general.alignment", 48), KVD_EINVAL);
  KT_CHECK_EQ(gguf_writer_add_u32(w, "general.alignment", 0), KVD_EINVAL);
  KT_CHECK_EQ(gguf_writer_add_u64(w, "general.alignment", 64), KVD_EINVAL);
  struct gguf_value v = {.type = GGUF_VT_UINT8, .v.u64 = 300};
  KT_CHECK_EQ(gguf_writer_add_value(w, "v", &v), KVD_EINVAL);
  v = (struct gguf_value){.type = GGUF_VT_BOOL, .v.u64 = 2};
  KT_CHECK_EQ(gguf_writer_add_value(w, "v", &v), KVD_EINVAL);
  v = (struct gguf_value){.type = GGUF_VT_COUNT};
  KT_CHECK_EQ(gguf_writer_add_value(w, "v", &v), KVD_EINVAL);
  /* an array whose elements do not have the declared type */
  struct gguf_value el = {.type = GGUF_VT_UINT8, .v.u64 = 1};
  v = (struct gguf_value){.type = GGUF_VT_ARRAY};
  v.v.arr.type = GGUF_VT_STRING;
  v.v.arr.count = 1;
  v.v.arr.elems = &el;
  KT_CHECK_EQ(gguf_writer_add_value(w, "v", &v), KVD_EINVAL);
  /* nesting deeper than the reader accepts */
  struct gguf_value chain[GGUF_MAX_ARRAY_DEPTH + 1];
  static const uint8_t one = 1;
  for (int i = 0; i <= GGUF_MAX_ARRAY_DEPTH; i++) {
    chain[i] = (struct gguf_value){.type = GGUF_VT_ARRAY};
    chain[i].v.arr.count = 1;
    if (i < GGUF_MAX_ARRAY_DEPTH) {
      chain[i].v.arr.type = GGUF_VT_ARRAY;
      chain[i].v.arr.elems = &chain[i + 1];
    } else {
      chain[i].v.arr.type = GGUF_VT_UINT8;
      chain[i].v.arr.data = &one;
    }
  }
  KT_CHECK_EQ(gguf_writer_add_value(w, "deep", &chain[0]), KVD_EINVAL);
  KT_CHECK_EQ(gguf_writer_add_value(w, "deep", &chain[1]), 0);

  const uint64_t n64[] = {64}, n33[] = {33, 1}, n0[] = {0}, n5[] = {1, 1, 1, 1, 1};
  KT_CHECK_EQ(gguf_writer_add_tensor(w, "a", 1, n64, DTYPE_F32, x, sizeof x), 0);
  KT_CHECK_EQ(gguf_writer_add_tensor(w, "a", 1, n64, DTYPE_F32, x, sizeof x), KVD_EEXIST);
  KT_CHECK_EQ(gguf_writer_add_tensor(w, "b", 1, n64, DTYPE_F32, x, sizeof x - 4), KVD_EINVAL);
  KT_CHECK_EQ(gguf_writer_add_tensor(w, "b", 2, n33, DTYPE_Q8_0, x, 34), KVD_EINVAL);
  KT_CHECK_EQ(gguf_writer_add_tensor(w, "b", 1, n0, DTYPE_F32, x, 0), KVD_EINVAL);
  KT_CHECK_EQ(gguf_writer_add_tensor(w, "b", 5, n5, DTYPE_F32, x, 4), KVD_EINVAL);
  KT_CHECK_EQ(gguf_writer_add_tensor(w, "b", 1, n64, (enum dtype)4, x, 128), KVD_EINVAL);
  char longname[GGUF_MAX_TENSOR_NAME + 2];
  memset(longname, 'n', sizeof longname - 1);
  longname[sizeof longname - 1] = '\0';
  KT_CHECK_EQ(gguf_writer_add_tensor(w, longname, 1, n64, DTYPE_F32, x, sizeof x), KVD_EINVAL);
  longname[GGUF_MAX_TENSOR_NAME] = '\0';
  KT_CHECK_EQ(gguf_writer_add_tensor_fill(w, longname, 1, n64, DTYPE_F32, fill_ramp, NULL), 0);

  /* the refusals left nothing behind: the file holds exactly what was accepted */
  void *buf;
  size_t size;
  KT_ASSERT_OK(gguf_writer_write_mem(w, &buf, &size));
  struct gguf_file *f;
  struct gguf_error err;
  int rc = gguf_open_memory(buf, size, &f, &err);
  KT_ASSERT_MSG(rc == 0, "%d %s", rc, err.msg);
  KT_CHECK_EQ(f->n_kv, 2);
  KT_CHECK_EQ(f->n_tensors, 2);
  const struct gguf_tensor *t = gguf_find_tensor(f, longname);
  KT_ASSERT(t != NULL);
  KT_CHECK_EQ(((const uint8_t *)t->data)[255], 255);
  gguf_close(f);
  free(buf);

  /* a failing fill aborts the write and leaves no file behind */
  KT_ASSERT_OK(gguf_writer_add_tensor_fill(w, "bad", 1, n64, DTYPE_F32, fill_fail, NULL));
  KT_CHECK_EQ(gguf_writer_write_mem(w, &buf, &size), KVD_EIO);
  char path[512];
  snprintf(path, sizeof path, "%s/failed.gguf", kt_tmp_dir());
  KT_CHECK_EQ(gguf_writer_write_file(w, path), KVD_EIO);
  KT_CHECK(access(path, F_OK) != 0);
  snprintf(path, sizeof path, "%s/no/such/dir.gguf", kt_tmp_dir());
  KT_CHECK_EQ(gguf_writer_write_file(w, path), KVD_ENOENT);
  gguf_writer_free(w);
  gguf_writer_free(NULL);
}

/* ---- synthetic models ---- */

static int open_synth(const struct synth_params *p, void **buf, struct gguf_file **f) {
  size_t size;
  int rc = synth_write_mem(p, buf, &size);
  if (rc < 0) return rc;
  struct gguf_error err;
  rc = gguf_open_memory(*buf, size, f, &err);
  if (rc < 0) {
    kt_log("synth file refused: %s", err.msg);
    free(*buf);
  }
  return rc;
}

KT_TEST(synth_default_matches_the_stories260K_shape) {
  struct synth_params p;
  synth_params_default(&p);
  void *buf;
  struct gguf_file *f;
  KT_ASSERT_OK(open_synth(&p, &buf, &f));
  KT_CHECK_EQ(f->n_tensors, 2 + 9 * 5 + 1);
  uint32_t u32;
  float f32;
  struct gguf_str s;
  KT_ASSERT_OK(gguf_get_str(f, "general.architecture", &s));
  KT_CHECK(gguf_str_eq(s, "llama"));
  KT_ASSERT_OK(gguf_get_str(f, "tokenizer.ggml.model", &s));
  KT_CHECK(gguf_str_eq(s, "llama"));
  static const struct {
    const char *key;
    uint32_t want;
  } keys[] = {
      {"llama.embedding_length", 64},         {"llama.block_count", 5},
      {"llama.attention.head_count", 8},      {"llama.attention.head_count_kv", 4},
      {"llama.feed_forward_length", 172},     {"llama.context_length", 512},
      {"llama.rope.dimension_count", 8},      {"llama.vocab_size", 512},
      {"tokenizer.ggml.bos_token_id", 1},     {"tokenizer.ggml.eos_token_id", 2},
      {"tokenizer.ggml.unknown_token_id", 0}, {"general.file_type", 0},
  };
  for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
    KT_ASSERT_MSG(gguf_get_u32(f, keys[i].key, &u32) == 0, "%s missing", keys[i].key);
    KT_CHECK_EQ(u32, keys[i].want);
  }
  KT_ASSERT_OK(gguf_get_f32(f, "llama.attention.layer_norm_rms_epsilon", &f32));
  KT_CHECK(f32 == 1e-5f);
  KT_ASSERT_OK(gguf_get_f32(f, "llama.rope.freq_base", &f32));
  KT_CHECK(f32 == 10000.0f);

  const struct gguf_value *tok, *scores, *types;
  KT_ASSERT_OK(gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_VT_STRING, &tok));
  KT_ASSERT_OK(gguf_get_arr(f, "tokenizer.ggml.scores", GGUF_VT_FLOAT32, &scores));
  KT_ASSERT_OK(gguf_get_arr(f, "tokenizer.ggml.token_type", GGUF_VT_INT32, &types));
  KT_ASSERT_EQ(tok->v.arr.count, 512);
  KT_ASSERT_EQ(scores->v.arr.count, 512);
  KT_ASSERT_EQ(types->v.arr.count, 512);
  const struct gguf_value *t = tok->v.arr.elems;
  KT_CHECK(gguf_str_eq(t[0].v.str, "<unk>"));
  KT_CHECK(gguf_str_eq(t[1].v.str, "<s>"));
  KT_CHECK(gguf_str_eq(t[2].v.str, "</s>"));
  KT_CHECK(gguf_str_eq(t[3].v.str, "<0x00>"));
  KT_CHECK(gguf_str_eq(t[3 + 0x0a].v.str, "<0x0A>"));
  KT_CHECK(gguf_str_eq(t[258].v.str, "<0xFF>"));
  KT_CHECK(gguf_str_eq(t[259].v.str, "\xe2\x96\x81"));
  struct gguf_value e;
  static const int64_t want_types[] = {2, 3, 3, 6};
  for (int i = 0; i < 4; i++) {
    KT_ASSERT_OK(gguf_arr_get(types, (uint64_t)i, &e));
    KT_CHECK_EQ(e.v.i64, want_types[i]);
  }
  KT_ASSERT_OK(gguf_arr_get(types, 300, &e));
  KT_CHECK_EQ(e.v.i64, 1);
  /* scores fall with rank among the pieces */
  struct gguf_value s1, s2;
  KT_ASSERT_OK(gguf_arr_get(scores, 300, &s1));
  KT_ASSERT_OK(gguf_arr_get(scores, 301, &s2));
  KT_CHECK(s1.v.f64 > s2.v.f64);
  /* every piece is unique, and "▁the" is reachable through its prefixes */
  bool has_the = false, has_th = false;
  for (uint64_t i = 0; i < 512; i++) {
    has_the |= gguf_str_eq(t[i].v.str, "\xe2\x96\x81the");
    has_th |= gguf_str_eq(t[i].v.str, "\xe2\x96\x81th");
    for (uint64_t j = i + 1; j < 512; j++)
      if (t[i].v.str.len == t[j].v.str.len &&
          memcmp(t[i].v.str.ptr, t[j].v.str.ptr, t[i].v.str.len) == 0)
        kt__fail(__FILE__, __LINE__, "tokens %llu and %llu are equal", (unsigned long long)i,
                 (unsigned long long)j);
  }
  KT_CHECK(has_the && has_th);

  static const struct {
    const char *name;
    uint32_t n_dims;
    uint64_t ne0, ne1;
  } shapes[] = {
      {"token_embd.weight", 2, 64, 512},   {"blk.0.attn_norm.weight", 1, 64, 1},
      {"blk.0.attn_q.weight", 2, 64, 64},  {"blk.0.attn_k.weight", 2, 64, 32},
      {"blk.0.attn_v.weight", 2, 64, 32},  {"blk.4.attn_output.weight", 2, 64, 64},
      {"blk.4.ffn_norm.weight", 1, 64, 1}, {"blk.4.ffn_gate.weight", 2, 64, 172},
      {"blk.4.ffn_up.weight", 2, 64, 172}, {"blk.4.ffn_down.weight", 2, 172, 64},
      {"output_norm.weight", 1, 64, 1},    {"output.weight", 2, 64, 512},
  };
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
    const struct gguf_tensor *ts = gguf_find_tensor(f, shapes[i].name);
    KT_ASSERT_MSG(ts != NULL, "%s missing", shapes[i].name);
    KT_CHECK_EQ(ts->n_dims, shapes[i].n_dims);
    KT_CHECK_EQ(ts->ne[0], shapes[i].ne0);
    KT_CHECK_EQ(ts->ne[1], shapes[i].ne1);
    KT_CHECK_EQ(ts->type, DTYPE_F32);
  }
  /* norms are near 1, matrices near 0, everything finite */
  const struct gguf_tensor *norm = gguf_find_tensor(f, "blk.2.ffn_norm.weight");
  const struct gguf_tensor *q = gguf_find_tensor(f, "blk.2.attn_q.weight");
  double sum_n = 0, sum_q = 0;
  for (int i = 0; i < 64; i++) {
    float a, b;
    memcpy(&a, (const float *)norm->data + i, sizeof a);
    memcpy(&b, (const float *)q->data + i, sizeof b);
    KT_ASSERT(isfinite(a) && isfinite(b));
    sum_n += a;
    sum_q += fabs(b);
  }
  KT_CHECK(fabs(sum_n / 64 - 1.0) < 0.1);
  KT_CHECK(sum_q / 64 > 0.01 && sum_q / 64 < 0.5);
  gguf_close(f);
  free(buf);
}

KT_TEST(synth_every_type_and_fallback) {
  static const enum dtype types[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_Q8_0, DTYPE_Q4_0};
  static const uint32_t file_types[] = {0, 1, 32, 7, 2};
  for (size_t k = 0; k < sizeof types / sizeof types[0]; k++) {
    struct synth_params p;
    synth_params_default(&p);
    p.type = types[k];
    p.n_layers = 2;
    void *buf;
    struct gguf_file *f;
    KT_ASSERT_OK(open_synth(&p, &buf, &f));
    uint32_t ft;
    KT_ASSERT_OK(gguf_get_u32(f, "general.file_type", &ft));
    KT_CHECK_EQ(ft, file_types[k]);
    bool quant = types[k] == DTYPE_Q8_0 || types[k] == DTYPE_Q4_0;
    KT_CHECK_EQ(gguf_find_kv(f, "general.quantization_version") != NULL, quant);
    for (uint64_t i = 0; i < f->n_tensors; i++) {
      const struct gguf_tensor *t = &f->tensors[i];
      enum dtype want = t->n_dims == 1 ? DTYPE_F32 : types[k];
      /* ffn_down rows are 172 long: not whole 32-blocks, so F16 */
      if (quant && t->ne[0] == 172) want = DTYPE_F16;
      KT_ASSERT_MSG(t->type == want, "%.*s: %s, want %s", (int)t->name.len, t->name.ptr,
                    dtype_name(t->type), dtype_name(want));
      /* each row dequantizes to finite values of a sane size */
      const struct dtype_info *di = dtype_get(t->type);
      if (di && di->can_dequant) {
        float row[512];
        KT_ASSERT(t->ne[0] <= 512);
        KT_ASSERT_OK(dtype_dequant_row(t->type, t->data, row, t->ne[0]));
        for (uint64_t j = 0; j < t->ne[0]; j++)
          KT_ASSERT(isfinite(row[j]) && fabsf(row[j]) < 3);
      }
    }
    KT_CHECK_EQ(synth_matrix_type(&p, 172), quant ? DTYPE_F16 : types[k]);
    KT_CHECK_EQ(synth_matrix_type(&p, 64), types[k]);
    gguf_close(f);
    free(buf);
  }
}

KT_TEST(synth_is_deterministic_and_seeded) {
  struct synth_params p;
  synth_params_default(&p);
  p.n_layers = 1;
  p.type = DTYPE_Q4_0;
  void *a, *b, *c;
  size_t na, nb, nc;
  KT_ASSERT_OK(synth_write_mem(&p, &a, &na));
  KT_ASSERT_OK(synth_write_mem(&p, &b, &nb));
  p.seed = 2;
  KT_ASSERT_OK(synth_write_mem(&p, &c, &nc));
  KT_CHECK(na == nb && memcmp(a, b, na) == 0);
  KT_CHECK(na == nc && memcmp(a, c, na) != 0);
  /* a tensor depends only on (seed, name): more layers leave block 0 unchanged */
  p.seed = 1;
  p.n_layers = 3;
  void *d;
  size_t nd;
  KT_ASSERT_OK(synth_write_mem(&p, &d, &nd));
  struct gguf_file *fa, *fd;
  KT_ASSERT_OK(gguf_open_memory(a, na, &fa, NULL));
  KT_ASSERT_OK(gguf_open_memory(d, nd, &fd, NULL));
  const struct gguf_tensor *ta = gguf_find_tensor(fa, "blk.0.ffn_up.weight");
  const struct gguf_tensor *td = gguf_find_tensor(fd, "blk.0.ffn_up.weight");
  KT_ASSERT(ta && td && ta->nbytes == td->nbytes);
  KT_CHECK(memcmp(ta->data, td->data, (size_t)ta->nbytes) == 0);
  gguf_close(fa);
  gguf_close(fd);
  free(a);
  free(b);
  free(c);
  free(d);
}

KT_TEST(synth_odd_shapes_and_refusals) {
  struct synth_params p;
  synth_params_default(&p);
  /* tied, GQA 8:1, a large vocabulary filled past the built-in pieces, to a file */
  p.dim = 128;
  p.n_heads = 8;
  p.n_kv_heads = 1;
  p.ffn = 96;
  p.vocab = 5000;
  p.n_layers = 1;
  p.tied = true;
  p.type = DTYPE_Q8_0;
  p.name = "tiny";
  char path[512];
  snprintf(path, sizeof path, "%s/synth.gguf", kt_tmp_dir());
  KT_ASSERT_OK(synth_write_file(&p, path));
  struct gguf_file *f;
  struct gguf_error err;
  int rc = gguf_open(path, &f, &err);
  KT_ASSERT_MSG(rc == 0, "%d %s", rc, err.msg);
  KT_CHECK(gguf_find_tensor(f, "output.weight") == NULL);
  KT_CHECK_EQ(f->n_tensors, 2 + 9);
  const struct gguf_tensor *k = gguf_find_tensor(f, "blk.0.attn_k.weight");
  KT_ASSERT(k != NULL);
  KT_CHECK_EQ(k->ne[1], 16);
  struct gguf_str s;
  KT_ASSERT_OK(gguf_get_str(f, "general.name", &s));
  KT_CHECK(gguf_str_eq(s, "tiny"));
  const struct gguf_value *tok;
  KT_ASSERT_OK(gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_VT_STRING, &tok));
  KT_ASSERT_EQ(tok->v.arr.count, 5000);
  gguf_close(f);

  char why[128];
  synth_params_default(&p);
  p.n_heads = 7;
  KT_CHECK_EQ(synth_check(&p, why, sizeof why), KVD_EINVAL);
  KT_CHECK(strstr(why, "heads") != NULL);
  synth_params_default(&p);
  p.n_kv_heads = 3;
  KT_CHECK_EQ(synth_check(&p, why, sizeof why), KVD_EINVAL);
  synth_params_default(&p);
  p.vocab = 258;
  KT_CHECK_EQ(synth_check(&p, why, sizeof why), KVD_EINVAL);
  synth_params_default(&p);
  p.dim = 24;
  p.n_heads = 8; /* head dim 3: odd */
  KT_CHECK_EQ(synth_check(&p, why, sizeof why), KVD_EINVAL);
  synth_params_default(&p);
  p.type = DTYPE_Q4_K;
  KT_CHECK_EQ(synth_check(&p, why, sizeof why), KVD_EINVAL);
  void *buf;
  size_t size;
  KT_CHECK_EQ(synth_write_mem(&p, &buf, &size), KVD_EINVAL);
  synth_params_default(&p);
  p.vocab = SYNTH_MIN_VOCAB;
  KT_CHECK_EQ(synth_check(&p, NULL, 0), 0);
}

/* The synthetic models are for the forward pass: the CPU reference must load every type and give
 * finite logits that are not flat (a weight spread too small or too large would give either). */
KT_TEST(synth_models_run_on_the_cpu_reference) {
  static const enum dtype types[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_Q8_0, DTYPE_Q4_0};
  for (size_t k = 0; k < sizeof types / sizeof types[0]; k++) {
    struct synth_params p;
    synth_params_default(&p);
    p.type = types[k];
    p.n_layers = 2;
    void *buf;
    struct gguf_file *f;
    KT_ASSERT_OK(open_synth(&p, &buf, &f));
    struct model_ref *r;
    struct model_error merr;
    int rc = model_ref_new(f, NULL, &r, &merr);
    KT_ASSERT_MSG(rc == 0, "%s: %d %s", dtype_name(types[k]), rc, merr.msg);
    float logits[512];
    static const uint32_t prompt[] = {1, 300, 301, 302};
    for (uint32_t pos = 0; pos < 4; pos++) {
      KT_ASSERT_OK(model_ref_forward(r, prompt[pos], pos, logits));
      float lo = logits[0], hi = logits[0];
      for (int i = 0; i < 512; i++) {
        KT_ASSERT(isfinite(logits[i]));
        lo = fminf(lo, logits[i]);
        hi = fmaxf(hi, logits[i]);
      }
      KT_ASSERT_MSG(hi - lo > 1.0f && hi - lo < 100.0f, "%s: logit range %g", dtype_name(types[k]),
                    (double)(hi - lo));
      if (pos == 3) kt_log("%s: logits in [%.2f, %.2f]", dtype_name(types[k]), lo, hi);
    }
    model_ref_free(r);
    gguf_close(f);
    free(buf);
  }
}

/* ---- printer ---- */

KT_TEST(print_info_lists_keys_tensors_and_totals) {
  const char *path = model("models/stories260K.gguf");
  if (!path) KT_SKIP("models/stories260K.gguf not found");
  struct gguf_file *f;
  KT_ASSERT_OK(gguf_open(path, &f, NULL));
  char *text = NULL;
  size_t len = 0;
  FILE *out = open_memstream(&text, &len);
  KT_ASSERT(out != NULL);
  gguf_print_info(f, out);
  fclose(out);
  KT_CHECK(strstr(text, "GGUF v3") != NULL);
  KT_CHECK(strstr(text, "alignment 32") != NULL);
  KT_CHECK(strstr(text, "tokenizer.ggml.tokens = [\"<unk>\", \"<s>\"") != NULL);
  KT_CHECK(strstr(text, "506 more]") != NULL);
  KT_CHECK(strstr(text, "general.architecture = \"llama\"") != NULL);
  KT_CHECK(strstr(text, "llama.block_count = 5") != NULL);
  KT_CHECK(strstr(text, "token_embd.weight") != NULL);
  KT_CHECK(strstr(text, "[64, 512]") != NULL);
  KT_CHECK(strstr(text, "48 tensors") != NULL);
  KT_CHECK(strstr(text, "1171200 bytes") != NULL);
  free(text);
  gguf_close(f);

  /* escapes and every value type print without trouble */
  struct gguf_writer *w;
  KT_ASSERT_OK(gguf_writer_new(&w));
  KT_ASSERT_OK(build_all_types(w));
  KT_ASSERT_OK(gguf_writer_add_str(w, "t.ctl", "a\"b\\c\nd\x01"));
  void *buf;
  size_t size;
  KT_ASSERT_OK(gguf_writer_write_mem(w, &buf, &size));
  KT_ASSERT_OK(gguf_open_memory(buf, size, &f, NULL));
  out = open_memstream(&text, &len);
  KT_ASSERT(out != NULL);
  gguf_print_info(f, out);
  fclose(out);
  KT_CHECK(strstr(text, "\"a\\\"b\\\\c\\nd\\x01\"") != NULL);
  KT_CHECK(strstr(text, "n.u16 = [[1, 2], [3], []]") != NULL);
  KT_CHECK(strstr(text, "t.true = true") != NULL);
  KT_CHECK(strstr(text, "t.i64 = -9223372036854775807") != NULL);
  free(text);
  gguf_close(f);
  free(buf);
  gguf_writer_free(w);
}

/* ---- random damage ---- */

KT_TEST(random_byte_damage_never_crashes) {
  struct synth_params p;
  synth_params_default(&p);
  p.n_layers = 1;
  p.vocab = 300;
  p.type = DTYPE_Q8_0;
  void *buf;
  size_t size;
  KT_ASSERT_OK(synth_write_mem(&p, &buf, &size));
  struct gguf_file *f;
  KT_ASSERT_OK(gguf_open_memory(buf, size, &f, NULL));
  size_t head = (size_t)f->data_offset;
  gguf_close(f);
  uint8_t *c = malloc(size);
  KT_ASSERT(c != NULL);
  int ok = 0, bad = 0;
  for (int iter = 0; iter < 3000; iter++) {
    memcpy(c, buf, size);
    int n = (int)kt_rand_range(1, 4);
    for (int k = 0; k < n; k++) {
      size_t at = kt_rand_range(0, (uint32_t)head - 1);
      c[at] = kt_rand_range(0, 3) == 0 ? (uint8_t)0xff : (uint8_t)kt_rand_u64();
    }
    struct gguf_error err;
    int rc = open_copy(c, size, &err);
    if (rc == 0) {
      ok++;
    } else {
      bad++;
      KT_ASSERT_MSG(rc == KVD_E_FORMAT && err.msg[0], "rc %d msg '%s'", rc, err.msg);
    }
  }
  kt_log("%d damaged files accepted (values changed), %d refused", ok, bad);
  free(c);
  free(buf);
}

/* Defect: loading a FIFO blocked the loader thread forever (open waited for a writer); four of
 * them wedged every later load. A FIFO, a directory or a device is refused at once. */
KT_TEST(non_regular_files_are_refused_without_blocking) {
  char fifo[512];
  snprintf(fifo, sizeof fifo, "%s/model-fifo.gguf", kt_tmp_dir());
  unlink(fifo);
  KT_ASSERT(mkfifo(fifo, 0600) == 0);
  struct gguf_file *f = NULL;
  struct gguf_error err;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  int rc = gguf_open(fifo, &f, &err); /* before the fix: never returns (no writer) */
  clock_gettime(CLOCK_MONOTONIC, &t1);
  KT_CHECK_EQ(rc, KVD_EINVAL);
  KT_CHECK(f == NULL);
  KT_CHECK_MSG(strstr(err.msg, "not a regular file"), "msg: %s", err.msg);
  KT_CHECK((t1.tv_sec - t0.tv_sec) < 2);
  unlink(fifo);
  KT_CHECK_EQ(gguf_open(kt_tmp_dir(), &f, &err), KVD_EINVAL); /* a directory */
  KT_CHECK_EQ(gguf_open("/dev/null", &f, &err), KVD_EINVAL); /* a device */
}

/* Defect: a file that is not GGUF had its first bytes quoted in the error, which travels back
 * to the client: models.load of /etc/shadow answered "bad magic 'root'". */
KT_TEST(errors_never_quote_a_non_gguf_file) {
  char path[512];
  snprintf(path, sizeof path, "%s/secret.txt", kt_tmp_dir());
  FILE *fp = fopen(path, "w");
  KT_ASSERT(fp != NULL);
  fputs("root:$6$s3cr3t:19000:0:99999:7:::\n", fp);
  fclose(fp);
  struct gguf_file *f = NULL;
  struct gguf_error err;
  KT_CHECK_EQ(gguf_open(path, &f, &err), KVD_E_FORMAT);
  KT_CHECK_MSG(!strstr(err.msg, "root") && !strstr(err.msg, "s3cr3t") && !strstr(err.msg, "0x"),
               "msg: %s", err.msg);
  KT_CHECK(strstr(err.msg, "not a GGUF file") != NULL);
  unlink(path);
}
