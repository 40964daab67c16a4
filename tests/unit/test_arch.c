/* Architecture hyperparameters and weight binding: the real test models read as SOURCES.md
 * describes them, and every missing or inconsistent key or tensor of a synthetic model is refused
 * with an error that names it. */
#include "kt.h"
#include "kvd_error.h"

#include "arch.h"
#include "gguf.h"
#include "gguf_write.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the real files ------------------------------------------------------------------------ */

static struct gguf_file *open_shared(const char *rel) {
  const char *path = kt_shared_path(rel);
  if (!path) return NULL;
  struct gguf_file *f = NULL;
  struct gguf_error gerr = {0};
  int rc = gguf_open(path, &f, &gerr);
  if (rc < 0) {
    kt__fail(__FILE__, __LINE__, "gguf_open(%s): %s: %s", rel, kvd_strerror(rc), gerr.msg);
    return NULL;
  }
  return f;
}

#define OPEN_OR_SKIP(f, rel)                                                                       \
  struct gguf_file *f = open_shared(rel);                                                          \
  if (!f) {                                                                                        \
    if (kt__failed()) return;                                                                      \
    KT_SKIP("%s not found under KVD_SHARED_DIR", rel);                                             \
  }

static bool near(float a, float b) {
  return fabsf(a - b) <= 1e-6f * fabsf(b);
}

KT_TEST(stories260K_f32_hyperparameters) {
  OPEN_OR_SKIP(f, "models/stories260K.gguf");
  struct model_error err = {{0}};
  struct model_weights *w = NULL;
  int rc = model_weights_new(f, &w, &err);
  if (rc < 0) kt_log("%s", err.msg);
  KT_CHECK_EQ(rc, 0);
  if (w) {
    const struct model_hparams *hp = &w->hp;
    KT_CHECK_EQ(hp->arch, MODEL_ARCH_LLAMA);
    KT_CHECK(strcmp(hp->name, "llama") == 0);
    KT_CHECK_EQ(hp->n_embd, 64);
    KT_CHECK_EQ(hp->n_layer, 5);
    KT_CHECK_EQ(hp->n_head, 8);
    KT_CHECK_EQ(hp->n_head_kv, 4);
    KT_CHECK_EQ(hp->head_dim, 8);
    KT_CHECK_EQ(hp->n_ff, 172);
    KT_CHECK_EQ(hp->n_vocab, 512); /* no llama.vocab_size: from the tokenizer's token list */
    KT_CHECK_EQ(hp->n_ctx_train, 2048);
    KT_CHECK(near(hp->rms_eps, 1e-5f));
    KT_CHECK(hp->rope_freq_base == 10000.0f); /* the default: the key is absent */
    KT_CHECK_EQ(hp->n_rot, 8);
    KT_CHECK_EQ(hp->rope_mode, MODEL_ROPE_NORMAL);
    KT_CHECK(hp->rope_freq_scale == 1.0f);
    KT_CHECK_EQ(hp->bos_id, 1);
    KT_CHECK_EQ(hp->eos_id, 2);
    /* It carries its own copy of the classifier. */
    KT_CHECK(!w->tied);
    KT_CHECK(w->output == gguf_find_tensor(f, "output.weight"));
    KT_CHECK(w->output != w->token_embd);
    KT_CHECK_EQ(w->token_embd->type, DTYPE_F32);
    KT_CHECK(w->layers[4].ffn_down == gguf_find_tensor(f, "blk.4.ffn_down.weight"));
    KT_CHECK(w->layers[0].attn_q_bias == NULL);
  }
  model_weights_free(w);
  gguf_close(f);
}

KT_TEST(stories260K_f16_has_a_tied_classifier) {
  OPEN_OR_SKIP(f, "models/stories260K-f16.gguf");
  KT_CHECK(gguf_find_tensor(f, "output.weight") == NULL);
  struct model_error err = {{0}};
  struct model_weights *w = NULL;
  int rc = model_weights_new(f, &w, &err);
  if (rc < 0) kt_log("%s", err.msg);
  KT_CHECK_EQ(rc, 0);
  if (w) {
    KT_CHECK_EQ(w->hp.n_ctx_train, 512);
    KT_CHECK_EQ(w->hp.n_vocab, 512); /* llama.vocab_size this time */
    KT_CHECK_EQ(w->hp.n_embd, 64);
    KT_CHECK_EQ(w->hp.n_head_kv, 4);
    KT_CHECK(strcmp(w->hp.name, "stories260K") == 0);
    KT_CHECK(w->tied);
    KT_CHECK(w->output == w->token_embd);
    KT_CHECK_EQ(w->token_embd->type, DTYPE_F16);
    KT_CHECK_EQ(w->layers[0].attn_q->type, DTYPE_F16);
    KT_CHECK_EQ(w->layers[0].attn_norm->type, DTYPE_F32);
    KT_CHECK_EQ(w->output_norm->type, DTYPE_F32);
  }
  model_weights_free(w);
  gguf_close(f);
}

