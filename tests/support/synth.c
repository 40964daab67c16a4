/* Synthetic llama models (see synth.h). */
#include "synth.h"

#include "gguf_write.h"
#include "kvd_error.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Caps that keep every size computation far from overflow and a typo from asking for petabytes. */
#define SYNTH_MAX_DIM (1u << 16)
#define SYNTH_MAX_LAYERS 1024u
#define SYNTH_MAX_FFN (1u << 18)
#define SYNTH_MAX_VOCAB (1u << 20)
#define SYNTH_MAX_CTX (1u << 24)

/* llama.cpp's token types (tokenizer.ggml.token_type) */
enum { SYNTH_TOK_NORMAL = 1, SYNTH_TOK_UNKNOWN = 2, SYNTH_TOK_CONTROL = 3, SYNTH_TOK_BYTE = 6 };

#define SYNTH_SPACE "\xe2\x96\x81" /* U+2581 '▁', SentencePiece's word-start marker */

void synth_params_default(struct synth_params *p) {
  *p = (struct synth_params){
      .dim = 64,
      .n_layers = 5,
      .n_heads = 8,
      .n_kv_heads = 4,
      .ffn = 172,
      .vocab = 512,
      .ctx = 512,
      .type = DTYPE_F32,
      .seed = 1,
      .rms_eps = 1e-5f,
      .rope_base = 10000.0f,
      .tied = false,
      .name = NULL,
  };
}

static int synth__bad(char *why, size_t len, const char *msg) {
  if (why && len) snprintf(why, len, "%s", msg);
  return KVD_EINVAL;
}

int synth_check(const struct synth_params *p, char *why, size_t len) {
  if (!p) return synth__bad(why, len, "no parameters");
  if (p->dim < 2 || p->dim > SYNTH_MAX_DIM) return synth__bad(why, len, "dim must be in 2..65536");
  if (p->n_layers < 1 || p->n_layers > SYNTH_MAX_LAYERS)
    return synth__bad(why, len, "layers must be in 1..1024");
  if (p->n_heads < 1 || p->dim % p->n_heads != 0)
    return synth__bad(why, len, "heads must divide dim");
  if ((p->dim / p->n_heads) % 2 != 0)
    return synth__bad(why, len, "the head dim (dim / heads) must be even for RoPE");
  if (p->n_kv_heads < 1 || p->n_heads % p->n_kv_heads != 0)
    return synth__bad(why, len, "kv-heads must divide heads");
  if (p->ffn < 1 || p->ffn > SYNTH_MAX_FFN) return synth__bad(why, len, "ffn must be in 1..262144");
  if (p->vocab < SYNTH_MIN_VOCAB || p->vocab > SYNTH_MAX_VOCAB)
    return synth__bad(why, len, "vocab must be in 259..1048576 (3 specials + 256 byte tokens)");
  if (p->ctx < 1 || p->ctx > SYNTH_MAX_CTX) return synth__bad(why, len, "ctx must be in 1..2^24");
  if (p->type != DTYPE_F32 && p->type != DTYPE_F16 && p->type != DTYPE_BF16 &&
      p->type != DTYPE_Q8_0 && p->type != DTYPE_Q4_0)
    return synth__bad(why, len, "type must be f32, f16, bf16, q8_0 or q4_0");
  if (!dtype_get((uint32_t)p->type)) return synth__bad(why, len, "type unknown to dtype");
  if (!(p->rms_eps > 0) || !isfinite(p->rms_eps))
    return synth__bad(why, len, "rms eps must be > 0");
  if (!(p->rope_base > 0) || !isfinite(p->rope_base))
    return synth__bad(why, len, "rope base must be > 0");
  return 0;
}

enum dtype synth_matrix_type(const struct synth_params *p, uint64_t row_len) {
  const struct dtype_info *di = dtype_get((uint32_t)p->type);
  if (di && di->block_elems && row_len % di->block_elems == 0) return p->type;
  return DTYPE_F16;
}

/* ---- deterministic randomness ---- */

