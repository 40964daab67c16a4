/* SentencePiece-style encoding (tokenizer.ggml.model = "llama").
 *
 * The text is escaped (each ' ' becomes U+2581 "▁", and one ▁ is prepended when the model adds a
 * space prefix), split into UTF-8 characters, and adjacent symbols merge greedily: always the pair
 * whose concatenation is a vocabulary piece with the highest score, leftmost on ties. A symbol
 * left without a piece (a character outside the vocabulary) is spelled with <0xXX> byte tokens,
 * or the unknown token when the vocabulary has no byte tokens. */
#include <string.h>

#include "kvd_error.h"
#include "tok_internal.h"

static const char SPACE_MARK[3] = {'\xE2', '\x96', '\x81'}; /* U+2581 */

/* Pieces that plain text may turn into: control, byte and unused tokens are only ever produced
 * on purpose (special-token parsing, byte fallback). */
static int32_t text_piece(const struct tok *t, const char *s, size_t len) {
  int32_t id = tok__lookup(t, s, len);
  if (id < 0) return -1;
  uint8_t ty = t->type[id];
  return ty == TOK_TYPE_NORMAL || ty == TOK_TYPE_USER_DEFINED ? id : -1;
}

static bool spm_pair(const struct tok *t, const char *text, const struct tok__sym *a,
                     const struct tok__sym *b, double *prio, int32_t *id) {
  /* Symbols are adjacent spans of one buffer, so the merged piece is one contiguous span. */
  int32_t m = text_piece(t, text + a->start, (size_t)a->len + b->len);
  if (m < 0) return false;
  *prio = -(double)t->score[m];
  *id = m;
  return true;
}

int tok__spm_encode(const struct tok *t, struct tok__work *w, const char *text, size_t len,
                    bool first_or_after_special, struct tok__out *o) {
  bool prefix = t->add_space_prefix && first_or_after_special;
  size_t spaces = 0;
  for (size_t i = 0; i < len; i++)
    spaces += text[i] == ' ';
  size_t n = len + 2 * spaces + (prefix ? 3 : 0);
  if (n > UINT32_MAX) return KVD_E2BIG; /* spans are uint32 */
  int rc = tok__work_reserve(w, n, n);
  if (rc < 0) return rc;

  char *buf = w->buf;
  size_t k = 0;
  if (prefix) {
    memcpy(buf, SPACE_MARK, 3);
    k = 3;
  }
  for (size_t i = 0; i < len; i++) {
    if (text[i] == ' ') {
      memcpy(buf + k, SPACE_MARK, 3);
      k += 3;
    } else {
      buf[k++] = text[i];
    }
  }

  /* One symbol per UTF-8 character; an invalid byte is a symbol of its own. */
  size_t nsym = 0;
  for (size_t i = 0; i < n;) {
    uint32_t cp;
    uint32_t l = tok__utf8_next(buf + i, n - i, &cp);
    struct tok__sym *s = &w->sym[nsym];
    s->start = (uint32_t)i;
    s->len = l;
    s->id = cp == UINT32_MAX ? -1 : text_piece(t, buf + i, l);
    s->prev = (int32_t)nsym - 1;
    s->next = (int32_t)nsym + 1;
    nsym++;
    i += l;
  }
  if (nsym == 0) return 0;
  w->sym[nsym - 1].next = -1;

  if ((rc = tok__merge_run(t, w, buf, nsym, spm_pair)) < 0) return rc;

  for (int32_t i = 0; i >= 0; i = w->sym[i].next) {
    const struct tok__sym *s = &w->sym[i];
    if (s->id >= 0) {
      tok__emit(o, s->id);
      continue;
    }
    for (uint32_t j = 0; j < s->len; j++) {
      int32_t b = t->byte_tok[(uint8_t)buf[s->start + j]];
      if (b < 0 && t->unk < 0) return KVD_E_TOKENIZER;
      if (b >= 0) {
        tok__emit(o, b);
      } else if (j == 0) {
        tok__emit(o, t->unk); /* one unknown token per character, not per byte */
      }
    }
  }
  return 0;
}
