/* Hyperparameters and weight binding for Llama-shaped GGUF models (see arch.h). */
#include "arch.h"

#include "kvd_error.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* Limits well above any model kvd could run, so that products of them (tensor sizes, KV cache
 * bytes) cannot overflow 64 bits and a corrupt header is caught here rather than by malloc. */
#define ARCH_MAX_DIM (1u << 20)
#define ARCH_MAX_LAYERS 4096u
#define ARCH_MAX_VOCAB (1u << 24)
#define ARCH_MAX_CTX (1u << 24)

/* The architectures kvd runs: each one's switches over the one forward pass (arch.h). */
static const struct arch_family {
  const char *name;
  enum model_arch arch;
  enum model_rope_mode rope_mode;
  bool qkv_bias;         /* q/k/v biases required (qwen2); optional everywhere else */
  bool qk_norm;          /* per-head q/k RMSNorm tensors required (qwen3, gemma3) */
  bool embd_scaled;      /* x = embedding * sqrt(n_embd) (gemma) */
  enum model_ffn_act act;
  bool post_norms;       /* post_attention_norm / post_ffw_norm required (gemma2/3) */
  uint32_t swa_pattern;  /* the default layer pattern of a declared window (arch.h) */
  bool swa_rope;         /* windowed layers use rope.freq_base_swa, default 10000, unscaled */
  bool fused;            /* attn_qkv may replace q/k/v, and ffn_up is [gate | up] (phi3) */
  uint32_t big_n_layer;  /* gemma's 27B sizes scale queries by 1/sqrt(n_embd / n_head) */
} arch_table[] = {
    {"llama", MODEL_ARCH_LLAMA, MODEL_ROPE_NORMAL, false, false, false, MODEL_FFN_SILU, false, 1,
     false, false, 0},
    {"mistral", MODEL_ARCH_MISTRAL, MODEL_ROPE_NORMAL, false, false, false, MODEL_FFN_SILU, false, 1,
     false, false, 0},
    {"qwen2", MODEL_ARCH_QWEN2, MODEL_ROPE_NEOX, true, false, false, MODEL_FFN_SILU, false, 1, false,
     false, 0},
    {"qwen3", MODEL_ARCH_QWEN3, MODEL_ROPE_NEOX, false, true, false, MODEL_FFN_SILU, false, 1, false,
     false, 0},
    {"gemma", MODEL_ARCH_GEMMA, MODEL_ROPE_NEOX, false, false, true, MODEL_FFN_GELU, false, 1, false,
     false, 0},
    {"gemma2", MODEL_ARCH_GEMMA2, MODEL_ROPE_NEOX, false, false, true, MODEL_FFN_GELU, true, 2, false,
     false, 46},
    {"gemma3", MODEL_ARCH_GEMMA3, MODEL_ROPE_NEOX, false, true, true, MODEL_FFN_GELU, true, 6, true,
     false, 62},
    {"phi3", MODEL_ARCH_PHI3, MODEL_ROPE_NEOX, false, false, false, MODEL_FFN_SILU, false, 1, false,
     true, 0},
};
#define N_ARCH (sizeof arch_table / sizeof arch_table[0])

static const struct arch_family *family_of(enum model_arch arch) {
  for (size_t i = 0; i < N_ARCH; i++)
    if (arch_table[i].arch == arch) return &arch_table[i];
  return NULL;
}

const char *model_arch_list(void) {
  return "llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3 and phi3";
}

__attribute__((format(printf, 3, 4))) static int fail(struct model_error *err, int rc,
                                                      const char *fmt, ...) {
  if (err) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
  }
  return rc;
}

const char *model_arch_name(enum model_arch arch) {
  const struct arch_family *fam = family_of(arch);
  return fam ? fam->name : "unknown";
}

const char *model_rope_mode_name(enum model_rope_mode mode) {
  return mode == MODEL_ROPE_NEOX ? "neox" : "normal";
}

/* A metadata reader bound to one file and architecture: keys are given without the "<arch>."
 * prefix, and every failure names the full key. */
struct meta {
  const struct gguf_file *f;
  const char *arch;
  struct model_error *err;
  char key[128];
};

static const char *meta_key(struct meta *m, const char *suffix) {
  snprintf(m->key, sizeof m->key, "%s.%s", m->arch, suffix);
  return m->key;
}

/* A required positive integer no larger than max. */
static int meta_u32(struct meta *m, const char *suffix, uint32_t max, uint32_t *ret) {
  const char *key = meta_key(m, suffix);
  uint32_t v;
  int rc = gguf_get_u32(m->f, key, &v);
  if (rc == KVD_ENOENT) return fail(m->err, KVD_E_FORMAT, "missing metadata key '%s'", key);
  if (rc < 0) return fail(m->err, KVD_E_FORMAT, "metadata key '%s' is not a 32-bit count", key);
  if (v == 0 || v > max)
    return fail(m->err, KVD_E_FORMAT,
                "metadata key '%s' = %" PRIu32 " is out of range (1..%" PRIu32 ")", key, v, max);
  *ret = v;
  return 0;
}

