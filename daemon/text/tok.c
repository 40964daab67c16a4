/* Tokenizer construction from GGUF metadata, vocabulary lookup, special-token splitting and the
 * encode entry point that hands raw-text fragments to the SPM or BPE encoder. */
#include "tok.h"

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "kvd_error.h"
#include "tok_internal.h"

int tok__fail(char *err, size_t errlen, int rc, const char *fmt, ...) {
  if (err && errlen > 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return rc;
}

/* FNV-1a: token texts are short, so a simple byte-wise hash is as fast as anything fancier. */
static uint32_t hash_bytes(const char *s, size_t n) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < n; i++) {
    h ^= (uint8_t)s[i];
    h *= 16777619u;
  }
  return h;
}

int32_t tok__lookup(const struct tok *t, const char *text, size_t len) {
  uint32_t i = hash_bytes(text, len) & t->hash_mask;
  for (;;) {
    int32_t id = t->hash[i];
    if (id < 0) return -1;
    if (tok__text_len(t, id) == len && memcmp(tok__text(t, id), text, len) == 0) return id;
    i = (i + 1) & t->hash_mask;
  }
}

uint32_t tok__utf8_next(const char *s, size_t n, uint32_t *ret_cp) {
  const uint8_t *u = (const uint8_t *)s;
  uint8_t c = u[0];
  uint32_t len, cp;
  if (c < 0x80) {
    *ret_cp = c;
    return 1;
  }
  /* Reject overlongs (C0, C1, E0 80..9F, F0 80..8F), surrogates (ED A0..BF) and > U+10FFFF. */
  uint8_t lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2;
    cp = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    cp = c & 0x0F;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    cp = c & 0x07;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    *ret_cp = UINT32_MAX;
    return 1;
  }
  if (n < len) {
    *ret_cp = UINT32_MAX;
    return 1;
  }
  for (uint32_t i = 1; i < len; i++) {
    uint8_t b = u[i];
    if (b < lo || b > hi) {
      *ret_cp = UINT32_MAX;
      return 1;
    }
    lo = 0x80;
    hi = 0xBF;
    cp = cp << 6 | (b & 0x3F);
  }
  *ret_cp = cp;
  return len;
}

size_t tok__utf8_put(uint32_t cp, char *out) {
  uint8_t *o = (uint8_t *)out;
  if (cp < 0x80) {
    o[0] = (uint8_t)cp;
    return 1;
  }
  if (cp < 0x800) {
    o[0] = (uint8_t)(0xC0 | cp >> 6);
    o[1] = (uint8_t)(0x80 | (cp & 0x3F));
    return 2;
  }
  if (cp < 0x10000) {
    o[0] = (uint8_t)(0xE0 | cp >> 12);
    o[1] = (uint8_t)(0x80 | (cp >> 6 & 0x3F));
    o[2] = (uint8_t)(0x80 | (cp & 0x3F));
    return 3;
  }
  o[0] = (uint8_t)(0xF0 | cp >> 18);
  o[1] = (uint8_t)(0x80 | (cp >> 12 & 0x3F));
  o[2] = (uint8_t)(0x80 | (cp >> 6 & 0x3F));
  o[3] = (uint8_t)(0x80 | (cp & 0x3F));
  return 4;
}

/* ---- construction ---------------------------------------------------------------------------- */

/* Element i of an integer array of any width, as int64 (GGUF arrays are little-endian). */
static int64_t arr_int(const struct gguf_value *v, uint64_t i) {
  const uint8_t *p = v->v.arr.data;
  switch (v->v.arr.type) {
  case GGUF_VT_UINT8:
  case GGUF_VT_BOOL:
    return p[i];
  case GGUF_VT_INT8:
    return (int8_t)p[i];
  case GGUF_VT_UINT16: {
    uint16_t x;
    memcpy(&x, p + 2 * i, 2);
    return x;
  }
  case GGUF_VT_INT16: {
    int16_t x;
    memcpy(&x, p + 2 * i, 2);
    return x;
  }
  case GGUF_VT_UINT32: {
    uint32_t x;
    memcpy(&x, p + 4 * i, 4);
    return x;
  }
  case GGUF_VT_INT32: {
    int32_t x;
    memcpy(&x, p + 4 * i, 4);
    return x;
  }
  case GGUF_VT_UINT64:
  case GGUF_VT_INT64: {
    int64_t x;
    memcpy(&x, p + 8 * i, 8);
    return x;
  }
  default:
    return 0;
  }
}

