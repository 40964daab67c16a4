/* Private to daemon/text/tok*.c and detok.c: the tokenizer's tables and the merge engine that the
 * SPM and BPE encoders share. */
#ifndef KVD_TOK_INTERNAL_H
#define KVD_TOK_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tok.h"

/* Per-token flag bits (tok.flags). */
enum {
  TOK__F_EOG = 1u << 0, /* ends generation */
};

/* One BPE merge: (left, right) -> merged with a rank (lower merges first). */
struct tok__merge {
  uint64_t key; /* (uint64_t)left << 32 | right; UINT64_MAX marks an empty slot */
  uint32_t rank;
  int32_t merged;
};

struct tok {
  enum tok_kind kind;
  uint32_t n_vocab;

  /* Vocabulary text of token i: text + text_off[i], NUL-terminated, length
   * text_off[i + 1] - text_off[i] - 1. (n_vocab + 1) offsets. */
  char *text;
  uint32_t *text_off;
  float *score;   /* (n_vocab) SPM merge scores, 0 when the file has none */
  uint8_t *type;  /* (n_vocab) enum tok_type */
  uint8_t *flags; /* (n_vocab) TOK__F_* */

  /* Plain decoded bytes of token i (what tok_piece returns without TOK_DECODE_SPECIAL): piece +
   * piece_off[i], length piece_off[i + 1] - piece_off[i]. */
  char *piece;
  uint32_t *piece_off;
  uint32_t max_piece; /* longest piece or special text, in bytes */

  /* Vocabulary text -> id, open addressing with linear probing; -1 is empty. */
  int32_t *hash;
  uint32_t hash_mask;

  int32_t bos, eos, eot, unk, pad;
  int32_t eog[TOK_MAX_EOG]; /* every id flagged TOK__F_EOG, ascending */
  uint32_t n_eog;
  bool add_bos, add_eos;
  bool add_space_prefix; /* SPM: prepend ▁ to the text (and drop it again on decode) */

  /* The token for each byte: SPM's <0xXX> fallback, BPE's mapped single-character token. */
  int32_t byte_tok[256];

  /* Control and user-defined tokens that TOK_PARSE_SPECIAL matches, grouped by first byte and
   * longest first within a group: special[special_first[b] .. special_first[b + 1]). */
  int32_t *special;
  uint32_t n_special;
  uint32_t special_first[257];

  /* BPE only. */
  struct tok__merge *merges; /* open addressing table, merge_mask + 1 slots */
  uint32_t merge_mask;
  uint32_t byte_cp[256]; /* GPT-2's printable code point for each byte */
  int16_t cp_byte[324];  /* and back: code points below 324, -1 where none maps */
  bool ignore_merges;    /* llama-3: a word that is a whole token skips merging */
  /* pcre2_code_8 *: the pre-tokenizer's regexes, applied in sequence (void: keeps pcre2.h
   * private) */
  void *re[5];
  uint32_t n_re;
};

static inline uint32_t tok__text_len(const struct tok *t, int32_t id) {
  return t->text_off[id + 1] - t->text_off[id] - 1;
}

static inline const char *tok__text(const struct tok *t, int32_t id) {
  return t->text + t->text_off[id];
}

/* Hash-table lookup: the id of text[0..len), or -1. */
int32_t tok__lookup(const struct tok *t, const char *text, size_t len);

/* Output ids, snprintf-style: counts every id, stores the first cap. */
struct tok__out {
  int32_t *ids;
  size_t cap;
  size_t n;
};

static inline void tok__emit(struct tok__out *o, int32_t id) {
  if (o->n < o->cap) o->ids[o->n] = id;
  o->n++;
}

/* A symbol of the merge engine: a span of the word being encoded, in a doubly linked list. */
struct tok__sym {
  uint32_t start, len;
  int32_t id; /* vocabulary id, -1 when the span has none */
  int32_t prev, next;
};

/* A candidate merge of two adjacent symbols: lower prio wins, then the leftmost. */
struct tok__cand {
  double prio;
  uint32_t left, right;
  uint32_t len; /* left.len + right.len when queued: a stale candidate no longer matches */
  int32_t id;
};

/* Scratch memory for one tok_encode call, reused across its words and freed at the end. */
struct tok__work {
  struct tok__sym *sym;
  size_t sym_cap;
  struct tok__cand *heap;
  size_t heap_n, heap_cap;
  char *buf; /* SPM: the escaped text; BPE: a word's mapped text */
  size_t buf_cap;
};

void tok__work_free(struct tok__work *w);
int tok__work_reserve(struct tok__work *w, size_t nsym, size_t nbuf);

/* Whether a and b (adjacent) may merge; if so, the merged id and its priority. */
typedef bool (*tok__pair_fn)(const struct tok *t, const char *text, const struct tok__sym *a,
                             const struct tok__sym *b, double *prio, int32_t *id);

/* Merges w->sym[0..nsym) (already linked in order, over text) until no adjacent pair may merge.
 * Survivors stay linked from symbol 0. Returns 0 or KVD_ENOMEM. */
int tok__merge_run(const struct tok *t, struct tok__work *w, const char *text, size_t nsym,
                   tok__pair_fn pair);

/* The encoders for one raw-text fragment (no special tokens inside). first_or_after_special: the
 * fragment starts the text or follows a special token (SPM prepends ▁ there). */
int tok__spm_encode(const struct tok *t, struct tok__work *w, const char *text, size_t len,
                    bool first_or_after_special, struct tok__out *o);
int tok__bpe_encode(const struct tok *t, struct tok__work *w, const char *text, size_t len,
                    struct tok__out *o);

/* BPE set-up (tok_bpe.c), called by tok_new for TOK_KIND_BPE. */
int tok__bpe_init(struct tok *t, const struct gguf_file *f, char *err, size_t errlen);
void tok__bpe_destroy(struct tok *t);
/* GPT-2's byte <-> code point tables (filled into t). */
void tok__bpe_byte_map(struct tok *t);

/* Decoding of one UTF-8 character at s[0..n): its code point and length; an invalid or truncated
 * sequence yields length 1 and code point UINT32_MAX. */
uint32_t tok__utf8_next(const char *s, size_t n, uint32_t *ret_cp);
/* Writes cp as UTF-8 to out (room for 4), returns its length. */
size_t tok__utf8_put(uint32_t cp, char *out);

/* Formats an error message into err (when errlen > 0) and returns rc. */
int tok__fail(char *err, size_t errlen, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif
