/* Tokenizers built from a GGUF file's `tokenizer.*` metadata, and the detokenizer.
 *
 * Two kinds exist, picked by `tokenizer.ggml.model`:
 *   "llama" SentencePiece-style: spaces become U+2581 ("▁"), one ▁ is prepended, then adjacent
 *           pieces merge greedily by the merged piece's score; characters outside the vocabulary
 *           fall back to <0xXX> byte tokens.
 *   "gpt2"  byte-level BPE: a pre-tokenizer regex (`tokenizer.ggml.pre`: gpt-2, llama-bpe, qwen2)
 *           splits the text into words, each word's bytes are mapped to printable code points and
 *           merged by merge rank.
 *
 * A struct tok copies everything it needs out of the GGUF file, so the file may be closed after
 * tok_new(). It is immutable after creation: every function taking a `const struct tok *` may be
 * called from any number of threads at once (each call allocates its own scratch memory).
 *
 * Sizes follow snprintf: encode and decode return the full count (tokens or bytes) even when it
 * exceeds `cap`, and write only the first `cap` elements, so a caller can retry with a buffer of
 * the returned size. Negative returns are kvd error codes. */
#ifndef KVD_TOK_H
#define KVD_TOK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct gguf_file;
struct tok;

enum tok_kind {
  TOK_KIND_SPM, /* tokenizer.ggml.model = "llama" */
  TOK_KIND_BPE, /* tokenizer.ggml.model = "gpt2" */
};

/* GGUF token types (tokenizer.ggml.token_type); NORMAL when the file has none. */
enum tok_type {
  TOK_TYPE_UNDEFINED = 0,
  TOK_TYPE_NORMAL = 1,
  TOK_TYPE_UNKNOWN = 2,
  TOK_TYPE_CONTROL = 3,
  TOK_TYPE_USER_DEFINED = 4,
  TOK_TYPE_UNUSED = 5,
  TOK_TYPE_BYTE = 6,
};

/* tok_encode flags. */
enum {
  /* Add BOS/EOS as the model's tokenizer.ggml.add_bos_token/add_eos_token say (SPM adds BOS when
   * the key is absent). */
  TOK_ADD_SPECIAL = 1u << 0,
  /* Match control and user-defined tokens written in the text (`<s>`, `<|im_start|>`) as single
   * tokens, longest first. Without it they are plain text, which is what untrusted user input
   * must get. */
  TOK_PARSE_SPECIAL = 1u << 1,
};

/* tok_piece / tok_decode / tok_stream flags. */
enum {
  /* Render control tokens (BOS, EOS, <|im_end|> ...) as their text; by default they produce
   * nothing and the unknown token produces U+FFFD. */
  TOK_DECODE_SPECIAL = 1u << 0,
  /* The ids start a sequence: drop the single space that SPM's encoder prepended, from the first
   * non-control token (as SentencePiece does when decoding a whole sequence). No effect on BPE. Do
   * not pass it when decoding a continuation such as generated tokens after a prompt. */
  TOK_DECODE_STRIP_SPACE = 1u << 1,
};

/* Builds a tokenizer from f's metadata. On failure returns KVD_E_UNSUPPORTED (unknown model or
 * pre-tokenizer, named in err), KVD_E_FORMAT (missing or inconsistent keys), KVD_E_TOKENIZER or
 * KVD_ENOMEM, and writes a NUL-terminated reason to err when errlen > 0. */
int tok_new(const struct gguf_file *f, struct tok **ret, char *err, size_t errlen);
void tok_free(struct tok *t); /* NULL is a no-op */

enum tok_kind tok_kind(const struct tok *t);
uint32_t tok_vocab_size(const struct tok *t);
/* Special ids, or -1 when the model has none. */
int32_t tok_bos(const struct tok *t);
int32_t tok_eos(const struct tok *t);
int32_t tok_eot(const struct tok *t); /* end of turn (<|eot_id|>, <|im_end|> ...) */
int32_t tok_unk(const struct tok *t);
int32_t tok_pad(const struct tok *t);
bool tok_add_bos(const struct tok *t);
bool tok_add_eos(const struct tok *t);
/* True for EOS, EOT and other end-of-generation control tokens (<|eot_id|>, <|im_end|>,
 * <end_of_turn>, <|endoftext|>, <|eom_id|>): the scheduler stops a sequence on these. */