/* An optional positive integer: def when the key is absent. */
static int meta_u32_opt(struct meta *m, const char *suffix, uint32_t max, uint32_t def,
                        uint32_t *ret) {
  if (!gguf_find_kv(m->f, meta_key(m, suffix))) {
    *ret = def;
    return 0;
  }
  return meta_u32(m, suffix, max, ret);
}

/* An optional finite float: def when absent. *present says which. */
static int meta_f32_opt(struct meta *m, const char *suffix, float def, float *ret, bool *present) {
  const char *key = meta_key(m, suffix);
  float v;
  int rc = gguf_get_f32(m->f, key, &v);
  if (present) *present = rc != KVD_ENOENT;
  if (rc == KVD_ENOENT) {
    *ret = def;
    return 0;
  }
  if (rc < 0 || !isfinite(v))
    return fail(m->err, KVD_E_FORMAT, "metadata key '%s' is not a finite number", key);
  *ret = v;
  return 0;
}

/* Special token ids belong to the tokenizer, but the forward pass needs EOS to stop. Converters
 * write 0xFFFFFFFF for "none", so anything outside the vocabulary means absent. */
static int32_t token_id(const struct gguf_file *f, const char *key, uint32_t n_vocab) {
  uint32_t v;
  if (gguf_get_u32(f, key, &v) < 0 || v >= n_vocab) return -1;
  return (int32_t)v;
}

/* RoPE scaling: linear stretches positions by 1/factor; YaRN interpolates only the slow pairs
 * (arch.h struct model_rope); llama3's rope_freqs and LongRoPE's factors are tensors, read with
 * the other hyperparameters. A missing type reads as linear and a factor of 0 as 1, as in
 * llama.cpp. */
static int read_rope_scaling(struct meta *m, struct model_hparams *hp) {
  const char *type_key = meta_key(m, "rope.scaling.type");
  char type[32] = "";
  struct gguf_str s;
  int rc = gguf_get_str(m->f, type_key, &s);
  bool has_type = rc == 0;
  if (rc < 0 && rc != KVD_ENOENT)
    return fail(m->err, KVD_E_FORMAT, "metadata key '%s' is not a string", type_key);
  if (has_type) snprintf(type, sizeof type, "%.*s", (int)(s.len < 31 ? s.len : 31), s.ptr);

  float factor;
  bool has_factor;
  rc = meta_f32_opt(m, "rope.scaling.factor", 0.0f, &factor, &has_factor);
  if (rc < 0) return rc;
  if (!has_factor) {
    /* Older converters wrote the factor under this key instead. */
    rc = meta_f32_opt(m, "rope.scale_linear", 0.0f, &factor, &has_factor);
    if (rc < 0) return rc;
  }
  if (factor < 0.0f || factor > 1e6f)
    return fail(m->err, KVD_E_FORMAT, "metadata key '%s' is out of range",
                meta_key(m, "rope.scaling.factor"));
  hp->rope_freq_scale = factor == 0.0f ? 1.0f : 1.0f / factor;
  if ((rc = meta_f32_opt(m, "rope.scaling.attn_factor", 1.0f, &hp->rope_attn_factor, NULL)) < 0)
    return rc;
  if (!(hp->rope_attn_factor > 0.0f && hp->rope_attn_factor < 100.0f))
    return fail(m->err, KVD_E_FORMAT, "metadata key '%s' is out of range",
                meta_key(m, "rope.scaling.attn_factor"));
  if ((rc = meta_u32_opt(m, "rope.scaling.original_context_length", ARCH_MAX_CTX, 0,
                         &hp->rope_orig_ctx)) < 0)
    return rc;
  if (!has_type || strcmp(type, "linear") == 0 || strcmp(type, "longrope") == 0) return 0;
  if (strcmp(type, "none") == 0) {
    hp->rope_freq_scale = 1.0f;
    return 0;
  }
  if (strcmp(type, "yarn") == 0) {
    hp->rope_yarn_factor = 1.0f;
    if ((rc = meta_f32_opt(m, "rope.scaling.yarn_beta_fast", 32.0f, &hp->rope_yarn_beta_fast,
                           NULL)) < 0 ||
        (rc = meta_f32_opt(m, "rope.scaling.yarn_beta_slow", 1.0f, &hp->rope_yarn_beta_slow,
                           NULL)) < 0)
      return rc;
    if (!(hp->rope_yarn_beta_fast > 0.0f && hp->rope_yarn_beta_slow > 0.0f))
      return fail(m->err, KVD_E_FORMAT, "%s.rope.scaling.yarn_beta_* must be positive", m->arch);
    return 0;
  }
  return fail(m->err, KVD_E_UNSUPPORTED,
              "%s.rope.scaling.type '%s' is not supported (kvd implements none, linear, yarn and "
              "longrope)",
              m->arch, type);
}

/* A (n_rot / 2) f32 factor tensor: rope_freqs (llama3) or LongRoPE's rope_factors_*. NULL when
 * the file has none. */
