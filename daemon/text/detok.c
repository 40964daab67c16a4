/* Decoding: token ids back to bytes, whole sequences and the streaming detokenizer.
 *
 * Each token's plain bytes are precomputed by tok_new (SPM: ▁ -> ' ', <0xXX> -> that byte; BPE:
 * mapped code points -> bytes), so decoding is a copy per token. The stream adds a UTF-8 state
 * machine so that a client never receives half a character:
 *
 *   idle    --ASCII-->              emit, idle
 *   idle    --lead byte (C2..F4)--> hold, pending(need = length - 1)
 *   idle    --anything else-->      emit U+FFFD, idle
 *   pending --valid continuation--> hold; when need reaches 0 emit the character, idle
 *   pending --anything else-->      emit U+FFFD for the held bytes, retry the byte from idle
 *
 * "Valid continuation" is the Unicode table of well-formed sequences (no overlongs, surrogates or
 * code points past U+10FFFF), which is what makes one U+FFFD per maximal invalid subpart. */
#include <limits.h>
#include <string.h>

#include "kvd_error.h"
#include "tok_internal.h"

static const char REPLACEMENT[3] = {'\xEF', '\xBF', '\xBD'}; /* U+FFFD */

/* The bytes id decodes to under flags, and whether a pending TOK_DECODE_STRIP_SPACE is used up
 * (updating *strip). */
static const char *piece_bytes(const struct tok *t, int32_t id, unsigned flags, bool *strip,
                               size_t *ret_len) {
  uint8_t ty = t->type[id];
  bool control = ty == TOK_TYPE_CONTROL || ty == TOK_TYPE_UNKNOWN;
  const char *p;
  size_t len;
  if (control && (flags & TOK_DECODE_SPECIAL)) {
    p = tok__text(t, id);
    len = tok__text_len(t, id);
  } else {
    p = t->piece + t->piece_off[id];
    len = t->piece_off[id + 1] - t->piece_off[id];
  }
  /* The space SPM's encoder prepended lands at the start of the first text token (BOS and other
   * control tokens before it do not count); a <0x20> byte token is a real space. */
  if (*strip && ty != TOK_TYPE_CONTROL) {
    *strip = false;
    if (ty != TOK_TYPE_BYTE && ty != TOK_TYPE_UNKNOWN && len > 0 && p[0] == ' ') {
      p++;
      len--;
    }
  }
  *ret_len = len;
  return p;
}

static bool valid_id(const struct tok *t, int32_t id) {
  return id >= 0 && (uint32_t)id < t->n_vocab;
}

static bool strip_applies(const struct tok *t, unsigned flags) {
  return (flags & TOK_DECODE_STRIP_SPACE) && t->kind == TOK_KIND_SPM && t->add_space_prefix;
}

int tok_piece(const struct tok *t, int32_t id, unsigned flags, char *buf, size_t cap) {
  if (!valid_id(t, id)) return KVD_EINVAL;
  bool strip = false;
  size_t len;
  const char *p = piece_bytes(t, id, flags, &strip, &len);
  if (buf) memcpy(buf, p, len < cap ? len : cap);
  return (int)len; /* at most max_piece, far below INT_MAX */
}

int tok_decode(const struct tok *t, const int32_t *ids, size_t n, unsigned flags, char *buf,
               size_t cap) {
  bool strip = strip_applies(t, flags);
  size_t total = 0;
  if (!buf) cap = 0;
  for (size_t i = 0; i < n; i++) {
    if (!valid_id(t, ids[i])) return KVD_EINVAL;
    size_t len;
    const char *p = piece_bytes(t, ids[i], flags, &strip, &len);
    if (total < cap) memcpy(buf + total, p, len < cap - total ? len : cap - total);
    total += len;
    if (total > INT_MAX) return KVD_E2BIG;
  }
  return (int)total;
}

/* ---- streaming ------------------------------------------------------------------------------- */

void tok_stream_init(struct tok_stream *s, const struct tok *t, unsigned flags) {
  memset(s, 0, sizeof(*s));
  s->tok = t;
  s->flags = flags;
  s->strip_pending = strip_applies(t, flags);
}

size_t tok_stream_bound(const struct tok *t) {
  /* Every input byte, held ones included, becomes at most 3 output bytes (U+FFFD). */
  return 3 * ((size_t)t->max_piece + 4);
}

/* Length of the sequence a lead byte starts, 0 if it cannot start one. */
static uint8_t lead_len(uint8_t b) {
  if (b >= 0xC2 && b <= 0xDF) return 2;
  if (b >= 0xE0 && b <= 0xEF) return 3;
  if (b >= 0xF0 && b <= 0xF4) return 4;
  return 0;
}

static size_t push_byte(struct tok_stream *s, uint8_t b, char *out) {
  if (s->npend == 0) {
    if (b < 0x80) {
      out[0] = (char)b;
      return 1;
    }
    uint8_t l = lead_len(b);
    if (l == 0) {
      memcpy(out, REPLACEMENT, 3);
      return 3;
    }
    s->pend[0] = b;
    s->npend = 1;
    s->need = (uint8_t)(l - 1);
    return 0;
  }
  uint8_t lo = 0x80, hi = 0xBF;
  if (s->npend == 1) {
    /* The second byte's range depends on the lead: this excludes overlongs, surrogates and
     * code points past U+10FFFF. */
    switch (s->pend[0]) {
    case 0xE0:
      lo = 0xA0;
      break;
    case 0xED:
      hi = 0x9F;
      break;
    case 0xF0:
      lo = 0x90;
      break;
    case 0xF4:
      hi = 0x8F;
      break;
    default:
      break;
    }
  }
  if (b >= lo && b <= hi) {
    s->pend[s->npend++] = b;
    if (--s->need > 0) return 0;
    size_t n = s->npend;
    memcpy(out, s->pend, n);
    s->npend = 0;
    return n;
  }
  s->npend = 0;
  s->need = 0;
  memcpy(out, REPLACEMENT, 3);
  return 3 + push_byte(s, b, out + 3);
}

int tok_stream_feed(struct tok_stream *s, int32_t id, char *out, size_t cap) {
  const struct tok *t = s->tok;
  if (!valid_id(t, id)) return KVD_EINVAL;
  if (cap < tok_stream_bound(t)) return KVD_E2BIG;
  size_t len;
  const char *p = piece_bytes(t, id, s->flags, &s->strip_pending, &len);
  size_t n = 0;
  for (size_t i = 0; i < len; i++)
    n += push_byte(s, (uint8_t)p[i], out + n);
  return (int)n;
}

int tok_stream_flush(struct tok_stream *s, char *out, size_t cap) {
  if (s->npend == 0) return 0;
  if (cap < 3) return KVD_E2BIG;
  memcpy(out, REPLACEMENT, 3);
  s->npend = 0;
  s->need = 0;
  return 3;
}
