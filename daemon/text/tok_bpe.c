/* GPT-2 byte-level BPE encoding (tokenizer.ggml.model = "gpt2").
 *
 * A pre-tokenizer regex splits the text into words; a word never merges across that boundary.
 * Vocabulary texts spell bytes as printable code points (GPT-2's byte-to-unicode table: printable
 * Latin-1 bytes stand for themselves, the other 68 bytes take U+0100 onwards in byte order), so a
 * word starts as one single-character token per byte, and adjacent tokens then merge by the
 * lowest rank in tokenizer.ggml.merges ("left right" in that spelling), leftmost on ties. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "kvd_error.h"
#include "tok_internal.h"

/* The pre-tokenizer families: the split regexes of each model's tokenizer.json (Hugging Face
 * `pre_tokenizer`, a Split or a Sequence of Splits with "isolated" behaviour), chosen by the
 * names converters write to tokenizer.ggml.pre. A sequence applies each regex to the pieces the
 * previous one left, matched and unmatched spans alike (tok_bpe_split). PCRE2 with UTF and UCP
 * takes the published patterns as they are (\p{..} classes, lookaheads, (?i:)). */
#define PRE_MAX_NAMES 8
#define PRE_MAX_RE 5
/* GPT-2's split; also the tail of several sequences below. */
#define RE_GPT2 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
/* GPT-4's cl100k split: Llama 3 and its descendants, with numbers in runs of up to three. */
#define RE_LLAMA3                                                                                  \
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}|"                        \
  " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