static int read_rope_factors(const struct gguf_file *f, const char *name, uint32_t n_rot,
                             struct model_error *err, const float **ret) {
  const struct gguf_tensor *rf = gguf_find_tensor(f, name);
  *ret = NULL;
  if (!rf) return 0;
  if (rf->type != DTYPE_F32 || rf->ne[0] != n_rot / 2 || rf->ne[1] != 1 || rf->ne[2] != 1 ||
      rf->ne[3] != 1)
    return fail(err, KVD_E_FORMAT,
                "tensor '%s' must be %" PRIu32 " f32 values (one per rotated pair)", name,
                n_rot / 2);
  const float *v = rf->data;
  for (uint32_t i = 0; i < n_rot / 2; i++)
    if (!(isfinite(v[i]) && v[i] > 0.0f))
      return fail(err, KVD_E_FORMAT, "tensor '%s' holds a factor that is not positive", name);
  *ret = v;
  return 0;
}

/* The family's switches, then the keys that refine them: sliding windows, soft-capping. */
static int read_family(struct meta *m, const struct arch_family *fam, struct model_hparams *hp) {
  int rc;
  hp->embd_scale = fam->embd_scaled ? sqrtf((float)hp->n_embd) : 1.0f;
  hp->ffn_act = fam->act;
  hp->post_norms = fam->post_norms;
  /* Gemma's 27B sizes were trained with query_pre_attn_scalar = n_embd / n_head, not head_dim
   * (gemma_pytorch's config); the GGUF has no key for it, so the layer count tells, as in
   * llama.cpp. */
  uint32_t scale_dim =
      fam->big_n_layer && hp->n_layer == fam->big_n_layer ? hp->n_embd / hp->n_head : hp->head_dim;
  hp->attn_scale = 1.0f / sqrtf((float)(scale_dim ? scale_dim : hp->head_dim));
  if ((rc = meta_f32_opt(m, "attn_logit_softcapping", 0.0f, &hp->attn_softcap, NULL)) < 0 ||
      (rc = meta_f32_opt(m, "final_logit_softcapping", 0.0f, &hp->final_softcap, NULL)) < 0)
    return rc;
  if (hp->attn_softcap < 0.0f || hp->final_softcap < 0.0f)
    return fail(m->err, KVD_E_FORMAT, "%s: a logit soft-capping value is negative", m->arch);

  /* A sliding window shorter than the context changes which positions attention reads. */
  uint32_t window = 0;
  if (gguf_find_kv(m->f, meta_key(m, "attention.sliding_window")) &&
      (rc = meta_u32(m, "attention.sliding_window", UINT32_MAX, &window)) < 0)
    return rc;
  hp->n_swa = window < hp->n_ctx_train ? window : 0;
  if ((rc = meta_u32_opt(m, "attention.sliding_window_pattern", ARCH_MAX_LAYERS, fam->swa_pattern,
                         &hp->swa_pattern)) < 0)
    return rc;
  hp->rope_freq_base_swa = hp->rope_freq_base;
  hp->rope_freq_scale_swa = hp->rope_freq_scale;
  if (fam->swa_rope) {
    /* gemma3: local layers keep the pre-training RoPE (base 10000, unscaled); only the global
     * ones were stretched for long context. */
    if ((rc = meta_f32_opt(m, "rope.freq_base_swa", 10000.0f, &hp->rope_freq_base_swa, NULL)) < 0)
      return rc;
    if (!(hp->rope_freq_base_swa > 0.0f))
      return fail(m->err, KVD_E_FORMAT, "metadata key '%s' is not positive",
                  meta_key(m, "rope.freq_base_swa"));
    hp->rope_freq_scale_swa = 1.0f;
  }
  return 0;
}