KT_TEST(quantized_stories260K_records_each_tensor_type) {
  OPEN_OR_SKIP(f, "models/quant/stories260K-q4_0.gguf");
  struct model_error err = {{0}};
  struct model_weights *w = NULL;
  int rc = model_weights_new(f, &w, &err);
  if (rc < 0) kt_log("%s", err.msg);
  KT_CHECK_EQ(rc, 0);
  if (w) {
    /* The classifier was requantized on its own, so it must not be taken from the embeddings. */
    KT_CHECK(!w->tied);
    KT_CHECK_EQ(w->output->type, DTYPE_Q8_0);
    KT_CHECK_EQ(w->token_embd->type, DTYPE_Q4_0);
    for (uint32_t il = 0; il < w->hp.n_layer; il++) {
      KT_CHECK_EQ(w->layers[il].ffn_down->type, DTYPE_F16);
      KT_CHECK_EQ(w->layers[il].ffn_up->type, DTYPE_Q4_0);
      KT_CHECK_EQ(w->layers[il].ffn_norm->type, DTYPE_F32);
    }
  }
  model_weights_free(w);
  gguf_close(f);
}

KT_TEST(wide_synth_hyperparameters_and_k_quant_types) {
  OPEN_OR_SKIP(f, "models/quant/wide-synth-q4_k_m.gguf");
  struct model_error err = {{0}};
  struct model_weights *w = NULL;
  int rc = model_weights_new(f, &w, &err);
  if (rc < 0) kt_log("%s", err.msg);
  KT_CHECK_EQ(rc, 0);
  if (w) {
    const struct model_hparams *hp = &w->hp;
    KT_CHECK_EQ(hp->n_embd, 256);
    KT_CHECK_EQ(hp->n_layer, 4);
    KT_CHECK_EQ(hp->n_head, 8);
    KT_CHECK_EQ(hp->n_head_kv, 4);
    KT_CHECK_EQ(hp->head_dim, 32);
    KT_CHECK_EQ(hp->n_ff, 768);
    KT_CHECK_EQ(hp->n_vocab, 512);
    KT_CHECK_EQ(hp->n_ctx_train, 512);
    KT_CHECK_EQ(hp->n_rot, 32);
    KT_CHECK(strcmp(hp->name, "kvd-wide-synthetic") == 0);
    KT_CHECK(!w->tied);
    KT_CHECK_EQ(w->output->type, DTYPE_Q6_K);
    KT_CHECK_EQ(w->token_embd->type, DTYPE_Q4_K);
    KT_CHECK_EQ(w->layers[0].attn_v->type, DTYPE_Q4_K);
    KT_CHECK_EQ(w->layers[2].attn_v->type, DTYPE_Q6_K);
    KT_CHECK_EQ(w->layers[3].ffn_down->type, DTYPE_Q6_K);
  }
  model_weights_free(w);
  gguf_close(f);
}

KT_TEST(gpt2_is_refused_by_name) {
  OPEN_OR_SKIP(f, "models/vocab/ggml-vocab-gpt-2.gguf");
  struct model_error err = {{0}};
  struct model_hparams hp;
  KT_CHECK_EQ(model_hparams_read(f, &hp, &err), KVD_E_UNSUPPORTED);
  KT_CHECK(strstr(err.msg, "'gpt2'") != NULL);
  struct model_weights *w = NULL;
  memset(&err, 0, sizeof err);
  KT_CHECK_EQ(model_weights_new(f, &w, &err), KVD_E_UNSUPPORTED);
  KT_CHECK(w == NULL);
  KT_CHECK(strstr(err.msg, "gpt2") != NULL);
  gguf_close(f);
}

KT_TEST(vocabulary_only_llama_file_has_hparams_but_no_weights) {
  OPEN_OR_SKIP(f, "models/vocab/ggml-vocab-llama-spm.gguf");
  struct model_error err = {{0}};
  struct model_hparams hp;
  int rc = model_hparams_read(f, &hp, &err);
  if (rc < 0) kt_log("%s", err.msg);
  KT_CHECK_EQ(rc, 0);
  if (rc == 0) {
    /* Llama-2 7B's shape, no GQA. */
    KT_CHECK_EQ(hp.n_embd, 4096);
    KT_CHECK_EQ(hp.n_head_kv, 32);
    KT_CHECK_EQ(hp.head_dim, 128);
    KT_CHECK_EQ(hp.n_vocab, 32000);
  }
  struct model_weights *w = NULL;
  KT_CHECK_EQ(model_weights_new(f, &w, &err), KVD_E_FORMAT);
  KT_CHECK(strstr(err.msg, "token_embd.weight") != NULL);
  gguf_close(f);
}