static bool is_int_type(enum gguf_vtype ty) {
  return ty == GGUF_VT_UINT8 || ty == GGUF_VT_INT8 || ty == GGUF_VT_UINT16 || ty == GGUF_VT_INT16 ||
         ty == GGUF_VT_UINT32 || ty == GGUF_VT_INT32 || ty == GGUF_VT_UINT64 || ty == GGUF_VT_INT64;
}

/* A special id from key, def when the key is absent; a value outside the vocabulary (converters
 * write 0xFFFFFFFF or -1 for "none") becomes -1. */
static int32_t special_id(const struct gguf_file *f, const char *key, int64_t def, uint32_t n) {
  int64_t v;
  int rc = gguf_get_i64(f, key, &v);
  int64_t id = rc == 0 ? v : rc == KVD_ENOENT ? def : -1;
  return id >= 0 && id < (int64_t)n ? (int32_t)id : -1;
}

static bool get_flag(const struct gguf_file *f, const char *key, bool def) {
  bool b;
  return gguf_get_bool(f, key, &b) == 0 ? b : def;
}

static int build_text(struct tok *t, const struct gguf_value *tokens, char *err, size_t errlen) {
  uint32_t n = t->n_vocab;
  uint64_t total = 0;
  for (uint32_t i = 0; i < n; i++) {
    const struct gguf_value *e = &tokens->v.arr.elems[i];
    total += e->v.str.len + 1;
  }
  if (total > UINT32_MAX)
    return tok__fail(err, errlen, KVD_E_FORMAT, "tokenizer.ggml.tokens: texts too large");
  t->text = malloc(total ? total : 1);
  t->text_off = malloc(((size_t)n + 1) * sizeof(*t->text_off));
  if (!t->text || !t->text_off) return KVD_ENOMEM;
  uint32_t off = 0;
  for (uint32_t i = 0; i < n; i++) {
    struct gguf_str s = tokens->v.arr.elems[i].v.str;
    t->text_off[i] = off;
    memcpy(t->text + off, s.ptr, s.len);
    off += (uint32_t)s.len;
    t->text[off++] = '\0';
  }
  t->text_off[n] = off;
  return 0;
}

static int build_hash(struct tok *t) {
  uint32_t cap = 16;
  while (cap < 2 * (uint64_t)t->n_vocab)
    cap *= 2;
  t->hash = malloc((size_t)cap * sizeof(*t->hash));
  if (!t->hash) return KVD_ENOMEM;
  memset(t->hash, 0xff, (size_t)cap * sizeof(*t->hash));
  t->hash_mask = cap - 1;
  for (uint32_t id = 0; id < t->n_vocab; id++) {
    uint32_t len = tok__text_len(t, (int32_t)id);
    if (len == 0) continue;
    /* A duplicated text keeps its first id, so lookups are deterministic. */
    if (tok__lookup(t, tok__text(t, (int32_t)id), len) >= 0) continue;
    uint32_t i = hash_bytes(tok__text(t, (int32_t)id), len) & t->hash_mask;
    while (t->hash[i] >= 0)
      i = (i + 1) & t->hash_mask;
    t->hash[i] = (int32_t)id;
  }
  return 0;
}