static const struct pre_family {
  const char *names[PRE_MAX_NAMES]; /* tokenizer.ggml.pre values */
  bool ignore_merges;               /* the whole word is tried as one token before merging */
  const char *regex[PRE_MAX_RE];    /* applied in sequence; unused entries NULL */
} PRE_FAMILIES[] = {
    {{"gpt-2", "default", "phi-2", "mpt", "olmo", "jais", NULL}, false, {RE_GPT2}},
    {{"llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "pixtral", NULL},
     true,
     {RE_LLAMA3}},
    {{"qwen2", "deepseek-r1-qwen", "stablelm2", NULL},
     false,
     {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"
      " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}},
    /* Digits one at a time first, then GPT-2's split (StarCoder, SmolLM, Command-R, EXAONE). */
    {{"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", NULL},
     false,
     {"\\p{N}", RE_GPT2}},
    /* GPT-4o's o200k split (Phi-4-mini, Llama 4): case-aware words with their contractions. */
    {{"gpt-4o", "llama4", NULL},
     false,
     {"[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
      "(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+"
      "[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}|"
      " ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}},
    /* Mistral's Tekken (Nemo, Small 3): o200k's shape without contractions, digits singly. */
    {{"tekken", NULL},
     true,
     {"[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+|"
      "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*|"
      "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}},
    /* DeepSeek V3 / R1: digit runs of three, CJK runs, then an o200k-like split. */
    {{"deepseek-v3", NULL},
     false,
     {"\\p{N}{1,3}", "[\\x{4E00}-\\x{9FA5}\\x{3040}-\\x{309F}\\x{30A0}-\\x{30FF}]+",
      "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?"
      "[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}},
    /* DeepSeek Coder (v1): newlines, letter runs, punctuation runs, CJK, single digits. */
    {{"deepseek-coder", NULL},
     false,
     {"[\\r\\n]", "\\s?\\p{L}+", "\\s?\\p{P}+",
      "[\\x{4E00}-\\x{9FA5}\\x{0800}-\\x{4E00}\\x{AC00}-\\x{D7FF}]+", "\\p{N}"}},
};
#define N_PRE (sizeof PRE_FAMILIES / sizeof PRE_FAMILIES[0])

void tok__bpe_byte_map(struct tok *t) {
  uint32_t extra = 0;
  for (int i = 0; i < 324; i++)
    t->cp_byte[i] = -1;
  for (uint32_t b = 0; b < 256; b++) {
    bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    uint32_t cp = printable ? b : 256 + extra++;
    t->byte_cp[b] = cp;
    t->cp_byte[cp] = (int16_t)b;
  }
}

static uint64_t merge_key(int32_t left, int32_t right) {
  return (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
}

static uint32_t merge_slot(uint64_t key, uint32_t mask) {
  key *= 0x9E3779B97F4A7C15ull; /* Fibonacci hashing spreads the id pairs */
  return (uint32_t)(key >> 32) & mask;
}

static const struct tok__merge *merge_find(const struct tok *t, int32_t left, int32_t right) {
  uint64_t key = merge_key(left, right);
  for (uint32_t i = merge_slot(key, t->merge_mask);; i = (i + 1) & t->merge_mask) {
    const struct tok__merge *m = &t->merges[i];
    if (m->key == key) return m;
    if (m->key == UINT64_MAX) return NULL;
  }
}

static int build_merges(struct tok *t, const struct gguf_file *f, char *err, size_t errlen) {
  const struct gguf_value *arr;
  if (gguf_get_arr(f, "tokenizer.ggml.merges", GGUF_VT_STRING, &arr) != 0)
    return tok__fail(err, errlen, KVD_E_FORMAT, "no tokenizer.ggml.merges string array");
  uint64_t n = arr->v.arr.count;
  if (n > UINT32_MAX / 4)
    return tok__fail(err, errlen, KVD_E_FORMAT, "tokenizer.ggml.merges: too many merges");
  uint32_t cap = 16;
  while (cap < 2 * n)
    cap *= 2;
  t->merges = malloc((size_t)cap * sizeof(*t->merges));
  if (!t->merges) return KVD_ENOMEM;
  for (uint32_t i = 0; i < cap; i++)
    t->merges[i].key = UINT64_MAX;
  t->merge_mask = cap - 1;
  for (uint64_t r = 0; r < n; r++) {
    struct gguf_str s = arr->v.arr.elems[r].v.str;
    /* Mapped texts contain no ' ' (the space byte is spelled U+0120), so the first space after
     * the first character separates the two sides. */
    const char *sp = s.len > 1 ? memchr(s.ptr + 1, ' ', s.len - 1) : NULL;
    if (!sp)
      return tok__fail(err, errlen, KVD_E_FORMAT, "tokenizer.ggml.merges[%llu]: no separator",
                       (unsigned long long)r);
    size_t ll = (size_t)(sp - s.ptr);
    int32_t left = tok__lookup(t, s.ptr, ll);
    int32_t right = tok__lookup(t, sp + 1, s.len - ll - 1);
    if (left < 0 || right < 0) continue; /* can never apply: a side is not a token */
    /* The merged text is both sides concatenated; look it up through a small stack copy when
     * short, which covers every real merge. */
    char tmp[256];
    size_t ml = s.len - 1;
    if (ml > sizeof(tmp)) continue;
    memcpy(tmp, s.ptr, ll);
    memcpy(tmp + ll, sp + 1, s.len - ll - 1);
    int32_t merged = tok__lookup(t, tmp, ml);
    if (merged < 0) continue;
    uint64_t key = merge_key(left, right);
    uint32_t i = merge_slot(key, t->merge_mask);
    while (t->merges[i].key != UINT64_MAX && t->merges[i].key != key)
      i = (i + 1) & t->merge_mask;
    if (t->merges[i].key == key) continue; /* a repeated merge keeps its first (best) rank */
    t->merges[i] = (struct tok__merge){.key = key, .rank = (uint32_t)r, .merged = merged};
  }
  return 0;
}

int tok__bpe_init(struct tok *t, const struct gguf_file *f, char *err, size_t errlen) {
  struct gguf_str pre = {.len = 0, .ptr = ""};
  if (gguf_get_str(f, "tokenizer.ggml.pre", &pre) != 0) pre = (struct gguf_str){7, "default"};
  const struct pre_family *fam = NULL;
  for (size_t i = 0; i < N_PRE && !fam; i++)
    for (size_t j = 0; j < PRE_MAX_NAMES && PRE_FAMILIES[i].names[j]; j++)
      if (gguf_str_eq(pre, PRE_FAMILIES[i].names[j])) fam = &PRE_FAMILIES[i];
  if (!fam)
    return tok__fail(err, errlen, KVD_E_UNSUPPORTED,
                     "unsupported pre-tokenizer '%.*s' (tokenizer.ggml.pre; known: gpt-2, "
                     "llama-bpe, qwen2, smollm, gpt-4o, tekken, deepseek-v3, deepseek-coder and "
                     "their aliases)",
                     (int)(pre.len > 64 ? 64 : pre.len), pre.ptr);
  t->ignore_merges = fam->ignore_merges;

  tok__bpe_byte_map(t);
  for (uint32_t b = 0; b < 256; b++) {
    char s[4];
    size_t l = tok__utf8_put(t->byte_cp[b], s);
    t->byte_tok[b] = tok__lookup(t, s, l);
  }
  int rc = build_merges(t, f, err, errlen);
  if (rc < 0) return rc;

  for (size_t k = 0; k < PRE_MAX_RE && fam->regex[k]; k++) {
    int ecode;
    PCRE2_SIZE eoff;
    /* MATCH_INVALID_UTF: invalid input never matches and simply ends up between matches, where
     * the encoder takes it as a word of its own. */
    pcre2_code *re =
        pcre2_compile((PCRE2_SPTR)fam->regex[k], PCRE2_ZERO_TERMINATED,
                      PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &ecode, &eoff, NULL);
    if (!re) {
      PCRE2_UCHAR msg[120];
      pcre2_get_error_message(ecode, msg, sizeof(msg));
      return tok__fail(err, errlen, KVD_E_TOKENIZER, "pre-tokenizer regex %zu at %zu: %s", k,
                       (size_t)eoff, (const char *)msg);
    }
    /* The JIT is an optimisation only: where it is unavailable the interpreter gives the same
     * matches. */
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
    t->re[t->n_re++] = re;
  }
  return 0;
}

void tok__bpe_destroy(struct tok *t) {
  for (uint32_t k = 0; k < t->n_re; k++)
    pcre2_code_free((pcre2_code *)t->re[k]);
  t->n_re = 0;
  free(t->merges);
  t->merges = NULL;
}

static bool bpe_pair(const struct tok *t, const char *text, const struct tok__sym *a,
                     const struct tok__sym *b, double *prio, int32_t *id) {
  if (a->id < 0 || b->id < 0) return false;
  const struct tok__merge *m = merge_find(t, a->id, b->id);
  if (!m) return false;
  *prio = (double)m->rank;
  *id = m->merged;
  return true;
}

static int bpe_word(const struct tok *t, struct tok__work *w, const char *word, size_t len,
                    struct tok__out *o) {
  int rc = tok__work_reserve(w, len, 2 * len);
  if (rc < 0) return rc;
  if (t->ignore_merges) {
    size_t k = 0;
    for (size_t i = 0; i < len; i++)
      k += tok__utf8_put(t->byte_cp[(uint8_t)word[i]], w->buf + k);
    int32_t id = tok__lookup(t, w->buf, k);
    /* Plain text must never turn into a control token. */
    if (id >= 0 && t->type[id] != TOK_TYPE_CONTROL) {
      tok__emit(o, id);
      return 0;
    }
  }
  /* One symbol per byte; spans index the word itself, as bpe_pair works on ids alone. */
  for (size_t i = 0; i < len; i++) {
    w->sym[i] = (struct tok__sym){.start = (uint32_t)i,
                                  .len = 1,
                                  .id = t->byte_tok[(uint8_t)word[i]],
                                  .prev = (int32_t)i - 1,
                                  .next = i + 1 < len ? (int32_t)i + 1 : -1};
  }
  if ((rc = tok__merge_run(t, w, word, len, bpe_pair)) < 0) return rc;
  for (int32_t i = 0; i >= 0; i = w->sym[i].next) {
    int32_t id = w->sym[i].id;
    if (id < 0) id = t->unk;
    if (id < 0) return KVD_E_TOKENIZER;
    tok__emit(o, id);
  }
  return 0;
}

/* Splits [text, text + len) with regex `level` of the sequence, each matched and unmatched span
 * going on to the next regex, and every piece the last one leaves to bpe_word. The subject is the
 * piece itself, as in Hugging Face's Split: lookaheads and $ see the piece's end. */
static int bpe_split(const struct tok *t, struct tok__work *w, pcre2_match_data *md,
                     uint32_t level, const char *text, size_t len, struct tok__out *o) {
  if (level == t->n_re) return bpe_word(t, w, text, len, o);
  const pcre2_code *re = t->re[level];
  int rc = 0;
  size_t pos = 0;
  while (pos < len && rc == 0) {
    int m = pcre2_match(re, (PCRE2_SPTR)text, len, pos, 0, md, NULL);
    size_t ms = len, me = len;
    if (m >= 0) {
      PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
      ms = ov[0];
      me = ov[1];
    } else if (m != PCRE2_ERROR_NOMATCH) {
      return m == PCRE2_ERROR_NOMEMORY ? KVD_ENOMEM : KVD_E_TOKENIZER;
    }
    /* Unmatched bytes (invalid UTF-8, or what a partial regex of a sequence leaves) form a
     * piece of their own. */
    if (ms > pos) rc = bpe_split(t, w, md, level + 1, text + pos, ms - pos, o);
    if (rc == 0 && me > ms) rc = bpe_split(t, w, md, level + 1, text + ms, me - ms, o);
    /* An empty match still moves on by one byte, which goes to the next level alone. */
    if (rc == 0 && me <= pos) {
      rc = bpe_split(t, w, md, level + 1, text + pos, 1, o);
      me = pos + 1;
    }
    pos = me;
  }
  return rc;
}

int tok__bpe_encode(const struct tok *t, struct tok__work *w, const char *text, size_t len,
                    struct tok__out *o) {
  if (len > UINT32_MAX) return KVD_E2BIG;
  /* One match block serves every level: a level's match is read before the next level runs. */
  pcre2_match_data *md = pcre2_match_data_create(1, NULL);
  if (!md) return KVD_ENOMEM;
  int rc = bpe_split(t, w, md, 0, text, len, o);
  pcre2_match_data_free(md);
  return rc;
}