KT_TEST(printers_describe_the_model) {
  OPEN_OR_SKIP(f, "models/stories260K-f16.gguf");
  struct model_error err = {{0}};
  struct model_weights *w = NULL;
  KT_ASSERT_OK(model_weights_new(f, &w, &err));
  char *text = NULL;
  size_t len = 0;
  FILE *out = open_memstream(&text, &len);
  KT_ASSERT(out != NULL);
  model_print_hparams(&w->hp, out);
  model_print_weights(w, out);
  fclose(out);
  KT_CHECK(strstr(text, "llama") != NULL);
  KT_CHECK(strstr(text, "8 query, 4 kv") != NULL);
  KT_CHECK(strstr(text, "normal, base 10000, 8 dims") != NULL);
  KT_CHECK(strstr(text, "tied to token_embd.weight") != NULL);
  for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n"))
    kt_log("%s", line);
  free(text);
  model_weights_free(w);
  gguf_close(f);
}

/* ---- synthetic models ---------------------------------------------------------------------- */

/* A tiny model spec to break one piece at a time: dim 8, 2 heads of 4, 1 kv head, 2 layers,
 * ffn 12, vocab 6, context 16; all-zero tensors, f32 unless a test changes the type. */
struct spec_kv {
  char key[64];
  enum gguf_vtype type; /* UINT32, FLOAT32, STRING, or ARRAY: n_strings strings "t" */
  uint32_t u32;
  float f32;
  const char *str;
  uint64_t n_strings;
};

struct spec_tensor {
  char name[64];
  uint32_t n_dims;
  uint64_t ne[2];
  enum dtype type;
};

struct spec {
  struct spec_kv kv[32];
  size_t n_kv;
  struct spec_tensor t[40];
  size_t n_t;
};

static void spec_set(struct spec *s, const char *key, enum gguf_vtype type, uint32_t u32, float f32,
                     const char *str) {
  size_t i = 0;
  while (i < s->n_kv && strcmp(s->kv[i].key, key) != 0)
    i++;
  if (i == s->n_kv) s->n_kv++;
  s->kv[i] = (struct spec_kv){.type = type, .u32 = u32, .f32 = f32, .str = str};
  snprintf(s->kv[i].key, sizeof s->kv[i].key, "%s", key);
}

static void spec_u32(struct spec *s, const char *key, uint32_t v) {
  spec_set(s, key, GGUF_VT_UINT32, v, 0, NULL);
}

static void spec_del(struct spec *s, const char *key) {
  for (size_t i = 0; i < s->n_kv; i++) {
    if (strcmp(s->kv[i].key, key) != 0) continue;
    memmove(&s->kv[i], &s->kv[i + 1], (s->n_kv - i - 1) * sizeof s->kv[0]);
    s->n_kv--;
    return;
  }
}

static void spec_tensor(struct spec *s, const char *name, uint64_t ne0, uint64_t ne1) {
  struct spec_tensor *t = &s->t[s->n_t++];
  *t = (struct spec_tensor){.n_dims = ne1 ? 2 : 1, .ne = {ne0, ne1}, .type = DTYPE_F32};
  snprintf(t->name, sizeof t->name, "%s", name);
}

static struct spec_tensor *spec_find(struct spec *s, const char *name) {
  for (size_t i = 0; i < s->n_t; i++)
    if (strcmp(s->t[i].name, name) == 0) return &s->t[i];
  return NULL;
}

static void spec_drop_tensor(struct spec *s, const char *name) {
  struct spec_tensor *t = spec_find(s, name);
  if (!t) return;
  *t = s->t[--s->n_t];
}