/* "<0xAB>" -> 0xAB, or -1. */
static int parse_byte_token(const char *s, uint32_t len) {
  if (len != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
  int v = 0;
  for (int i = 3; i < 5; i++) {
    char c = s[i];
    int d = c >= '0' && c <= '9'   ? c - '0'
            : c >= 'A' && c <= 'F' ? c - 'A' + 10
            : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                   : -1;
    if (d < 0) return -1;
    v = v * 16 + d;
  }
  return v;
}

static void spm_byte_tokens(struct tok *t, bool have_types) {
  for (uint32_t id = 0; id < t->n_vocab; id++) {
    /* Without token types, the text alone identifies byte tokens. */
    if (have_types && t->type[id] != TOK_TYPE_BYTE) continue;
    int b = parse_byte_token(tok__text(t, (int32_t)id), tok__text_len(t, (int32_t)id));
    if (b < 0) continue;
    if (t->byte_tok[b] < 0) t->byte_tok[b] = (int32_t)id;
    if (!have_types) t->type[id] = TOK_TYPE_BYTE;
  }
}

/* The plain decoded bytes of token id, written to out (NULL: length only). */
static size_t plain_piece(const struct tok *t, int32_t id, char *out) {
  const char *s = tok__text(t, id);
  uint32_t len = tok__text_len(t, id);
  switch (t->type[id]) {
  case TOK_TYPE_CONTROL:
    return 0;
  case TOK_TYPE_UNKNOWN:
    if (out) memcpy(out, "\xEF\xBF\xBD", 3);
    return 3;
  case TOK_TYPE_BYTE: {
    int b = parse_byte_token(s, len);
    if (b >= 0) {
      if (out) out[0] = (char)b;
      return 1;
    }
    break; /* a "byte" token without the <0xXX> form decodes as text */
  }
  case TOK_TYPE_USER_DEFINED:
    /* Added tokens are stored as their literal text in both kinds of vocabulary. */
    if (out) memcpy(out, s, len);
    return len;
  default:
    break;
  }
  size_t n = 0;
  if (t->kind == TOK_KIND_SPM) {
    for (uint32_t i = 0; i < len;) {
      if (i + 3 <= len && memcmp(s + i, "\xE2\x96\x81", 3) == 0) {
        if (out) out[n] = ' ';
        n++;
        i += 3;
      } else {
        if (out) out[n] = s[i];
        n++;
        i++;
      }
    }
    return n;
  }
  /* BPE: each code point stands for one byte; anything unmapped is kept as it is. */
  for (uint32_t i = 0; i < len;) {
    uint32_t cp;
    uint32_t l = tok__utf8_next(s + i, len - i, &cp);
    if (cp < 324 && t->cp_byte[cp] >= 0) {
      if (out) out[n] = (char)t->cp_byte[cp];
      n++;
    } else {
      if (out) memcpy(out + n, s + i, l);
      n += l;
    }
    i += l;
  }
  return n;
}

static int build_pieces(struct tok *t) {
  uint32_t n = t->n_vocab;
  t->piece_off = malloc(((size_t)n + 1) * sizeof(*t->piece_off));
  if (!t->piece_off) return KVD_ENOMEM;
  uint64_t total = 0;
  for (uint32_t id = 0; id < n; id++) {
    size_t l = plain_piece(t, (int32_t)id, NULL);
    uint32_t tl = tok__text_len(t, (int32_t)id);
    if (l > t->max_piece) t->max_piece = (uint32_t)l;
    if (tl > t->max_piece) t->max_piece = tl;
    t->piece_off[id] = (uint32_t)total;
    total += l;
  }
  if (total > UINT32_MAX) return KVD_E_FORMAT;
  t->piece_off[n] = (uint32_t)total;
  t->piece = malloc(total ? total : 1);
  if (!t->piece) return KVD_ENOMEM;
  for (uint32_t id = 0; id < n; id++)
    plain_piece(t, (int32_t)id, t->piece + t->piece_off[id]);
  return 0;
}

static int cmp_u64(const void *pa, const void *pb) {
  uint64_t a = *(const uint64_t *)pa, b = *(const uint64_t *)pb;
  return a < b ? -1 : a > b;
}

/* Orders the special list by first byte, then longest first (so the first match found at a
 * position is the longest), then by id. The order is packed into one integer key per token
 * because qsort has no context argument. */
static int sort_specials(struct tok *t) {
  uint64_t *keys = malloc((t->n_special ? t->n_special : 1) * sizeof(*keys));
  if (!keys) return KVD_ENOMEM;
  for (uint32_t i = 0; i < t->n_special; i++) {
    int32_t id = t->special[i];
    uint64_t first = (uint8_t)tok__text(t, id)[0];
    uint32_t len = tok__text_len(t, id);
    uint64_t inv_len = 0xFFFFFFu - (len < 0xFFFFFFu ? len : 0xFFFFFFu);
    keys[i] = first << 56 | inv_len << 32 | (uint32_t)id;
  }
  qsort(keys, t->n_special, sizeof(*keys), cmp_u64);
  for (uint32_t i = 0; i < t->n_special; i++)
    t->special[i] = (int32_t)(uint32_t)keys[i];
  free(keys);
  return 0;
}

static int build_specials(struct tok *t) {
  uint32_t count = 0;
  for (uint32_t id = 0; id < t->n_vocab; id++) {
    uint8_t ty = t->type[id];
    if ((ty == TOK_TYPE_CONTROL || ty == TOK_TYPE_USER_DEFINED) && tok__text_len(t, (int32_t)id))
      count++;
  }
  t->special = malloc((count ? count : 1) * sizeof(*t->special));
  if (!t->special) return KVD_ENOMEM;
  for (uint32_t id = 0; id < t->n_vocab; id++) {
    uint8_t ty = t->type[id];
    if ((ty == TOK_TYPE_CONTROL || ty == TOK_TYPE_USER_DEFINED) && tok__text_len(t, (int32_t)id))
      t->special[t->n_special++] = (int32_t)id;
  }
  int rc = sort_specials(t);
  if (rc < 0) return rc;
  uint32_t k = 0;
  for (uint32_t b = 0; b < 256; b++) {
    t->special_first[b] = k;
    while (k < t->n_special && (uint8_t)tok__text(t, t->special[k])[0] == b)
      k++;
  }
  t->special_first[256] = k;
  return 0;
}

static void mark_eog(struct tok *t) {
  /* End-of-turn markers first: without an eot key, the first one present stands in for it. */
  static const char *const names[] = {
      "<|eot_id|>",      "<|im_end|>", "<|end|>", "<end_of_turn>", "<|eom_id|>", "<|endoftext|>",
      "<|end_of_text|>", "<|return|>",
      "<\uff5cend\u2581of\u2581sentence\uff5c>" /* DeepSeek */};
  static const size_t n_eot_names = 4;
  if (t->eos >= 0) t->flags[t->eos] |= TOK__F_EOG;
  if (t->eot >= 0) t->flags[t->eot] |= TOK__F_EOG;
  for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
    int32_t id = tok__lookup(t, names[i], strlen(names[i]));
    if (id < 0) continue;
    if (t->type[id] != TOK_TYPE_CONTROL && t->type[id] != TOK_TYPE_USER_DEFINED) continue;
    t->flags[id] |= TOK__F_EOG;
    if (t->eot < 0 && i < n_eot_names) t->eot = id;
  }
  t->n_eog = 0;
  for (uint32_t id = 0; id < t->n_vocab && t->n_eog < TOK_MAX_EOG; id++)
    if (t->flags[id] & TOK__F_EOG) t->eog[t->n_eog++] = (int32_t)id;
}