bool tok_is_eog(const struct tok *t, int32_t id);
/* The whole end-of-generation set, for a request to carry (at most TOK_MAX_EOG ids, ascending;
 * lives as long as t). Returns how many. */
#define TOK_MAX_EOG 16
uint32_t tok_eog_ids(const struct tok *t, const int32_t **ret);
/* The token's type, or TOK_TYPE_UNDEFINED for an id out of range. */
enum tok_type tok_token_type(const struct tok *t, int32_t id);
/* The token's vocabulary text (SPM keeps ▁, BPE keeps the mapped code points): NUL-terminated,
 * lives as long as t. NULL for an id out of range. */
const char *tok_token_text(const struct tok *t, int32_t id);
/* The id whose vocabulary text is exactly text[0..len), or KVD_ENOENT. */
int32_t tok_find(const struct tok *t, const char *text, size_t len);

/* Encodes text[0..len) (any bytes; invalid UTF-8 is encoded byte by byte) into at most cap ids.
 * Returns the number of ids the text encodes to (more than cap means out was too small and holds
 * only the first cap), KVD_E2BIG when that number exceeds INT_MAX, KVD_ENOMEM, or
 * KVD_E_TOKENIZER when a piece has neither a token nor a byte fallback nor an unknown token. */
int tok_encode(const struct tok *t, const char *text, size_t len, unsigned flags, int32_t *out,
               size_t cap);

/* The bytes token id decodes to (no NUL, at most cap written); returns the full length, or
 * KVD_EINVAL for an id out of range. Flags: TOK_DECODE_SPECIAL. */
int tok_piece(const struct tok *t, int32_t id, unsigned flags, char *buf, size_t cap);
/* The raw bytes a whole sequence decodes to (no NUL, at most cap written, not UTF-8 checked);
 * returns the full length, KVD_EINVAL for an id out of range, KVD_E2BIG past INT_MAX. */
int tok_decode(const struct tok *t, const int32_t *ids, size_t n, unsigned flags, char *buf,
               size_t cap);

/* Streaming detokenizer, for generated tokens arriving one by one. It emits only complete UTF-8
 * characters: the start of a multi-byte character is held back until its last byte arrives.
 * Bytes that can neither start nor continue a valid sequence become U+FFFD (one per maximal
 * invalid subpart, as Unicode recommends). For ids whose bytes are valid UTF-8, the concatenated
 * output equals tok_decode() with the same flags. Caller-owned, no resources: no destroy. */
struct tok_stream {
  const struct tok *tok;
  unsigned flags;
  bool strip_pending; /* TOK_DECODE_STRIP_SPACE not yet applied */
  uint8_t need;       /* bytes the held-back character still needs */
  uint8_t npend;
  uint8_t pend[4]; /* held-back start of a multi-byte character */
};

void tok_stream_init(struct tok_stream *s, const struct tok *t, unsigned flags);
/* The output capacity tok_stream_feed() and tok_stream_flush() need for any one call. */
size_t tok_stream_bound(const struct tok *t);
/* Feeds one id and writes the bytes now complete to out. Returns their count, KVD_EINVAL for an
 * id out of range, or KVD_E2BIG when cap < tok_stream_bound(); on error the state is unchanged. */
int tok_stream_feed(struct tok_stream *s, int32_t id, char *out, size_t cap);
/* Ends the sequence: an incomplete held-back character becomes U+FFFD. Returns the bytes written
 * (0 or 3) or KVD_E2BIG. The stream is then ready for a new sequence (the strip flag is not
 * re-armed). */
int tok_stream_flush(struct tok_stream *s, char *out, size_t cap);

#endif