static void spec_init(struct spec *s, const char *arch) {
  memset(s, 0, sizeof *s);
  char key[64];
  spec_set(s, "general.architecture", GGUF_VT_STRING, 0, 0, arch);
#define ARCH_U32(suffix, v)                                                                        \
  do {                                                                                             \
    snprintf(key, sizeof key, "%s." suffix, arch);                                                 \
    spec_u32(s, key, v);                                                                           \
  } while (0)
  ARCH_U32("embedding_length", 8);
  ARCH_U32("block_count", 2);
  ARCH_U32("attention.head_count", 2);
  ARCH_U32("attention.head_count_kv", 1);
  ARCH_U32("feed_forward_length", 12);
  ARCH_U32("context_length", 16);
  ARCH_U32("vocab_size", 6);
#undef ARCH_U32
  snprintf(key, sizeof key, "%s.attention.layer_norm_rms_epsilon", arch);
  spec_set(s, key, GGUF_VT_FLOAT32, 0, 1e-6f, NULL);
  bool biased = strcmp(arch, "qwen2") == 0;
  spec_tensor(s, "token_embd.weight", 8, 6);
  spec_tensor(s, "output_norm.weight", 8, 0);
  for (int il = 0; il < 2; il++) {
    char name[64];
#define LAYER_T(suffix, ne0, ne1)                                                                  \
  do {                                                                                             \
    snprintf(name, sizeof name, "blk.%d." suffix, il);                                             \
    spec_tensor(s, name, ne0, ne1);                                                                \
  } while (0)
    LAYER_T("attn_norm.weight", 8, 0);
    LAYER_T("attn_q.weight", 8, 8);
    LAYER_T("attn_k.weight", 8, 4);
    LAYER_T("attn_v.weight", 8, 4);
    if (biased) {
      LAYER_T("attn_q.bias", 8, 0);
      LAYER_T("attn_k.bias", 4, 0);
      LAYER_T("attn_v.bias", 4, 0);
    }
    LAYER_T("attn_output.weight", 8, 8);
    LAYER_T("ffn_norm.weight", 8, 0);
    LAYER_T("ffn_gate.weight", 8, 12);
    LAYER_T("ffn_up.weight", 8, 12);
    LAYER_T("ffn_down.weight", 12, 8);
#undef LAYER_T
  }
}

static int zero_fill(void *ctx, void *dst, uint64_t nbytes) {
  (void)ctx;
  memset(dst, 0, nbytes);
  return 0;
}

/* The spec as GGUF bytes, through the project's writer. */
static int spec_write(const struct spec *s, void **ret_data, size_t *ret_size) {
  const char *t_strings[64]; /* the token list: n_strings <= 64 copies of "t" */
  for (size_t i = 0; i < 64; i++)
    t_strings[i] = "t";
  struct gguf_writer *gw = NULL;
  int rc = gguf_writer_new(&gw);
  for (size_t i = 0; rc == 0 && i < s->n_kv; i++) {
    const struct spec_kv *kv = &s->kv[i];
    if (kv->type == GGUF_VT_UINT32)
      rc = gguf_writer_add_u32(gw, kv->key, kv->u32);
    else if (kv->type == GGUF_VT_FLOAT32)
      rc = gguf_writer_add_f32(gw, kv->key, kv->f32);
    else if (kv->type == GGUF_VT_STRING)
      rc = gguf_writer_add_str(gw, kv->key, kv->str);
    else
      rc = gguf_writer_add_str_arr(gw, kv->key, t_strings, kv->n_strings > 64 ? 64 : kv->n_strings);
  }
  for (size_t i = 0; rc == 0 && i < s->n_t; i++) {
    const struct spec_tensor *t = &s->t[i];
    rc = gguf_writer_add_tensor_fill(gw, t->name, t->n_dims, t->ne, t->type, zero_fill, NULL);
  }
  if (rc == 0) rc = gguf_writer_write_mem(gw, ret_data, ret_size);
  gguf_writer_free(gw);
  return rc;
}

/* What a test keeps of a bound synthetic model: the weights themselves point into the file. */
struct bound {
  struct model_hparams hp;
  bool tied;
};

/* Builds the spec, opens it and binds it: the kvd code of model_weights_new (err filled), or
 * INT32_MIN when the harness itself failed. */
static int spec_bind(struct spec *s, struct bound *ret, struct model_error *err) {
  void *bytes = NULL;
  size_t size;
  int rc = spec_write(s, &bytes, &size);
  if (rc < 0) {
    kt_log("spec_write: %s", kvd_strerror(rc));
    return INT32_MIN;
  }
  struct gguf_file *f = NULL;
  struct gguf_error gerr = {0};
  rc = gguf_open_memory(bytes, size, &f, &gerr);
  if (rc < 0) {
    kt_log("gguf_open_memory: %s at %llu", gerr.msg, (unsigned long long)gerr.offset);
    free(bytes);
    return INT32_MIN;
  }
  memset(err, 0, sizeof *err);
  struct model_weights *w = NULL;
  rc = model_weights_new(f, &w, err);
  if (rc == 0 && ret) *ret = (struct bound){.hp = w->hp, .tied = w->tied};
  model_weights_free(w);
  gguf_close(f);
  free(bytes);
  return rc;
}

/* Expects model_weights_new on s to fail with want and an error naming what. */
#define EXPECT_REFUSED(s, want, what)                                                              \
  do {                                                                                             \
    struct model_error e_;                                                                         \
    int rc_ = spec_bind(s, NULL, &e_);                                                             \
    KT_ASSERT_MSG(rc_ != INT32_MIN, "could not build the test file");                              \
    if (rc_ != (want) || !strstr(e_.msg, what))                                                    \
      kt__fail(__FILE__, __LINE__, "want %d naming '%s', got %d: %s", want, what, rc_,             \
               rc_ < 0 ? e_.msg : "(success)");                                                    \
  } while (0)