static uint64_t synth__splitmix(uint64_t *s) {
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static double synth__uniform(uint64_t *s) { /* in (0, 1), never 0 so log() is finite */
  return ((double)(synth__splitmix(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

static uint64_t synth__fnv(const char *s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (; *s; s++) {
    h ^= (uint8_t)*s;
    h *= 0x100000001b3ull;
  }
  return h;
}

/* ---- tensors ---- */

struct synth__tensor {
  char name[GGUF_MAX_TENSOR_NAME + 1];
  uint64_t seed;
  uint64_t ne0, rows;
  enum dtype type;
  float mean, std;
};

/* Produces the tensor row by row: normal(mean, std) floats, rounded to the file type by dtype's
 * quantizer. The stream depends only on (seed, name). */
static int synth__fill(void *ctx, void *dst, uint64_t nbytes) {
  const struct synth__tensor *t = ctx;
  uint64_t row_bytes;
  int rc = dtype_row_bytes(t->type, t->ne0, &row_bytes);
  if (rc < 0) return rc;
  if (row_bytes * t->rows != nbytes) return KVD_EINVAL;
  float *row = malloc(t->ne0 * sizeof *row);
  if (!row) return KVD_ENOMEM;
  uint64_t s = t->seed;
  for (uint64_t r = 0; r < t->rows && rc == 0; r++) {
    for (uint64_t i = 0; i < t->ne0; i += 2) {
      /* Box-Muller: two normals per pair of uniforms */
      double u = synth__uniform(&s), v = synth__uniform(&s);
      double m = sqrt(-2.0 * log(u));
      row[i] = (float)(t->mean + t->std * m * cos(6.283185307179586 * v));
      if (i + 1 < t->ne0) row[i + 1] = (float)(t->mean + t->std * m * sin(6.283185307179586 * v));
    }
    rc = dtype_quant_row(t->type, row, (uint8_t *)dst + r * row_bytes, t->ne0);
  }
  free(row);
  return rc;
}

struct synth__build {
  const struct synth_params *p;
  struct gguf_writer *w;
  struct synth__tensor *tensors;
  size_t n, cap;
};

static int synth__add(struct synth__build *b, const char *name, uint64_t ne0, uint64_t ne1,
                      bool matrix, float mean, float std) {
  if (b->n == b->cap) return KVD_EINVAL; /* sized up front; never reached */
  struct synth__tensor *t = &b->tensors[b->n];
  snprintf(t->name, sizeof t->name, "%s", name);
  t->seed = b->p->seed ^ synth__fnv(name);
  t->ne0 = ne0;
  t->rows = ne1;
  t->type = matrix ? synth_matrix_type(b->p, ne0) : DTYPE_F32;
  t->mean = mean;
  t->std = std;
  uint64_t ne[2] = {ne0, ne1};
  int rc = gguf_writer_add_tensor_fill(b->w, name, matrix ? 2 : 1, ne, t->type, synth__fill, t);
  if (rc == 0) b->n++;
  return rc;
}

static int synth__tensors(struct synth__build *b) {
  const struct synth_params *p = b->p;
  uint64_t dim = p->dim, kv_dim = (uint64_t)p->dim / p->n_heads * p->n_kv_heads, ffn = p->ffn;
  float in_dim = 1.0f / sqrtf((float)dim), in_ffn = 1.0f / sqrtf((float)ffn);
  char name[GGUF_MAX_TENSOR_NAME + 1];
  int rc = synth__add(b, "token_embd.weight", dim, p->vocab, true, 0.0f, 0.2f);
  for (uint32_t l = 0; l < p->n_layers && rc == 0; l++) {
    struct {
      const char *suffix;
      uint64_t ne0, ne1;
      bool matrix;
      float mean, std;
    } parts[] = {
        {"attn_norm", dim, 1, false, 1.0f, 0.1f},
        {"attn_q", dim, dim, true, 0.0f, in_dim},
        {"attn_k", dim, kv_dim, true, 0.0f, in_dim},
        {"attn_v", dim, kv_dim, true, 0.0f, 0.5f * in_dim},
        {"attn_output", dim, dim, true, 0.0f, 0.5f * in_dim},
        {"ffn_norm", dim, 1, false, 1.0f, 0.1f},
        {"ffn_gate", dim, ffn, true, 0.0f, in_dim},
        {"ffn_up", dim, ffn, true, 0.0f, in_dim},
        {"ffn_down", ffn, dim, true, 0.0f, 0.5f * in_ffn},
    };
    for (size_t k = 0; k < sizeof parts / sizeof parts[0] && rc == 0; k++) {
      snprintf(name, sizeof name, "blk.%u.%s.weight", l, parts[k].suffix);
      rc = synth__add(b, name, parts[k].ne0, parts[k].matrix ? parts[k].ne1 : 1, parts[k].matrix,
                      parts[k].mean, parts[k].std);
    }
  }
  if (rc == 0) rc = synth__add(b, "output_norm.weight", dim, 1, false, 1.0f, 0.1f);
  if (rc == 0 && !p->tied)
    rc = synth__add(b, "output.weight", dim, p->vocab, true, 0.0f, 2.0f * in_dim);
  return rc;
}

/* ---- vocabulary ---- */

/* Words of the tiny-stories register; each enters with every prefix, because SentencePiece's
 * merges build a piece only from pieces that are themselves in the vocabulary. */
static const char *const synth__words[] = {
    "the",   "and",    "was",     "to",    "a",    "he",    "she",    "it",     "they",   "of",
    "in",    "on",     "with",    "his",   "her",  "said",  "day",    "one",    "once",   "upon",
    "time",  "there",  "little",  "girl",  "boy",  "big",   "saw",    "wanted", "play",   "happy",
    "very",  "friend", "friends", "mom",   "dad",  "named", "had",    "went",   "park",   "ball",
    "red",   "blue",   "tree",    "dog",   "cat",  "bird",  "sun",    "fun",    "looked", "so",
    "but",   "not",    "you",     "we",    "is",   "are",   "be",     "can",    "do",     "like",
    "loved", "toy",    "toys",    "house", "home", "good",  "bad",    "sad",    "help",   "find",
    "found", "ran",    "jump",    "smile", "new",  "water", "flower", "garden", "sky",    "car",
    "book",  "read",   "cake",    "eat",   "ate",  "food",  "Lily",   "Tom",    "Ben",    "Sue",
    "Max",   "Once",   "The",     "One",   "They", "She",   "He",
};

struct synth__vocab {
  char **tokens;
  float *scores;
  int32_t *types;
  uint32_t n, cap;
  uint64_t *set; /* open-addressing set of token hashes + 1 for the duplicate check */
  uint64_t set_mask;
};

static bool synth__vocab_has(const struct synth__vocab *v, const char *s) {
  uint64_t h = synth__fnv(s);
  for (uint64_t i = h & v->set_mask; v->set[i]; i = (i + 1) & v->set_mask)
    if (strcmp(v->tokens[v->set[i] - 1], s) == 0) return true;
  return false;
}

/* Adds s unless present or full; returns KVD_ENOMEM or 0. */
static int synth__vocab_add(struct synth__vocab *v, const char *s, float score, int32_t type) {
  if (v->n == v->cap || synth__vocab_has(v, s)) return 0;
  size_t len = strlen(s);
  char *copy = malloc(len + 1);
  if (!copy) return KVD_ENOMEM;
  memcpy(copy, s, len + 1);
  uint64_t i = synth__fnv(s) & v->set_mask;
  while (v->set[i])
    i = (i + 1) & v->set_mask;
  v->set[i] = (uint64_t)v->n + 1;
  v->tokens[v->n] = copy;
  v->scores[v->n] = score;
  v->types[v->n] = type;
  v->n++;
  return 0;
}

static void synth__vocab_free(struct synth__vocab *v) {
  for (uint32_t i = 0; i < v->n; i++)
    free(v->tokens[i]);
  free(v->tokens);
  free(v->scores);
  free(v->types);
  free(v->set);
}

/* A piece's score is minus its rank, so earlier (shorter, commoner) pieces merge first. */
static int synth__piece(struct synth__vocab *v, const char *s) {
  return synth__vocab_add(v, s, -(float)(v->n - SYNTH_MIN_VOCAB), SYNTH_TOK_NORMAL);
}

static int synth__vocab_build(struct synth__vocab *v, uint32_t n) {
  uint64_t slots = 16;
  while (slots < (uint64_t)n * 2)
    slots *= 2;
  v->cap = n;
  v->tokens = calloc(n, sizeof *v->tokens);
  v->scores = calloc(n, sizeof *v->scores);
  v->types = calloc(n, sizeof *v->types);
  v->set = calloc(slots, sizeof *v->set);
  v->set_mask = slots - 1;
  if (!v->tokens || !v->scores || !v->types || !v->set) return KVD_ENOMEM;

  char buf[64];
  int rc = synth__vocab_add(v, "<unk>", 0.0f, SYNTH_TOK_UNKNOWN);
  if (rc == 0) rc = synth__vocab_add(v, "<s>", 0.0f, SYNTH_TOK_CONTROL);
  if (rc == 0) rc = synth__vocab_add(v, "</s>", 0.0f, SYNTH_TOK_CONTROL);
  for (unsigned b = 0; b < 256 && rc == 0; b++) {
    snprintf(buf, sizeof buf, "<0x%02X>", b);
    rc = synth__vocab_add(v, buf, 0.0f, SYNTH_TOK_BYTE);
  }
  /* single characters, then word-start letters, then the words with all their prefixes */
  const char *chars = "etaoinshrdlcumwfgypbvkjxqzETAOINSHRDLCUMWFGYPBVKJXQZ0123456789.,!?'\"-:;()";
  if (rc == 0) rc = synth__piece(v, SYNTH_SPACE);
  for (const char *c = chars; *c && rc == 0; c++) {
    snprintf(buf, sizeof buf, "%c", *c);
    rc = synth__piece(v, buf);
  }
  for (const char *c = chars; *c && rc == 0; c++) {
    snprintf(buf, sizeof buf, SYNTH_SPACE "%c", *c);
    rc = synth__piece(v, buf);
  }
  for (size_t w = 0; w < sizeof synth__words / sizeof synth__words[0] && rc == 0; w++) {
    size_t len = strlen(synth__words[w]);
    for (size_t k = 2; k <= len && rc == 0; k++) {
      snprintf(buf, sizeof buf, SYNTH_SPACE "%.*s", (int)k, synth__words[w]);
      rc = synth__piece(v, buf);
    }
  }
  /* Inside-word bigrams, then numbered filler until the vocabulary is full. */
  for (const char *a = chars; *a && *a != 'E' && rc == 0; a++)
    for (const char *c = chars; *c && *c != 'E' && rc == 0; c++) {
      snprintf(buf, sizeof buf, "%c%c", *a, *c);
      rc = synth__piece(v, buf);
    }
  for (uint32_t k = 0; v->n < v->cap && rc == 0; k++) {
    snprintf(buf, sizeof buf, SYNTH_SPACE "w%u", k);
    rc = synth__piece(v, buf);
  }
  return rc;
}

/* ---- the file ---- */

static uint32_t synth__file_type(enum dtype t) {
  switch (t) { /* llama.cpp's LLAMA_FTYPE_* numbers */
  case DTYPE_F16:
    return 1;
  case DTYPE_Q4_0:
    return 2;
  case DTYPE_Q8_0:
    return 7;
  case DTYPE_BF16:
    return 32;
  default:
    return 0;
  }
}

static int synth__meta(const struct synth_params *p, struct gguf_writer *w,
                       const struct synth__vocab *v) {
  uint32_t head_dim = p->dim / p->n_heads;
  int rc = gguf_writer_add_str(w, "general.architecture", "llama");
  if (rc == 0) rc = gguf_writer_add_str(w, "general.name", p->name ? p->name : "kvd-synthetic");
  if (rc == 0) rc = gguf_writer_add_u32(w, "general.file_type", synth__file_type(p->type));
  if (rc == 0 && (p->type == DTYPE_Q8_0 || p->type == DTYPE_Q4_0))
    rc = gguf_writer_add_u32(w, "general.quantization_version", 2);
  if (rc == 0) rc = gguf_writer_add_u32(w, "llama.context_length", p->ctx);
  if (rc == 0) rc = gguf_writer_add_u32(w, "llama.embedding_length", p->dim);
  if (rc == 0) rc = gguf_writer_add_u32(w, "llama.block_count", p->n_layers);
  if (rc == 0) rc = gguf_writer_add_u32(w, "llama.feed_forward_length", p->ffn);
  if (rc == 0) rc = gguf_writer_add_u32(w, "llama.rope.dimension_count", head_dim);
  if (rc == 0) rc = gguf_writer_add_f32(w, "llama.rope.freq_base", p->rope_base);
  if (rc == 0) rc = gguf_writer_add_u32(w, "llama.attention.head_count", p->n_heads);
  if (rc == 0) rc = gguf_writer_add_u32(w, "llama.attention.head_count_kv", p->n_kv_heads);
  if (rc == 0) rc = gguf_writer_add_f32(w, "llama.attention.layer_norm_rms_epsilon", p->rms_eps);
  if (rc == 0) rc = gguf_writer_add_u32(w, "llama.vocab_size", p->vocab);
  if (rc == 0) rc = gguf_writer_add_str(w, "tokenizer.ggml.model", "llama");
  if (rc == 0) rc = gguf_writer_add_str(w, "tokenizer.ggml.pre", "default");
  if (rc == 0)
    rc = gguf_writer_add_str_arr(w, "tokenizer.ggml.tokens", (const char *const *)v->tokens, v->n);
  if (rc == 0)
    rc = gguf_writer_add_arr(w, "tokenizer.ggml.scores", GGUF_VT_FLOAT32, v->scores, v->n);
  if (rc == 0)
    rc = gguf_writer_add_arr(w, "tokenizer.ggml.token_type", GGUF_VT_INT32, v->types, v->n);
  if (rc == 0) rc = gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", 1);
  if (rc == 0) rc = gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", 2);
  if (rc == 0) rc = gguf_writer_add_u32(w, "tokenizer.ggml.unknown_token_id", 0);
  if (rc == 0) rc = gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", true);
  if (rc == 0) rc = gguf_writer_add_bool(w, "tokenizer.ggml.add_eos_token", false);
  if (rc == 0 && p->chat_template)
    rc = gguf_writer_add_str(w, "tokenizer.chat_template", p->chat_template);
  return rc;
}

/* Builds the writer, runs out() on it, frees everything. */
static int synth__run(const struct synth_params *p, const char *path, void **ret_data,
                      size_t *ret_size) {
  int rc = synth_check(p, NULL, 0);
  if (rc < 0) return rc;
  struct synth__vocab v = {0};
  struct synth__build b = {.p = p};
  b.cap = 3 + 9 * (size_t)p->n_layers;
  b.tensors = calloc(b.cap, sizeof *b.tensors);
  if (!b.tensors) return KVD_ENOMEM;
  rc = gguf_writer_new(&b.w);
  if (rc == 0) rc = synth__vocab_build(&v, p->vocab);
  if (rc == 0) rc = synth__meta(p, b.w, &v);
  if (rc == 0) rc = synth__tensors(&b);
  if (rc == 0)
    rc = path ? gguf_writer_write_file(b.w, path) : gguf_writer_write_mem(b.w, ret_data, ret_size);
  gguf_writer_free(b.w);
  synth__vocab_free(&v);
  free(b.tensors);
  return rc;
}

int synth_write_file(const struct synth_params *p, const char *path) {
  if (!path) return KVD_EINVAL;
  return synth__run(p, path, NULL, NULL);
}

int synth_write_mem(const struct synth_params *p, void **ret_data, size_t *ret_size) {
  if (!ret_data || !ret_size) return KVD_EINVAL;
  return synth__run(p, NULL, ret_data, ret_size);
}