int model_hparams_read(const struct gguf_file *f, struct model_hparams *ret,
                       struct model_error *err) {
  struct gguf_str arch_str;
  int rc = gguf_get_str(f, "general.architecture", &arch_str);
  if (rc == KVD_ENOENT)
    return fail(err, KVD_E_FORMAT, "missing metadata key 'general.architecture'");
  if (rc < 0) return fail(err, KVD_E_FORMAT, "metadata key 'general.architecture' is not a string");
  size_t ai = 0;
  while (ai < N_ARCH && !gguf_str_eq(arch_str, arch_table[ai].name))
    ai++;
  if (ai == N_ARCH) {
    int len = arch_str.len > 64 ? 64 : (int)arch_str.len;
    return fail(err, KVD_E_UNSUPPORTED, "architecture '%.*s' is not supported (kvd runs %s)", len,
                arch_str.ptr, model_arch_list());
  }

  struct model_hparams hp = {0};
  struct meta m = {.f = f, .arch = arch_table[ai].name, .err = err};
  hp.arch = arch_table[ai].arch;
  hp.rope_mode = arch_table[ai].rope_mode;
  struct gguf_str name;
  if (gguf_get_str(f, "general.name", &name) == 0)
    snprintf(hp.name, sizeof hp.name, "%.*s",
             (int)(name.len < sizeof hp.name ? name.len : sizeof hp.name - 1), name.ptr);

  if ((rc = meta_u32(&m, "embedding_length", ARCH_MAX_DIM, &hp.n_embd)) < 0 ||
      (rc = meta_u32(&m, "block_count", ARCH_MAX_LAYERS, &hp.n_layer)) < 0 ||
      (rc = meta_u32(&m, "attention.head_count", ARCH_MAX_DIM, &hp.n_head)) < 0 ||
      (rc = meta_u32_opt(&m, "attention.head_count_kv", ARCH_MAX_DIM, hp.n_head, &hp.n_head_kv)) <
          0 ||
      (rc = meta_u32(&m, "feed_forward_length", ARCH_MAX_DIM, &hp.n_ff)) < 0 ||
      (rc = meta_u32(&m, "context_length", ARCH_MAX_CTX, &hp.n_ctx_train)) < 0)
    return rc;

  if (hp.n_head % hp.n_head_kv != 0)
    return fail(err, KVD_E_FORMAT,
                "%s.attention.head_count = %" PRIu32
                " is not divisible by %s.attention.head_count_kv = %" PRIu32,
                m.arch, hp.n_head, m.arch, hp.n_head_kv);
  /* The head size: attention.key_length where the file says (qwen3, gemma decouple it from
   * n_embd / n_head: the q projection is then n_head * head_dim wide, not n_embd), else
   * n_embd / n_head. Keys and values of different sizes are not run. */
  uint32_t key_len, value_len;
  bool has_key_len;
  if ((rc = meta_u32_opt(&m, "attention.key_length", ARCH_MAX_DIM, 0, &key_len)) < 0) return rc;
  has_key_len = key_len != 0;
  if (!has_key_len && hp.n_embd % hp.n_head != 0)
    return fail(err, KVD_E_FORMAT,
                "%s.embedding_length = %" PRIu32
                " is not divisible by %s.attention.head_count = %" PRIu32,
                m.arch, hp.n_embd, m.arch, hp.n_head);
  hp.head_dim = has_key_len ? key_len : hp.n_embd / hp.n_head;
  if ((rc = meta_u32_opt(&m, "attention.value_length", ARCH_MAX_DIM, hp.head_dim, &value_len)) < 0)
    return rc;
  if (value_len != hp.head_dim)
    return fail(err, KVD_E_UNSUPPORTED,
                "%s.attention.value_length = %" PRIu32 " differs from key_length = %" PRIu32
                " (kvd runs equal key and value sizes)",
                m.arch, value_len, hp.head_dim);
  if (hp.head_dim == 0 || hp.head_dim % 2 != 0 ||
      (uint64_t)hp.head_dim * hp.n_head > ARCH_MAX_DIM * 16u)
    return fail(err, KVD_E_FORMAT,
                "%s.attention.key_length = %" PRIu32 " is not a usable head size", m.arch,
                hp.head_dim);

  /* Mixture-of-experts llama files (mixtral) share the architecture name but not the network. */
  uint32_t n_expert = 0;
  const char *expert_key = meta_key(&m, "expert_count");
  if (gguf_find_kv(f, expert_key) && gguf_get_u32(f, expert_key, &n_expert) < 0)
    return fail(err, KVD_E_FORMAT, "metadata key '%s' is not a 32-bit count", expert_key);
  if (n_expert > 0)
    return fail(err, KVD_E_UNSUPPORTED,
                "%s = %" PRIu32 ": mixture-of-experts models are not supported", expert_key,
                n_expert);

  const char *eps_key = meta_key(&m, "attention.layer_norm_rms_epsilon");
  rc = gguf_get_f32(f, eps_key, &hp.rms_eps);
  if (rc == KVD_ENOENT) return fail(err, KVD_E_FORMAT, "missing metadata key '%s'", eps_key);
  if (rc < 0 || !(hp.rms_eps > 0.0f && hp.rms_eps < 1.0f))
    return fail(err, KVD_E_FORMAT, "metadata key '%s' is not a number in (0, 1)", eps_key);

  if ((rc = meta_f32_opt(&m, "rope.freq_base", 10000.0f, &hp.rope_freq_base, NULL)) < 0) return rc;
  if (!(hp.rope_freq_base > 0.0f))
    return fail(err, KVD_E_FORMAT, "metadata key '%s' is not positive",
                meta_key(&m, "rope.freq_base"));
  if ((rc = meta_u32_opt(&m, "rope.dimension_count", ARCH_MAX_DIM, hp.head_dim, &hp.n_rot)) < 0)
    return rc;
  if (hp.n_rot % 2 != 0 || hp.n_rot > hp.head_dim)
    return fail(err, KVD_E_FORMAT,
                "%s.rope.dimension_count = %" PRIu32
                " must be even and at most the head dimension %" PRIu32,
                m.arch, hp.n_rot, hp.head_dim);
  if ((rc = read_rope_scaling(&m, &hp)) < 0) return rc;
  /* Llama 3.1/3.2 carry their RoPE scaling as per-pair frequency factors in a tensor; Phi-3's
   * LongRoPE as two such tensors, for short and long contexts. */
  if ((rc = read_rope_factors(f, "rope_freqs.weight", hp.n_rot, err, &hp.rope_freq_factors)) < 0 ||
      (rc = read_rope_factors(f, "rope_factors_long.weight", hp.n_rot, err,
                              &hp.rope_factors_long)) < 0 ||
      (rc = read_rope_factors(f, "rope_factors_short.weight", hp.n_rot, err,
                              &hp.rope_factors_short)) < 0)
    return rc;
  if ((rc = read_family(&m, &arch_table[ai], &hp)) < 0) return rc;

  /* The vocabulary size: the architecture's own key, else the tokenizer's token list. */
  if (gguf_find_kv(f, meta_key(&m, "vocab_size"))) {
    if ((rc = meta_u32(&m, "vocab_size", ARCH_MAX_VOCAB, &hp.n_vocab)) < 0) return rc;
  } else {
    const struct gguf_value *tokens;
    rc = gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_VT_COUNT, &tokens);
    if (rc < 0)
      return fail(err, KVD_E_FORMAT,
                  "missing metadata key '%s.vocab_size' (and no tokenizer.ggml.tokens array)",
                  m.arch);
    if (tokens->v.arr.count == 0 || tokens->v.arr.count > ARCH_MAX_VOCAB)
      return fail(err, KVD_E_FORMAT, "tokenizer.ggml.tokens has %" PRIu64 " entries",
                  tokens->v.arr.count);
    hp.n_vocab = (uint32_t)tokens->v.arr.count;
  }
  hp.bos_id = token_id(f, "tokenizer.ggml.bos_token_id", hp.n_vocab);
  hp.eos_id = token_id(f, "tokenizer.ggml.eos_token_id", hp.n_vocab);

  *ret = hp;
  return 0;
}