KT_TEST(synthetic_llama_binds) {
  struct spec s;
  spec_init(&s, "llama");
  struct model_error err;
  struct bound b;
  int rc = spec_bind(&s, &b, &err);
  KT_ASSERT_MSG(rc == 0, "%d: %s", rc, err.msg);
  KT_CHECK_EQ(b.hp.head_dim, 4);
  KT_CHECK_EQ(b.hp.n_rot, 4); /* default: the head dimension */
  KT_CHECK(b.hp.rope_freq_base == 10000.0f);
  KT_CHECK(b.tied); /* no output.weight */
  KT_CHECK_EQ(b.hp.bos_id, -1);
  KT_CHECK_EQ(b.hp.eos_id, -1);
}

KT_TEST(every_missing_required_key_is_named) {
  static const char *const required[] = {
      "general.architecture",
      "llama.embedding_length",
      "llama.block_count",
      "llama.attention.head_count",
      "llama.feed_forward_length",
      "llama.context_length",
      "llama.attention.layer_norm_rms_epsilon",
      "llama.vocab_size",
  };
  for (size_t i = 0; i < sizeof required / sizeof required[0]; i++) {
    struct spec s;
    spec_init(&s, "llama");
    spec_del(&s, required[i]);
    EXPECT_REFUSED(&s, KVD_E_FORMAT, required[i]);
  }
}

KT_TEST(vocab_size_falls_back_to_the_token_list) {
  struct spec s;
  spec_init(&s, "llama");
  spec_del(&s, "llama.vocab_size");
  spec_set(&s, "tokenizer.ggml.tokens", GGUF_VT_ARRAY, 0, 0, NULL);
  s.kv[s.n_kv - 1].n_strings = 6;
  struct model_error err;
  struct bound b;
  int rc = spec_bind(&s, &b, &err);
  KT_ASSERT_MSG(rc == 0, "%d: %s", rc, err.msg);
  KT_CHECK_EQ(b.hp.n_vocab, 6);
  /* A token list that disagrees with the embedding is caught at the tensor. */
  s.kv[s.n_kv - 1].n_strings = 7;
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "token_embd.weight");
}

KT_TEST(inconsistent_hyperparameters_are_named) {
  struct spec s;
  spec_init(&s, "llama");
  spec_u32(&s, "llama.attention.head_count", 3); /* 8 is not divisible by 3 */
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "llama.attention.head_count");

  spec_init(&s, "llama");
  spec_u32(&s, "llama.attention.head_count_kv", 3); /* 2 heads are not divisible by 3 */
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "llama.attention.head_count_kv");

  spec_init(&s, "llama");
  spec_u32(&s, "llama.block_count", 0);
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "llama.block_count");

  spec_init(&s, "llama");
  spec_u32(&s, "llama.rope.dimension_count", 6); /* more than the head dimension, 4 */
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "llama.rope.dimension_count");

  spec_init(&s, "llama");
  spec_set(&s, "llama.embedding_length", GGUF_VT_STRING, 0, 0, "eight");
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "llama.embedding_length");

  /* A head size decoupled from n_embd / n_head (qwen3) is read from key_length: the tensors
   * must then have that shape, and values must be as large as keys. */
  spec_init(&s, "llama");
  spec_u32(&s, "llama.attention.key_length", 8);
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "attn_q.weight");
  spec_init(&s, "llama");
  spec_u32(&s, "llama.attention.key_length", 8);
  spec_u32(&s, "llama.attention.value_length", 4);
  EXPECT_REFUSED(&s, KVD_E_UNSUPPORTED, "value_length");
  spec_init(&s, "llama");
  spec_u32(&s, "llama.attention.key_length", 3);
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "key_length");
}