int tok_new(const struct gguf_file *f, struct tok **ret, char *err, size_t errlen) {
  if (err && errlen) err[0] = '\0';
  struct gguf_str model;
  if (gguf_get_str(f, "tokenizer.ggml.model", &model) != 0)
    return tok__fail(err, errlen, KVD_E_FORMAT, "no tokenizer.ggml.model string");
  enum tok_kind kind;
  if (gguf_str_eq(model, "llama")) {
    kind = TOK_KIND_SPM;
  } else if (gguf_str_eq(model, "gpt2")) {
    kind = TOK_KIND_BPE;
  } else {
    return tok__fail(err, errlen, KVD_E_UNSUPPORTED, "unsupported tokenizer model '%.*s'",
                     (int)(model.len > 64 ? 64 : model.len), model.ptr);
  }

  const struct gguf_value *tokens, *scores = NULL, *types = NULL;
  if (gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_VT_STRING, &tokens) != 0)
    return tok__fail(err, errlen, KVD_E_FORMAT, "no tokenizer.ggml.tokens string array");
  uint64_t n = tokens->v.arr.count;
  if (n == 0 || n >= INT32_MAX)
    return tok__fail(err, errlen, KVD_E_FORMAT, "tokenizer.ggml.tokens: bad count %llu",
                     (unsigned long long)n);
  if (gguf_get_arr(f, "tokenizer.ggml.scores", GGUF_VT_COUNT, &scores) == 0 &&
      (scores->v.arr.type != GGUF_VT_FLOAT32 || scores->v.arr.count != n))
    return tok__fail(err, errlen, KVD_E_FORMAT, "tokenizer.ggml.scores: not %llu float32s",
                     (unsigned long long)n);
  if (gguf_get_arr(f, "tokenizer.ggml.token_type", GGUF_VT_COUNT, &types) == 0 &&
      (!is_int_type(types->v.arr.type) || types->v.arr.count != n))
    return tok__fail(err, errlen, KVD_E_FORMAT, "tokenizer.ggml.token_type: not %llu integers",
                     (unsigned long long)n);

  struct tok *t = calloc(1, sizeof(*t));
  if (!t) return KVD_ENOMEM;
  t->kind = kind;
  t->n_vocab = (uint32_t)n;
  for (int b = 0; b < 256; b++)
    t->byte_tok[b] = -1;
  int rc = build_text(t, tokens, err, errlen);
  if (rc < 0) goto fail;
  t->score = calloc(n, sizeof(*t->score));
  t->type = malloc(n);
  t->flags = calloc(n, 1);
  if (!t->score || !t->type || !t->flags) {
    rc = KVD_ENOMEM;
    goto fail;
  }
  for (uint64_t i = 0; i < n; i++) {
    if (scores) memcpy(&t->score[i], (const uint8_t *)scores->v.arr.data + 4 * i, 4);
    int64_t ty = types ? arr_int(types, i) : TOK_TYPE_NORMAL;
    t->type[i] = (uint8_t)(ty >= TOK_TYPE_UNDEFINED && ty <= TOK_TYPE_BYTE ? ty : TOK_TYPE_NORMAL);
  }
  if ((rc = build_hash(t)) < 0) goto fail;

  bool spm = kind == TOK_KIND_SPM;
  t->bos = special_id(f, "tokenizer.ggml.bos_token_id", spm ? 1 : -1, t->n_vocab);
  t->eos = special_id(f, "tokenizer.ggml.eos_token_id", spm ? 2 : -1, t->n_vocab);
  t->unk = special_id(f, "tokenizer.ggml.unknown_token_id", spm ? 0 : -1, t->n_vocab);
  t->pad = special_id(f, "tokenizer.ggml.padding_token_id", -1, t->n_vocab);
  t->eot = special_id(f, "tokenizer.ggml.eot_token_id", -1, t->n_vocab);
  int32_t eom = special_id(f, "tokenizer.ggml.eom_token_id", -1, t->n_vocab);
  if (eom >= 0) t->flags[eom] |= TOK__F_EOG;
  /* SentencePiece models add BOS unless told otherwise; byte-level BPE models say so explicitly
   * (llama-3 does) or do not. */
  t->add_bos = get_flag(f, "tokenizer.ggml.add_bos_token", spm);
  t->add_eos = get_flag(f, "tokenizer.ggml.add_eos_token", false);
  t->add_space_prefix = get_flag(f, "tokenizer.ggml.add_space_prefix", spm);

  if (spm) {
    spm_byte_tokens(t, types != NULL);
  } else if ((rc = tok__bpe_init(t, f, err, errlen)) < 0) {
    goto fail;
  }
  if ((rc = build_pieces(t)) < 0) goto fail;
  if ((rc = build_specials(t)) < 0) goto fail;
  mark_eog(t);
  *ret = t;
  return 0;