/* Binding: which file tensors the model has claimed, so that leftovers can be refused. */
struct binder {
  const struct gguf_file *f;
  bool *used; /* (n_tensors) */
  struct model_error *err;
};

/* Finds name and checks it is [ne0] (ne1 == 0) or [ne0, ne1] and dequantizable row by row. A
 * missing optional tensor leaves *ret NULL. */
static int bind(struct binder *b, const char *name, uint64_t ne0, uint64_t ne1, bool required,
                const struct gguf_tensor **ret) {
  const struct gguf_tensor *t = gguf_find_tensor(b->f, name);
  *ret = NULL;
  if (!t) return required ? fail(b->err, KVD_E_FORMAT, "missing tensor '%s'", name) : 0;
  uint64_t want1 = ne1 ? ne1 : 1;
  if (t->ne[0] != ne0 || t->ne[1] != want1 || t->ne[2] != 1 || t->ne[3] != 1) {
    if (ne1)
      return fail(b->err, KVD_E_FORMAT,
                  "tensor '%s' is [%" PRIu64 ", %" PRIu64 ", %" PRIu64 ", %" PRIu64
                  "], the hyperparameters say [%" PRIu64 ", %" PRIu64 "]",
                  name, t->ne[0], t->ne[1], t->ne[2], t->ne[3], ne0, ne1);
    return fail(b->err, KVD_E_FORMAT,
                "tensor '%s' is [%" PRIu64 ", %" PRIu64 ", %" PRIu64 ", %" PRIu64
                "], the hyperparameters say [%" PRIu64 "]",
                name, t->ne[0], t->ne[1], t->ne[2], t->ne[3], ne0);
  }
  const struct dtype_info *info = dtype_get(t->type);
  if (!info || !info->can_dequant)
    return fail(b->err, KVD_E_UNSUPPORTED, "tensor '%s' has type %s, which kvd cannot dequantize",
                name, dtype_name(t->type));
  uint64_t row_bytes;
  if (dtype_row_bytes(t->type, ne0, &row_bytes) < 0)
    return fail(b->err, KVD_E_FORMAT, "tensor '%s': rows of %" PRIu64 " are not whole %s blocks",
                name, ne0, dtype_name(t->type));
  b->used[t - b->f->tensors] = true;
  *ret = t;
  return 0;
}

/* A view of rows [row0, row0 + rows) of the fused matrix t (rows are whole dtype blocks, checked
 * by bind()), appended to w->views. */
static const struct gguf_tensor *view_rows(struct model_weights *w, const struct gguf_tensor *t,
                                           uint64_t row0, uint64_t rows) {
  uint64_t row_bytes = t->nbytes / t->ne[1];
  struct gguf_tensor *v = &w->views[w->n_views++];
  *v = *t;
  v->ne[1] = rows;
  v->offset = t->offset + row0 * row_bytes;
  v->nbytes = rows * row_bytes;
  v->data = (const uint8_t *)t->data + row0 * row_bytes;
  return v;
}