KT_TEST(tensor_problems_are_named) {
  struct spec s;
  spec_init(&s, "llama");
  spec_drop_tensor(&s, "blk.1.ffn_up.weight");
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "blk.1.ffn_up.weight");

  spec_init(&s, "llama");
  spec_find(&s, "blk.0.attn_k.weight")->ne[1] = 8; /* as if there were 2 kv heads */
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "blk.0.attn_k.weight");

  spec_init(&s, "llama");
  spec_find(&s, "output_norm.weight")->ne[0] = 4;
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "output_norm.weight");

  /* A tensor the forward pass would not read (here gemma2's post-attention norm on a llama
   * file) must not be ignored. */
  spec_init(&s, "llama");
  spec_tensor(&s, "blk.0.post_attention_norm.weight", 4, 0);
  EXPECT_REFUSED(&s, KVD_E_UNSUPPORTED, "blk.0.post_attention_norm.weight");

  /* Llama 3.1's frequency table is read now, and checked: factors must be positive (these are
   * zeros), one per rotated pair. */
  spec_init(&s, "llama");
  spec_tensor(&s, "rope_freqs.weight", 2, 0);
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "rope_freqs.weight");
  spec_init(&s, "llama");
  spec_tensor(&s, "rope_freqs.weight", 3, 0);
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "rope_freqs.weight");

  spec_init(&s, "llama");
  spec_tensor(&s, "output.weight", 8, 5); /* one row short of the vocabulary */
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "output.weight");

  /* Integer tensors have a size but no dequantizer. */
  spec_init(&s, "llama");
  spec_find(&s, "blk.1.ffn_norm.weight")->type = DTYPE_I32;
  EXPECT_REFUSED(&s, KVD_E_UNSUPPORTED, "blk.1.ffn_norm.weight");
}

KT_TEST(untied_classifier_is_bound) {
  struct spec s;
  spec_init(&s, "llama");
  spec_tensor(&s, "output.weight", 8, 6);
  struct model_error err;
  struct bound b;
  int rc = spec_bind(&s, &b, &err);
  KT_ASSERT_MSG(rc == 0, "%d: %s", rc, err.msg);
  KT_CHECK(!b.tied);
}

KT_TEST(other_architectures_are_refused_by_name) {
  struct spec s;
  spec_init(&s, "falcon");
  EXPECT_REFUSED(&s, KVD_E_UNSUPPORTED, "'falcon'");
  spec_init(&s, "llama");
  spec_u32(&s, "llama.expert_count", 8);
  EXPECT_REFUSED(&s, KVD_E_UNSUPPORTED, "llama.expert_count");
  /* The refusal names what kvd runs. */
  spec_init(&s, "gpt2");
  EXPECT_REFUSED(&s, KVD_E_UNSUPPORTED, "gemma3");
}

/* A window shorter than the context applies to every layer of a llama/mistral file; one as long
 * as the context is no window at all. */
KT_TEST(sliding_window_applies_to_every_layer_unless_as_long_as_the_context) {
  struct spec s;
  spec_init(&s, "mistral");
  spec_u32(&s, "mistral.attention.sliding_window", 4);
  struct model_error err;
  struct bound b;
  int rc = spec_bind(&s, &b, &err);
  KT_ASSERT_MSG(rc == 0, "%d: %s", rc, err.msg);
  KT_CHECK_EQ(b.hp.n_swa, 4);
  KT_CHECK_EQ(model_layer_window(&b.hp, 0), 4);
  KT_CHECK_EQ(model_layer_window(&b.hp, 1), 4);
  KT_CHECK(model_all_windowed(&b.hp));
  spec_u32(&s, "mistral.attention.sliding_window", 16); /* = context_length */
  rc = spec_bind(&s, &b, &err);
  KT_ASSERT_MSG(rc == 0, "%d: %s", rc, err.msg);
  KT_CHECK_EQ(b.hp.n_swa, 0);
  KT_CHECK(!model_any_window(&b.hp));
}

KT_TEST(mistral_is_llama_shaped) {
  struct spec s;
  spec_init(&s, "mistral");
  struct model_error err;
  struct bound b;
  int rc = spec_bind(&s, &b, &err);
  KT_ASSERT_MSG(rc == 0, "%d: %s", rc, err.msg);
  KT_CHECK_EQ(b.hp.arch, MODEL_ARCH_MISTRAL);
  KT_CHECK_EQ(b.hp.rope_mode, MODEL_ROPE_NORMAL);
}

KT_TEST(qwen2_needs_biases_and_rotates_halves) {
  struct spec s;
  spec_init(&s, "qwen2");
  struct model_error err;
  struct bound b;
  int rc = spec_bind(&s, &b, &err);
  KT_ASSERT_MSG(rc == 0, "%d: %s", rc, err.msg);
  KT_CHECK_EQ(b.hp.arch, MODEL_ARCH_QWEN2);
  KT_CHECK_EQ(b.hp.rope_mode, MODEL_ROPE_NEOX);
  spec_drop_tensor(&s, "blk.1.attn_k.bias");
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "blk.1.attn_k.bias");
  spec_init(&s, "qwen2");
  spec_find(&s, "blk.0.attn_v.bias")->ne[0] = 8;
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "blk.0.attn_v.bias");
}

