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

/* The architectures kvd runs, and the RoPE pairing each one's weights were trained with. */
static const struct {
  const char *name;
  enum model_arch arch;
  enum model_rope_mode rope_mode;
} arch_table[] = {
    {"llama", MODEL_ARCH_LLAMA, MODEL_ROPE_NORMAL},
    {"mistral", MODEL_ARCH_MISTRAL, MODEL_ROPE_NORMAL},
    {"qwen2", MODEL_ARCH_QWEN2, MODEL_ROPE_NEOX},
    {"qwen3", MODEL_ARCH_QWEN3, MODEL_ROPE_NEOX},
};

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
  for (size_t i = 0; i < sizeof arch_table / sizeof arch_table[0]; i++)
    if (arch_table[i].arch == arch) return arch_table[i].name;
  return "unknown";
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

/* Linear RoPE scaling stretches positions by 1/factor. Any other scheme (yarn, longrope, llama3's
 * rope_freqs) changes the frequencies themselves and is refused by name. */
static int read_rope_scaling(struct meta *m, float *ret_scale) {
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
  /* llama.cpp reads a missing type as linear and a factor of 0 as 1; so do we. */
  if (!has_type || strcmp(type, "linear") == 0) {
    if (factor < 0.0f)
      return fail(m->err, KVD_E_FORMAT, "metadata key '%s' is negative",
                  meta_key(m, "rope.scaling.factor"));
    *ret_scale = factor == 0.0f ? 1.0f : 1.0f / factor;
    return 0;
  }
  if (strcmp(type, "none") == 0) {
    *ret_scale = 1.0f;
    return 0;
  }
  return fail(m->err, KVD_E_UNSUPPORTED,
              "%s.rope.scaling.type '%s' is not supported (kvd implements none and linear)",
              m->arch, type);
}

int model_hparams_read(const struct gguf_file *f, struct model_hparams *ret,
                       struct model_error *err) {
  struct gguf_str arch_str;
  int rc = gguf_get_str(f, "general.architecture", &arch_str);
  if (rc == KVD_ENOENT)
    return fail(err, KVD_E_FORMAT, "missing metadata key 'general.architecture'");
  if (rc < 0) return fail(err, KVD_E_FORMAT, "metadata key 'general.architecture' is not a string");
  size_t ai = 0, n_arch = sizeof arch_table / sizeof arch_table[0];
  while (ai < n_arch && !gguf_str_eq(arch_str, arch_table[ai].name))
    ai++;
  if (ai == n_arch) {
    int len = arch_str.len > 64 ? 64 : (int)arch_str.len;
    return fail(err, KVD_E_UNSUPPORTED,
                "architecture '%.*s' is not supported (kvd runs llama, mistral, qwen2 and qwen3)",
                len, arch_str.ptr);
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

  /* A sliding window shorter than the context changes which positions attention reads. */
  uint32_t window;
  if (gguf_find_kv(f, meta_key(&m, "attention.sliding_window"))) {
    if ((rc = meta_u32(&m, "attention.sliding_window", UINT32_MAX, &window)) < 0) return rc;
    if (window < hp.n_ctx_train)
      return fail(err, KVD_E_UNSUPPORTED,
                  "%s.attention.sliding_window = %" PRIu32
                  " is shorter than the context: sliding-window attention is not supported",
                  m.arch, window);
  }

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
  if ((rc = read_rope_scaling(&m, &hp.rope_freq_scale)) < 0) return rc;
  /* Llama 3.1/3.2 carry their RoPE scaling as per-pair frequency factors in a tensor. */
  const struct gguf_tensor *rf = gguf_find_tensor(f, "rope_freqs.weight");
  if (rf) {
    if (rf->type != DTYPE_F32 || rf->ne[0] != hp.n_rot / 2 || rf->ne[1] != 1 || rf->ne[2] != 1 ||
        rf->ne[3] != 1)
      return fail(err, KVD_E_FORMAT,
                  "tensor 'rope_freqs.weight' must be %" PRIu32
                  " f32 values (one per rotated pair)",
                  hp.n_rot / 2);
    const float *v = rf->data;
    for (uint32_t i = 0; i < hp.n_rot / 2; i++)
      if (!(isfinite(v[i]) && v[i] > 0.0f))
        return fail(err, KVD_E_FORMAT,
                    "tensor 'rope_freqs.weight' holds a factor that is not positive");
    hp.rope_freq_factors = v;
  }

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

static int bind_layer(struct binder *b, const struct model_hparams *hp, uint32_t il,
                      struct model_layer *l) {
  uint64_t d = hp->n_embd, q_dim = (uint64_t)hp->n_head * hp->head_dim;
  uint64_t kv_dim = (uint64_t)hp->n_head_kv * hp->head_dim, ff = hp->n_ff;
  bool biased = hp->arch == MODEL_ARCH_QWEN2;
  char name[64];
  int rc;
#define BIND(field, suffix, ne0, ne1, required)                                                    \
  do {                                                                                             \
    snprintf(name, sizeof name, "blk.%" PRIu32 "." suffix, il);                                    \
    if ((rc = bind(b, name, ne0, ne1, required, &l->field)) < 0) return rc;                        \
  } while (0)
  BIND(attn_norm, "attn_norm.weight", d, 0, true);
  BIND(attn_q, "attn_q.weight", d, q_dim, true);
  BIND(attn_k, "attn_k.weight", d, kv_dim, true);
  BIND(attn_v, "attn_v.weight", d, kv_dim, true);
  /* qwen2 always has q/k/v biases; some llama conversions carry them too. */
  BIND(attn_q_bias, "attn_q.bias", q_dim, 0, biased);
  BIND(attn_k_bias, "attn_k.bias", kv_dim, 0, biased);
  BIND(attn_v_bias, "attn_v.bias", kv_dim, 0, biased);
  BIND(attn_output, "attn_output.weight", q_dim, d, true);
  BIND(attn_q_norm, "attn_q_norm.weight", hp->head_dim, 0, hp->arch == MODEL_ARCH_QWEN3);
  BIND(attn_k_norm, "attn_k_norm.weight", hp->head_dim, 0, hp->arch == MODEL_ARCH_QWEN3);
  BIND(ffn_norm, "ffn_norm.weight", d, 0, true);
  BIND(ffn_gate, "ffn_gate.weight", d, ff, true);
  BIND(ffn_up, "ffn_up.weight", d, ff, true);
  BIND(ffn_down, "ffn_down.weight", ff, d, true);
#undef BIND
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
  for (uint32_t il = 0; il < hp->n_layer; il++)
    if ((rc = bind_layer(b, hp, il, &w->layers[il])) < 0) return rc;
  const struct gguf_tensor *rf; /* checked with the hyperparameters, read through them */
  if ((rc = bind(b, "rope_freqs.weight", hp->n_rot / 2, 0, false, &rf)) < 0) return rc;
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
  if (!w || !w->layers || !b.used) {
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
  free(w->layers);
  free(w);
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
  fprintf(out, "\n");
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
        l->attn_v_bias, l->attn_output, l->ffn_norm, l->ffn_gate, l->ffn_up,      l->ffn_down};
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