static int bind_layer(struct binder *b, struct model_weights *w, const struct arch_family *fam,
                      uint32_t il) {
  const struct model_hparams *hp = &w->hp;
  struct model_layer *l = &w->layers[il];
  uint64_t d = hp->n_embd, q_dim = (uint64_t)hp->n_head * hp->head_dim;
  uint64_t kv_dim = (uint64_t)hp->n_head_kv * hp->head_dim, ff = hp->n_ff;
  const struct gguf_tensor *fused = NULL;
  char name[64];
  int rc;
#define BIND_T(dst, suffix, ne0, ne1, required)                                                    \
  do {                                                                                             \
    snprintf(name, sizeof name, "blk.%" PRIu32 "." suffix, il);                                    \
    if ((rc = bind(b, name, ne0, ne1, required, &(dst))) < 0) return rc;                           \
  } while (0)
#define BIND(field, suffix, ne0, ne1, required) BIND_T(l->field, suffix, ne0, ne1, required)
  BIND(attn_norm, "attn_norm.weight", d, 0, true);
  /* phi3 may fuse q, k and v into one [q | k | v] projection; each part is a view of its rows. */
  if (fam->fused) BIND_T(fused, "attn_qkv.weight", d, q_dim + 2 * kv_dim, false);
  if (fused) {
    l->attn_q = view_rows(w, fused, 0, q_dim);
    l->attn_k = view_rows(w, fused, q_dim, kv_dim);
    l->attn_v = view_rows(w, fused, q_dim + kv_dim, kv_dim);
  } else {
    BIND(attn_q, "attn_q.weight", d, q_dim, true);
    BIND(attn_k, "attn_k.weight", d, kv_dim, true);
    BIND(attn_v, "attn_v.weight", d, kv_dim, true);
  }
  /* qwen2 always has q/k/v biases; some llama conversions carry them too. */
  BIND(attn_q_bias, "attn_q.bias", q_dim, 0, fam->qkv_bias);
  BIND(attn_k_bias, "attn_k.bias", kv_dim, 0, fam->qkv_bias);
  BIND(attn_v_bias, "attn_v.bias", kv_dim, 0, fam->qkv_bias);
  BIND(attn_output, "attn_output.weight", q_dim, d, true);
  BIND(attn_q_norm, "attn_q_norm.weight", hp->head_dim, 0, fam->qk_norm);
  BIND(attn_k_norm, "attn_k_norm.weight", hp->head_dim, 0, fam->qk_norm);
  if (fam->post_norms) {
    BIND(attn_post_norm, "post_attention_norm.weight", d, 0, true);
    BIND(ffn_post_norm, "post_ffw_norm.weight", d, 0, true);
  }
  BIND(ffn_norm, "ffn_norm.weight", d, 0, true);
  if (fam->fused) {
    /* phi3's ffn_up is [gate | up], 2 n_ff rows, with no ffn_gate. */
    BIND_T(fused, "ffn_up.weight", d, 2 * ff, true);
    l->ffn_gate = view_rows(w, fused, 0, ff);
    l->ffn_up = view_rows(w, fused, ff, ff);
  } else {
    BIND(ffn_gate, "ffn_gate.weight", d, ff, true);
    BIND(ffn_up, "ffn_up.weight", d, ff, true);
  }
  BIND(ffn_down, "ffn_down.weight", ff, d, true);
#undef BIND
#undef BIND_T
  return 0;
}

static int bind_all(struct binder *b, struct model_weights *w) {
  const struct model_hparams *hp = &w->hp;
  int rc;
  if ((rc = bind(b, "token_embd.weight", hp->n_embd, hp->n_vocab, true, &w->token_embd)) < 0 ||
      (rc = bind(b, "output_norm.weight", hp->n_embd, 0, true, &w->output_norm)) < 0 ||
      (rc = bind(b, "output.weight", hp->n_embd, hp->n_vocab, false, &w->output)) < 0)
    return rc;
  /* Without its own classifier the model reads logits off the embedding matrix (tied). */
  w->tied = w->output == NULL;
  if (w->tied) w->output = w->token_embd;
  const struct arch_family *fam = family_of(hp->arch);
  for (uint32_t il = 0; il < hp->n_layer; il++)
    if ((rc = bind_layer(b, w, fam, il)) < 0) return rc;
  /* Checked with the hyperparameters and read through them. */
  const struct gguf_tensor *rf;
  if ((rc = bind(b, "rope_freqs.weight", hp->n_rot / 2, 0, false, &rf)) < 0 ||
      (rc = bind(b, "rope_factors_long.weight", hp->n_rot / 2, 0, false, &rf)) < 0 ||
      (rc = bind(b, "rope_factors_short.weight", hp->n_rot / 2, 0, false, &rf)) < 0)
    return rc;
  for (uint64_t i = 0; i < b->f->n_tensors; i++) {
    if (b->used[i]) continue;
    const struct gguf_str *n = &b->f->tensors[i].name;
    return fail(b->err, KVD_E_UNSUPPORTED, "tensor '%.*s' is not part of a %s model kvd can run",
                (int)(n->len > 64 ? 64 : n->len), n->ptr, model_arch_name(hp->arch));
  }
  return 0;
}

int model_weights_new(const struct gguf_file *f, struct model_weights **ret,
                      struct model_error *err) {
  struct model_hparams hp;
  int rc = model_hparams_read(f, &hp, err);
  if (rc < 0) return rc;
  struct model_weights *w = calloc(1, sizeof *w);
  struct binder b = {
      .f = f, .used = calloc(f->n_tensors ? f->n_tensors : 1, sizeof(bool)), .err = err};
  if (w) w->layers = calloc(hp.n_layer, sizeof *w->layers);
  /* Fused tensors split into at most five views a layer (q, k, v, gate, up). */
  if (w && family_of(hp.arch)->fused) w->views = calloc((size_t)hp.n_layer * 5, sizeof *w->views);
  if (!w || !w->layers || !b.used || (family_of(hp.arch)->fused && !w->views)) {
    rc = fail(err, KVD_ENOMEM, "out of memory binding %" PRIu32 " layers", hp.n_layer);
    goto out;
  }
  w->hp = hp;
  rc = bind_all(&b, w);
out:
  free(b.used);
  if (rc < 0) {
    model_weights_free(w);
    return rc;
  }
  *ret = w;
  return 0;
}