KT_TEST(rope_scaling_linear_or_refused_by_name) {
  struct spec s;
  spec_init(&s, "llama");
  spec_set(&s, "llama.rope.scaling.type", GGUF_VT_STRING, 0, 0, "linear");
  spec_set(&s, "llama.rope.scaling.factor", GGUF_VT_FLOAT32, 0, 4.0f, NULL);
  spec_set(&s, "llama.rope.freq_base", GGUF_VT_FLOAT32, 0, 500000.0f, NULL);
  struct model_error err;
  struct bound b;
  int rc = spec_bind(&s, &b, &err);
  KT_ASSERT_MSG(rc == 0, "%d: %s", rc, err.msg);
  KT_CHECK(b.hp.rope_freq_scale == 0.25f);
  KT_CHECK(b.hp.rope_freq_base == 500000.0f);

  spec_set(&s, "llama.rope.scaling.type", GGUF_VT_STRING, 0, 0, "none");
  rc = spec_bind(&s, &b, &err);
  KT_ASSERT_MSG(rc == 0, "%d: %s", rc, err.msg);
  KT_CHECK(b.hp.rope_freq_scale == 1.0f);

  spec_set(&s, "llama.rope.scaling.type", GGUF_VT_STRING, 0, 0, "dynamic");
  EXPECT_REFUSED(&s, KVD_E_UNSUPPORTED, "'dynamic'");
}

/* YaRN (Peng et al. 2023): pairs that turn more than beta_fast times over the original context
 * keep their trained frequency, pairs turning fewer than beta_slow times are interpolated by
 * 1/factor, a linear ramp between; the rotated values grow by 1 + 0.1 ln(factor). */
KT_TEST(yarn_keeps_fast_pairs_and_interpolates_slow_ones) {
  struct spec s;
  spec_init(&s, "llama");
  spec_set(&s, "llama.rope.scaling.type", GGUF_VT_STRING, 0, 0, "yarn");
  spec_set(&s, "llama.rope.scaling.factor", GGUF_VT_FLOAT32, 0, 4.0f, NULL);
  spec_u32(&s, "llama.rope.scaling.original_context_length", 4096);
  struct model_error err;
  struct bound b;
  int rc = spec_bind(&s, &b, &err);
  KT_ASSERT_MSG(rc == 0, "%d: %s", rc, err.msg);
  KT_CHECK(b.hp.rope_yarn_factor == 1.0f && b.hp.rope_yarn_beta_fast == 32.0f &&
           b.hp.rope_yarn_beta_slow == 1.0f);
  /* A 128-dimension rotation at base 10000 (the head of this file is smaller; the formula is
   * what is under test). */
  struct model_rope r;
  model_layer_rope(&b.hp, 0, 16, &r);
  r.n_rot = 128;
  double base = 10000.0;
  /* Pair i turns 4096 * base^(-2i/128) / 2pi times over the original context. */
  for (uint32_t i = 0; i < 64; i++) {
    double extrap = pow(base, -2.0 * i / 128.0), turns = 4096.0 * extrap / (2 * M_PI);
    double f = model_rope_freq(&r, i);
    if (turns > 40.0) KT_CHECK_MSG(fabs(f / extrap - 1) < 1e-12, "pair %u not kept", i);
    if (turns < 0.8) KT_CHECK_MSG(fabs(f / (extrap / 4) - 1) < 1e-12, "pair %u not interpolated", i);
    KT_CHECK(f <= extrap * (1 + 1e-12) && f >= extrap / 4 * (1 - 1e-12));
  }
  KT_CHECK(fabs(model_rope_mscale(&r) - (1 + 0.1 * log(4.0))) < 1e-6);
}

/* gemma2: GeGLU, sqrt(n_embd) embedding scale, post-norms required, every other layer windowed,
 * soft-capping from the file. */
KT_TEST(gemma2_switches_and_required_post_norms) {
  struct spec s;
  spec_init(&s, "gemma2");
  spec_u32(&s, "gemma2.attention.sliding_window", 8);
  spec_set(&s, "gemma2.attn_logit_softcapping", GGUF_VT_FLOAT32, 0, 50.0f, NULL);
  spec_set(&s, "gemma2.final_logit_softcapping", GGUF_VT_FLOAT32, 0, 30.0f, NULL);
  for (int il = 0; il < 2; il++) {
    char name[64];
    snprintf(name, sizeof name, "blk.%d.post_attention_norm.weight", il);
    spec_tensor(&s, name, 8, 0);
    snprintf(name, sizeof name, "blk.%d.post_ffw_norm.weight", il);
    spec_tensor(&s, name, 8, 0);
  }
  struct model_error err;
  struct bound b;
  int rc = spec_bind(&s, &b, &err);
  KT_ASSERT_MSG(rc == 0, "%d: %s", rc, err.msg);
  KT_CHECK_EQ(b.hp.arch, MODEL_ARCH_GEMMA2);
  KT_CHECK_EQ(b.hp.ffn_act, MODEL_FFN_GELU);
  KT_CHECK_EQ(b.hp.rope_mode, MODEL_ROPE_NEOX);
  KT_CHECK(b.hp.post_norms);
  KT_CHECK(near(b.hp.embd_scale, sqrtf(8.0f)));
  KT_CHECK(b.hp.attn_softcap == 50.0f && b.hp.final_softcap == 30.0f);
  KT_CHECK_EQ(model_layer_window(&b.hp, 0), 8);
  KT_CHECK_EQ(model_layer_window(&b.hp, 1), 0);
  KT_CHECK(model_any_window(&b.hp) && !model_all_windowed(&b.hp));
  spec_drop_tensor(&s, "blk.1.post_ffw_norm.weight");
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "blk.1.post_ffw_norm.weight");
}