fail:
  if (rc == KVD_ENOMEM && err && errlen && !err[0]) tok__fail(err, errlen, rc, "out of memory");
  tok_free(t);
  return rc;
}

void tok_free(struct tok *t) {
  if (!t) return;
  tok__bpe_destroy(t);
  free(t->text);
  free(t->text_off);
  free(t->score);
  free(t->type);
  free(t->flags);
  free(t->piece);
  free(t->piece_off);
  free(t->hash);
  free(t->special);
  free(t);
}

/* ---- accessors ------------------------------------------------------------------------------- */

enum tok_kind tok_kind(const struct tok *t) {
  return t->kind;
}
uint32_t tok_vocab_size(const struct tok *t) {
  return t->n_vocab;
}
int32_t tok_bos(const struct tok *t) {
  return t->bos;
}
int32_t tok_eos(const struct tok *t) {
  return t->eos;
}
int32_t tok_eot(const struct tok *t) {
  return t->eot;
}
int32_t tok_unk(const struct tok *t) {
  return t->unk;
}
int32_t tok_pad(const struct tok *t) {
  return t->pad;
}
bool tok_add_bos(const struct tok *t) {
  return t->add_bos && t->bos >= 0;
}
bool tok_add_eos(const struct tok *t) {
  return t->add_eos && t->eos >= 0;
}