void model_weights_free(struct model_weights *w) {
  if (!w) return;
  free(w->views);
  free(w->layers);
  free(w);
}

/* ---- per-layer switches ---------------------------------------------------------------------- */

uint32_t model_layer_window(const struct model_hparams *hp, uint32_t il) {
  if (hp->n_swa == 0) return 0;
  uint32_t pat = hp->swa_pattern;
  return pat <= 1 || il % pat < pat - 1 ? hp->n_swa : 0;
}

bool model_any_window(const struct model_hparams *hp) {
  for (uint32_t il = 0; il < hp->n_layer; il++)
    if (model_layer_window(hp, il)) return true;
  return false;
}

bool model_all_windowed(const struct model_hparams *hp) {
  for (uint32_t il = 0; il < hp->n_layer; il++)
    if (!model_layer_window(hp, il)) return false;
  return hp->n_layer > 0;
}

void model_layer_rope(const struct model_hparams *hp, uint32_t il, uint32_t n_ctx,
                      struct model_rope *ret) {
  bool local = model_layer_window(hp, il) != 0;
  *ret = (struct model_rope){
      .n_rot = hp->n_rot,
      .mode = hp->rope_mode,
      .freq_base = local ? hp->rope_freq_base_swa : hp->rope_freq_base,
      .freq_scale = local ? hp->rope_freq_scale_swa : hp->rope_freq_scale,
      .freq_factors = hp->rope_freq_factors,
      .mscale = hp->rope_attn_factor,
  };
  /* LongRoPE: which factors depends on the context run, not on the position, so the K/V of a
   * position never changes once written. */
  if (hp->rope_factors_long || hp->rope_factors_short) {
    bool long_ctx = hp->rope_orig_ctx && n_ctx > hp->rope_orig_ctx;
    const float *f = long_ctx ? hp->rope_factors_long : hp->rope_factors_short;
    ret->freq_factors = f ? f : (hp->rope_factors_long ? hp->rope_factors_long
                                                       : hp->rope_factors_short);
  }
  if (hp->rope_yarn_factor > 0.0f) {
    ret->yarn_ext_factor = hp->rope_yarn_factor;
    ret->yarn_beta_fast = hp->rope_yarn_beta_fast;
    ret->yarn_beta_slow = hp->rope_yarn_beta_slow;
    ret->yarn_orig_ctx = hp->rope_orig_ctx ? hp->rope_orig_ctx : hp->n_ctx_train;
  }
}

/* YaRN's correction range: the dimension at which a pair makes n_turns full turns over the
 * original context (from the YaRN paper, Peng et al. 2023, eq. 17). */
static double yarn_corr_dim(double n_rot, double orig_ctx, double n_turns, double base) {
  return n_rot * log(orig_ctx / (n_turns * 2.0 * 3.141592653589793)) / (2.0 * log(base));
}

double model_rope_freq(const struct model_rope *r, uint32_t i) {
  double extrap = pow(r->freq_base, -2.0 * (double)i / (double)r->n_rot);
  if (r->freq_factors) extrap /= r->freq_factors[i];
  double interp = extrap * r->freq_scale;
  if (r->yarn_ext_factor <= 0.0f) return interp;
  double lo = floor(yarn_corr_dim(r->n_rot, r->yarn_orig_ctx, r->yarn_beta_fast, r->freq_base));
  double hi = ceil(yarn_corr_dim(r->n_rot, r->yarn_orig_ctx, r->yarn_beta_slow, r->freq_base));
  if (lo < 0) lo = 0;
  if (hi > r->n_rot - 1) hi = r->n_rot - 1;
  /* ramp: 1 for pairs below lo (fast: keep the trained angle), 0 above hi (interpolate). */
  double y = ((double)i - lo) / fmax(0.001, hi - lo);
  double ramp = (1.0 - fmin(1.0, fmax(0.0, y))) * r->yarn_ext_factor;
  return interp * (1.0 - ramp) + extrap * ramp;
}

double model_rope_mscale(const struct model_rope *r) {
  double m = r->mscale > 0.0f ? r->mscale : 1.0;
  if (r->yarn_ext_factor > 0.0f && r->freq_scale > 0.0f && r->freq_scale < 1.0f)
    m *= 1.0 + 0.1 * log(1.0 / r->freq_scale);
  return m;
}