/* phi3: a fused [q | k | v] projection and a fused [gate | up] ffn_up, bound as row views. */
KT_TEST(phi3_fused_tensors_are_split_into_row_views) {
  struct spec s;
  spec_init(&s, "phi3");
  for (int il = 0; il < 2; il++) {
    char name[64];
    const char *drop[] = {"attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"};
    for (size_t i = 0; i < 5; i++) {
      snprintf(name, sizeof name, "blk.%d.%s.weight", il, drop[i]);
      spec_drop_tensor(&s, name);
    }
    snprintf(name, sizeof name, "blk.%d.attn_qkv.weight", il);
    spec_tensor(&s, name, 8, 16);
    snprintf(name, sizeof name, "blk.%d.ffn_up.weight", il);
    spec_tensor(&s, name, 8, 24);
  }
  void *bytes = NULL;
  size_t size;
  KT_ASSERT_OK(spec_write(&s, &bytes, &size));
  struct gguf_file *f = NULL;
  struct gguf_error gerr = {0};
  KT_ASSERT_OK(gguf_open_memory(bytes, size, &f, &gerr));
  struct model_weights *w = NULL;
  struct model_error err = {{0}};
  int rc = model_weights_new(f, &w, &err);
  KT_ASSERT_MSG(rc == 0, "%d: %s", rc, err.msg);
  const struct gguf_tensor *qkv = gguf_find_tensor(f, "blk.1.attn_qkv.weight");
  const struct gguf_tensor *up = gguf_find_tensor(f, "blk.1.ffn_up.weight");
  const struct model_layer *l = &w->layers[1];
  uint64_t row = 8 * 4; /* f32 rows of 8 */
  KT_CHECK(l->attn_q->data == qkv->data && l->attn_q->ne[1] == 8);
  KT_CHECK((const uint8_t *)l->attn_k->data == (const uint8_t *)qkv->data + 8 * row &&
           l->attn_k->ne[1] == 4);
  KT_CHECK((const uint8_t *)l->attn_v->data == (const uint8_t *)qkv->data + 12 * row &&
           l->attn_v->ne[1] == 4 && l->attn_v->nbytes == 4 * row);
  KT_CHECK(l->ffn_gate->data == up->data && l->ffn_gate->ne[1] == 12);
  KT_CHECK((const uint8_t *)l->ffn_up->data == (const uint8_t *)up->data + 12 * row);
  model_weights_free(w);
  gguf_close(f);
  free(bytes);
  /* A fused ffn_up of the wrong height is named. */
  spec_find(&s, "blk.0.ffn_up.weight")->ne[1] = 12;
  EXPECT_REFUSED(&s, KVD_E_FORMAT, "blk.0.ffn_up.weight");
}

/* The arch/ gemma3 file: five windowed layers of six, the sixth global with its own RoPE. */
KT_TEST(gemma3_file_interleaves_local_and_global_layers) {
  struct gguf_file *f = open_shared("models/arch/gemma3.gguf");
  if (!f) KT_SKIP("models/arch/gemma3.gguf not found");
  struct model_hparams hp;
  struct model_error err;
  KT_ASSERT_OK(model_hparams_read(f, &hp, &err));
  KT_CHECK_EQ(hp.arch, MODEL_ARCH_GEMMA3);
  KT_CHECK_EQ(hp.n_swa, 64);
  KT_CHECK_EQ(hp.swa_pattern, 6);
  for (uint32_t il = 0; il < 6; il++) {
    struct model_rope r;
    model_layer_rope(&hp, il, hp.n_ctx_train, &r);
    bool local = il < 5;
    KT_CHECK_EQ(model_layer_window(&hp, il), local ? 64u : 0u);
    KT_CHECK(r.freq_base == (local ? 10000.0f : 1000000.0f));
    KT_CHECK(r.freq_scale == (local ? 1.0f : 0.125f));
  }
  KT_CHECK(near(hp.embd_scale, sqrtf(128.0f)));
  KT_CHECK(near(hp.attn_scale, 0.125f)); /* 1/sqrt(head_dim 64) */
  gguf_close(f);
}