uint32_t tok_eog_ids(const struct tok *t, const int32_t **ret) {
  *ret = t->eog;
  return t->n_eog;
}

bool tok_is_eog(const struct tok *t, int32_t id) {
  return id >= 0 && (uint32_t)id < t->n_vocab && (t->flags[id] & TOK__F_EOG);
}

enum tok_type tok_token_type(const struct tok *t, int32_t id) {
  if (id < 0 || (uint32_t)id >= t->n_vocab) return TOK_TYPE_UNDEFINED;
  return (enum tok_type)t->type[id];
}

const char *tok_token_text(const struct tok *t, int32_t id) {
  if (id < 0 || (uint32_t)id >= t->n_vocab) return NULL;
  return tok__text(t, id);
}

int32_t tok_find(const struct tok *t, const char *text, size_t len) {
  int32_t id = len ? tok__lookup(t, text, len) : -1;
  return id >= 0 ? id : KVD_ENOENT;
}

/* ---- encoding -------------------------------------------------------------------------------- */

/* The special token starting at text[pos], longest first, or -1. */
static int32_t match_special(const struct tok *t, const char *text, size_t len, size_t pos) {
  uint8_t b = (uint8_t)text[pos];
  for (uint32_t k = t->special_first[b]; k < t->special_first[b + 1]; k++) {
    int32_t id = t->special[k];
    uint32_t l = tok__text_len(t, id);
    if (l <= len - pos && memcmp(text + pos, tok__text(t, id), l) == 0) return id;
  }
  return -1;
}

static int encode_raw(const struct tok *t, struct tok__work *w, const char *text, size_t len,
                      bool after_special, struct tok__out *o) {
  if (len == 0) return 0;
  if (t->kind == TOK_KIND_SPM) return tok__spm_encode(t, w, text, len, after_special, o);
  return tok__bpe_encode(t, w, text, len, o);
}

int tok_encode(const struct tok *t, const char *text, size_t len, unsigned flags, int32_t *out,
               size_t cap) {
  if (!text) {
    if (len > 0) return KVD_EINVAL;
    text = "";
  }
  struct tok__out o = {.ids = out, .cap = out ? cap : 0, .n = 0};
  struct tok__work w = {0};
  int rc = 0;
  if ((flags & TOK_ADD_SPECIAL) && tok_add_bos(t)) tok__emit(&o, t->bos);
  /* The text's start counts as "after a special token": SPM prepends its ▁ to the first fragment
   * and to each fragment that follows a matched special token. */
  bool after_special = true;
  size_t frag = 0;
  if ((flags & TOK_PARSE_SPECIAL) && t->n_special > 0) {
    for (size_t pos = 0; pos < len;) {
      int32_t id = match_special(t, text, len, pos);
      if (id < 0) {
        pos++;
        continue;
      }
      if ((rc = encode_raw(t, &w, text + frag, pos - frag, after_special, &o)) < 0) goto out;
      if (pos > frag) after_special = false;
      tok__emit(&o, id);
      after_special = true;
      pos += tok__text_len(t, id);
      frag = pos;
    }
  }
  if ((rc = encode_raw(t, &w, text + frag, len - frag, after_special, &o)) < 0) goto out;
  if ((flags & TOK_ADD_SPECIAL) && tok_add_eos(t)) tok__emit(&o, t->eos);
  rc = o.n > INT_MAX ? KVD_E2BIG : (int)o.n;
out:
  tok__work_free(&w);
  return rc;
}