void model_print_hparams(const struct model_hparams *hp, FILE *out) {
  fprintf(out, "architecture:     %s\n", model_arch_name(hp->arch));
  if (hp->name[0]) fprintf(out, "name:             %s\n", hp->name);
  fprintf(out, "embedding:        %" PRIu32 "\n", hp->n_embd);
  fprintf(out, "layers:           %" PRIu32 "\n", hp->n_layer);
  fprintf(out,
          "heads:            %" PRIu32 " query, %" PRIu32 " kv (group %" PRIu32
          "), head dim %" PRIu32 "\n",
          hp->n_head, hp->n_head_kv, hp->n_head / hp->n_head_kv, hp->head_dim);
  fprintf(out, "feed-forward:     %" PRIu32 "\n", hp->n_ff);
  fprintf(out, "vocabulary:       %" PRIu32 "\n", hp->n_vocab);
  fprintf(out, "context length:   %" PRIu32 "\n", hp->n_ctx_train);
  fprintf(out, "rms epsilon:      %g\n", (double)hp->rms_eps);
  fprintf(out, "rope:             %s, base %g, %" PRIu32 " dims",
          model_rope_mode_name(hp->rope_mode), (double)hp->rope_freq_base, hp->n_rot);
  if (hp->rope_freq_scale != 1.0f)
    fprintf(out, ", linear scaling x%g", 1.0 / (double)hp->rope_freq_scale);
  if (hp->rope_freq_factors) {
    float lo = hp->rope_freq_factors[0], hi = lo;
    for (uint32_t i = 1; i < hp->n_rot / 2; i++) {
      lo = fminf(lo, hp->rope_freq_factors[i]);
      hi = fmaxf(hi, hp->rope_freq_factors[i]);
    }
    fprintf(out, ", frequency factors (rope_freqs) %g..%g", (double)lo, (double)hi);
  }
  if (hp->rope_yarn_factor > 0.0f)
    fprintf(out, ", yarn (beta %g/%g, original context %" PRIu32 ")",
            (double)hp->rope_yarn_beta_fast, (double)hp->rope_yarn_beta_slow, hp->rope_orig_ctx);
  if (hp->rope_factors_long || hp->rope_factors_short)
    fprintf(out, ", longrope factors (original context %" PRIu32 ")", hp->rope_orig_ctx);
  if (hp->rope_attn_factor != 1.0f)
    fprintf(out, ", attention factor %g", (double)hp->rope_attn_factor);
  fprintf(out, "\n");
  if (hp->n_swa) {
    uint32_t n_local = 0;
    for (uint32_t il = 0; il < hp->n_layer; il++)
      n_local += model_layer_window(hp, il) != 0;
    fprintf(out, "sliding window:   %" PRIu32 " positions on %" PRIu32 " of %" PRIu32 " layers",
            hp->n_swa, n_local, hp->n_layer);
    if (n_local < hp->n_layer && (hp->rope_freq_base_swa != hp->rope_freq_base ||
                                  hp->rope_freq_scale_swa != hp->rope_freq_scale))
      fprintf(out, " (their rope: base %g, scale %g)", (double)hp->rope_freq_base_swa,
              (double)hp->rope_freq_scale_swa);
    fprintf(out, "\n");
  }
  if (hp->embd_scale != 1.0f) fprintf(out, "embedding scale:  %g\n", (double)hp->embd_scale);
  fprintf(out, "feed-forward act: %s%s\n", hp->ffn_act == MODEL_FFN_GELU ? "gelu (GeGLU)" : "silu (SwiGLU)",
          hp->post_norms ? ", post-norms on both blocks" : "");
  if (fabsf(hp->attn_scale * sqrtf((float)hp->head_dim) - 1.0f) > 1e-6f)
    fprintf(out, "attention scale:  %g\n", (double)hp->attn_scale);
  if (hp->attn_softcap > 0.0f || hp->final_softcap > 0.0f)
    fprintf(out, "soft-capping:     attention %g, final %g\n", (double)hp->attn_softcap,
            (double)hp->final_softcap);
  fprintf(out, "bos / eos:        %" PRId32 " / %" PRId32 "\n", hp->bos_id, hp->eos_id);
}

static void tally(const struct gguf_tensor *t, unsigned *counts, uint64_t *params) {
  if (!t) return;
  if ((unsigned)t->type < DTYPE_MAX) counts[t->type]++;
  *params += t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
}

void model_print_weights(const struct model_weights *w, FILE *out) {
  unsigned counts[DTYPE_MAX] = {0};
  uint64_t params = 0;
  tally(w->token_embd, counts, &params);
  tally(w->output_norm, counts, &params);
  if (!w->tied) tally(w->output, counts, &params);
  for (uint32_t il = 0; il < w->hp.n_layer; il++) {
    const struct model_layer *l = &w->layers[il];
    const struct gguf_tensor *ts[] = {
        l->attn_norm,   l->attn_q,      l->attn_k,   l->attn_v,   l->attn_q_bias, l->attn_k_bias,
        l->attn_v_bias, l->attn_output, l->ffn_norm, l->ffn_gate, l->ffn_up,      l->ffn_down,
        l->attn_q_norm, l->attn_k_norm, l->attn_post_norm, l->ffn_post_norm};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++)
      tally(ts[i], counts, &params);
  }
  fprintf(out, "parameters:       %" PRIu64 "\n", params);
  fprintf(out, "tensor types:    ");
  for (unsigned t = 0; t < DTYPE_MAX; t++)
    if (counts[t]) fprintf(out, " %s x%u", dtype_name(t), counts[t]);
  fprintf(out, "\n");
  fprintf(out, "classifier:       %s (%s)\n",
          w->tied ? "tied to token_embd.weight" : "output.weight", dtype_name(w->output->type));
}
