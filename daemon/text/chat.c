/* Chat template families: detection from a template's text and rendering in C.
 *
 * Rendered prompts are meant for tok_encode(TOK_ADD_SPECIAL | TOK_PARSE_SPECIAL). kvd's SPM
 * encoder, like llama.cpp's, prepends ▁ to the text's start and to text right after a special
 * token, so the strings below leave out the space a reference implementation gets from that ▁
 * (mistral "</s>[INST]" rather than "</s> [INST]"): the tokens come out as the model's reference
 * tokenizer (Meta's llama code, mistral-common) produces them. */
#include "chat.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gguf.h"
#include "kvd_error.h"

/* ---- detection ------------------------------------------------------------------------------- */

static bool contains(const char *s, size_t n, const char *needle) {
  size_t m = strlen(needle);
  if (m > n) return false;
  return memmem(s, n, needle, m) != NULL;
}

enum chat_family chat_detect_template(const char *tmpl, size_t len) {
  if (!tmpl) return CHAT_PLAIN;
  /* Most distinctive markers first: a llama-3 or ChatML template may mention [INST] in a comment
   * or a tool-use branch, never the other way round. */
  if (contains(tmpl, len, "<|start_header_id|>")) return CHAT_LLAMA3;
  /* DeepSeek's markers use fullwidth bars (U+FF5C) and U+2581; R1's answers open with <think>. */
  if (contains(tmpl, len, "<\xef\xbd\x9cUser\xef\xbd\x9c>"))
    return contains(tmpl, len, "<think>") ? CHAT_DEEPSEEK_R1 : CHAT_DEEPSEEK3;
  if (contains(tmpl, len, "<|im_sep|>")) return CHAT_PHI4;
  if (contains(tmpl, len, "<|im_start|>"))
    return contains(tmpl, len, "<think>") ? CHAT_QWEN3 : CHAT_CHATML;
  if (contains(tmpl, len, "<start_of_turn>")) return CHAT_GEMMA;
  if (contains(tmpl, len, "[SYSTEM_PROMPT]")) return CHAT_MISTRAL_V7;
  if (contains(tmpl, len, "[INST]")) {
    if (contains(tmpl, len, "<<SYS>>")) return CHAT_LLAMA2;
    /* v1 puts a space before [/INST]; v2/v3 and Tekken do not. */
    if (contains(tmpl, len, " [/INST]")) return CHAT_MISTRAL_V1;
    return CHAT_MISTRAL_V3;
  }
  /* Phi-3 also writes <|user|> but closes turns with <|end|>, which zephyr never does; Phi-4-mini
   * builds its tags from the role and puts no newline after them. */
  if (contains(tmpl, len, "<|end|>")) {
    if (contains(tmpl, len, "'<|' + message['role'] + '|>' + message['content']"))
      return CHAT_PHI4_MINI;
    if (contains(tmpl, len, "<|user|>") || contains(tmpl, len, "<|assistant|>")) return CHAT_PHI3;
  }
  if (contains(tmpl, len, "<|user|>") && contains(tmpl, len, "<|assistant|>")) return CHAT_ZEPHYR;
  return CHAT_PLAIN;
}

enum chat_family chat_detect(const struct gguf_file *f, enum chat_source *ret_source) {
  struct gguf_str s;
  enum chat_source src;
  enum chat_family fam = CHAT_PLAIN;
  if (gguf_get_str(f, "tokenizer.chat_template", &s) != 0 || s.len == 0) {
    src = CHAT_SRC_NO_TEMPLATE;
  } else {
    fam = chat_detect_template(s.ptr, s.len);
    src = fam == CHAT_PLAIN ? CHAT_SRC_UNRECOGNISED : CHAT_SRC_TEMPLATE;
  }
  if (ret_source) *ret_source = src;
  return fam;
}

static const char *const FAMILY_NAMES[CHAT_FAMILY_COUNT] = {
    [CHAT_PLAIN] = "plain",           [CHAT_LLAMA2] = "llama2",
    [CHAT_LLAMA3] = "llama3",         [CHAT_CHATML] = "chatml",
    [CHAT_MISTRAL_V1] = "mistral-v1", [CHAT_MISTRAL_V3] = "mistral-v3",
    [CHAT_MISTRAL_V7] = "mistral-v7", [CHAT_ZEPHYR] = "zephyr",
    [CHAT_GEMMA] = "gemma",           [CHAT_QWEN3] = "qwen3",
    [CHAT_PHI3] = "phi3",             [CHAT_PHI4_MINI] = "phi4-mini",
    [CHAT_PHI4] = "phi4",             [CHAT_DEEPSEEK3] = "deepseek3",
    [CHAT_DEEPSEEK_R1] = "deepseek-r1",
};

const char *chat_family_name(enum chat_family fam) {
  return (unsigned)fam < CHAT_FAMILY_COUNT ? FAMILY_NAMES[fam] : "unknown";
}

int chat_family_parse(const char *name, enum chat_family *ret) {
  for (int i = 0; i < CHAT_FAMILY_COUNT; i++) {
    if (strcmp(name, FAMILY_NAMES[i]) == 0) {
      *ret = (enum chat_family)i;
      return 0;
    }
  }
  return KVD_EINVAL;
}

const char *chat_family_list(void) {
  return "llama2, llama3, chatml, mistral-v1, mistral-v3, mistral-v7, zephyr, gemma, qwen3, "
         "phi3, phi4-mini, phi4, deepseek3, deepseek-r1, plain";
}

const char *chat_source_name(enum chat_source src) {
  switch (src) {
  case CHAT_SRC_TEMPLATE:
    return "template";
  case CHAT_SRC_NO_TEMPLATE:
    return "no chat template";
  case CHAT_SRC_UNRECOGNISED:
    return "unrecognised chat template";
  case CHAT_SRC_OVERRIDE:
    return "override";
  }
  return "unknown";
}

int chat_role_parse(const char *name, size_t len, enum chat_role *ret) {
  static const struct {
    const char *name;
    enum chat_role role;
  } roles[] = {{"system", CHAT_ROLE_SYSTEM},
               {"user", CHAT_ROLE_USER},
               {"assistant", CHAT_ROLE_ASSISTANT},
               {"model", CHAT_ROLE_ASSISTANT}};
  for (size_t i = 0; i < sizeof(roles) / sizeof(roles[0]); i++) {
    if (strlen(roles[i].name) == len && memcmp(roles[i].name, name, len) == 0) {
      *ret = roles[i].role;
      return 0;
    }
  }
  return KVD_EINVAL;
}

/* ---- output buffer --------------------------------------------------------------------------- */

/* A growing string; the first failure sticks, so rendering code appends without checking. */
struct sbuf {
  char *p;
  size_t len, cap;
  int err;
};

static void sb_add(struct sbuf *b, const char *s, size_t n) {
  if (b->err) return;
  if (n > SIZE_MAX - b->len - 1) {
    b->err = KVD_E2BIG;
    return;
  }
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n + 1)
      cap = cap > SIZE_MAX / 2 ? b->len + n + 1 : cap * 2;
    char *q = realloc(b->p, cap);
    if (!q) {
      b->err = KVD_ENOMEM;
      return;
    }
    b->p = q;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

static void sb_str(struct sbuf *b, const char *s) {
  sb_add(b, s, strlen(s));
}

/* ---- rendering ------------------------------------------------------------------------------- */

static bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* A message's content, optionally trimmed at either end (Jinja's trim / Python's strip). */
struct span {
  const char *p;
  size_t n;
};

static struct span content(const struct chat_msg *m, bool trim_start, bool trim_end) {
  struct span s = {m->content ? m->content : "", m->content ? m->len : 0};
  while (trim_start && s.n > 0 && is_space(s.p[0]))
    s.p++, s.n--;
  while (trim_end && s.n > 0 && is_space(s.p[s.n - 1]))
    s.n--;
  return s;
}

static void sb_span(struct sbuf *b, struct span s) {
  sb_add(b, s.p, s.n);
}

static const char *role_name(enum chat_role r) {
  return r == CHAT_ROLE_SYSTEM ? "system" : r == CHAT_ROLE_USER ? "user" : "assistant";
}

/* Index of the last user message, or n. */
static size_t last_user(const struct chat_msg *msgs, size_t n) {
  for (size_t i = n; i-- > 0;)
    if (msgs[i].role == CHAT_ROLE_USER) return i;
  return n;
}

/* System messages concatenated ("\n\n" between several), for families that fold them into a
 * user turn. */
static void sb_systems(struct sbuf *b, const struct chat_msg *msgs, size_t n) {
  bool first = true;
  for (size_t i = 0; i < n; i++) {
    if (msgs[i].role != CHAT_ROLE_SYSTEM) continue;
    if (!first) sb_str(b, "\n\n");
    sb_span(b, content(&msgs[i], false, false));
    first = false;
  }
}

static bool has_system(const struct chat_msg *msgs, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (msgs[i].role == CHAT_ROLE_SYSTEM) return true;
  return false;
}

/* Meta's Llama-2 chat format: each exchange is BOS "[INST] user [/INST] answer " EOS, with a
 * <<SYS>> block inside the first [INST]. User and answer are stripped; with a system block only
 * the end of the user text is (the official template strips the combined string). */
static void render_llama2(struct sbuf *b, const struct chat_msg *msgs, size_t n) {
  const struct chat_msg *sys = NULL;
  bool any = false;
  for (size_t i = 0; i < n; i++) {
    const struct chat_msg *m = &msgs[i];
    if (m->role == CHAT_ROLE_SYSTEM) {
      sys = m;
      /* A trailing system message still reaches the model, in an [INST] of its own. */
      if (i + 1 < n) continue;
    }
    if (m->role == CHAT_ROLE_ASSISTANT) {
      sb_str(b, " ");
      sb_span(b, content(m, true, true));
      sb_str(b, " </s>");
      any = true;
      continue;
    }
    sb_str(b, any ? "<s>[INST] " : "[INST] ");
    if (sys) {
      sb_str(b, "<<SYS>>\n");
      sb_span(b, content(sys, false, false));
      sb_str(b, "\n<</SYS>>\n\n");
    }
    if (m->role == CHAT_ROLE_USER) sb_span(b, content(m, !sys, true));
    sb_str(b, " [/INST]");
    sys = NULL;
    any = true;
  }
}

/* mistral-common: v1 "▁[INST]▁user▁[/INST]▁answer</s>" with the system prompt before the first
 * user message; v3 (and Tekken) "[INST]▁user[/INST]▁answer</s>" with it before the last one.
 * v7 keeps system prompts in place between [SYSTEM_PROMPT] tags. */
static void render_mistral(struct sbuf *b, enum chat_family fam, const struct chat_msg *msgs,
                           size_t n) {
  size_t sys_at = n;
  if (fam != CHAT_MISTRAL_V7 && has_system(msgs, n)) {
    if (fam == CHAT_MISTRAL_V1) {
      for (sys_at = 0; sys_at < n && msgs[sys_at].role != CHAT_ROLE_USER; sys_at++) {
      }
    } else {
      sys_at = last_user(msgs, n);
    }
  }
  const char *inst = fam == CHAT_MISTRAL_V1 ? "[INST] " : "[INST]";
  const char *end_inst = fam == CHAT_MISTRAL_V1 ? " [/INST]" : "[/INST]";
  const char *answer = fam == CHAT_MISTRAL_V1 ? " " : "";
  for (size_t i = 0; i < n; i++) {
    const struct chat_msg *m = &msgs[i];
    switch (m->role) {
    case CHAT_ROLE_SYSTEM:
      if (fam == CHAT_MISTRAL_V7) {
        sb_str(b, "[SYSTEM_PROMPT]");
        sb_span(b, content(m, false, false));
        sb_str(b, "[/SYSTEM_PROMPT]");
      }
      break;
    case CHAT_ROLE_USER:
      sb_str(b, inst);
      if (i == sys_at) {
        sb_systems(b, msgs, n);
        sb_str(b, "\n\n");
      }
      sb_span(b, content(m, false, false));
      sb_str(b, end_inst);
      break;
    case CHAT_ROLE_ASSISTANT:
      sb_str(b, answer);
      sb_span(b, content(m, false, false));
      sb_str(b, "</s>");
      break;
    }
  }
  /* System prompts with no user message to carry them still reach the model. */
  if (sys_at == n && fam != CHAT_MISTRAL_V7 && has_system(msgs, n)) {
    sb_str(b, inst);
    sb_systems(b, msgs, n);
    sb_str(b, end_inst);
  }
}

/* Gemma has no system role: system text goes before the first user message (Gemma 3's template
 * does this), and the assistant is called "model". */
static void render_gemma(struct sbuf *b, const struct chat_msg *msgs, size_t n, bool gen) {
  bool sys_pending = has_system(msgs, n);
  for (size_t i = 0; i < n; i++) {
    const struct chat_msg *m = &msgs[i];
    if (m->role == CHAT_ROLE_SYSTEM) continue;
    bool user = m->role == CHAT_ROLE_USER;
    sb_str(b, user ? "<start_of_turn>user\n" : "<start_of_turn>model\n");
    if (user && sys_pending) {
      sb_systems(b, msgs, n);
      sb_str(b, "\n\n");
      sys_pending = false;
    }
    sb_span(b, content(m, true, true));
    sb_str(b, "<end_of_turn>\n");
  }
  if (sys_pending) {
    sb_str(b, "<start_of_turn>user\n");
    sb_systems(b, msgs, n);
    sb_str(b, "<end_of_turn>\n");
  }
  if (gen) sb_str(b, "<start_of_turn>model\n");
}

/* A reasoning model's earlier answer as its template replays it: without the reasoning, i.e.
 * what follows the last </think>, leading newlines dropped. */
static struct span without_thinking(const struct chat_msg *m) {
  struct span s = content(m, false, false);
  const char *end = NULL;
  for (const char *p = s.p; (p = memmem(p, (size_t)(s.p + s.n - p), "</think>", 8)) != NULL; p += 8)
    end = p + 8;
  if (end) {
    s.n -= (size_t)(end - s.p);
    s.p = end;
    while (s.n && *s.p == '\n')
      s.p++, s.n--;
  }
  return s;
}

/* The families whose every turn is open + role + sep + content + close, and whose generation
 * prompt is open + "assistant" + sep: a row of this table each. */
struct tag_format {
  const char *open, *sep, *close;
  bool trim; /* contents trimmed at both ends (llama-3's template does) */
};
static const struct tag_format
    TAG_LLAMA3 = {"<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>", true},
    TAG_CHATML = {"<|im_start|>", "\n", "<|im_end|>\n", false},
    TAG_ZEPHYR = {"<|", "|>\n", "</s>\n", false},
    TAG_PHI3 = {"<|", "|>\n", "<|end|>\n", false}, /* Phi-3, Phi-3.5 */
    TAG_PHI4_MINI = {"<|", "|>", "<|end|>", false},  /* the same without newlines */
    TAG_PHI4 = {"<|im_start|>", "<|im_sep|>", "<|im_end|>", false};

/* strip_thinking (Qwen3): answers before the last user message are replayed without their
 * reasoning, as the template does. */
static void render_tagged(struct sbuf *b, const struct tag_format *f, const struct chat_msg *msgs,
                          size_t n, bool gen, bool strip_thinking) {
  size_t lu = last_user(msgs, n);
  for (size_t i = 0; i < n; i++) {
    sb_str(b, f->open);
    sb_str(b, role_name(msgs[i].role));
    sb_str(b, f->sep);
    bool strip = strip_thinking && msgs[i].role == CHAT_ROLE_ASSISTANT && (lu == n || i < lu);
    sb_span(b, strip ? without_thinking(&msgs[i]) : content(&msgs[i], f->trim, f->trim));
    sb_str(b, f->close);
  }
  if (gen) {
    sb_str(b, f->open);
    sb_str(b, "assistant");
    sb_str(b, f->sep);
  }
}

/* DeepSeek V3 / R1: system prompts first (after BOS), then <｜User｜> and <｜Assistant｜> turns,
 * answers closed by <｜end▁of▁sentence｜>. R1 drops earlier answers' reasoning and opens the new
 * one with <think>\n (or an empty think block with thinking off). */
#define DS_USER "<\xef\xbd\x9cUser\xef\xbd\x9c>"
#define DS_ASSISTANT "<\xef\xbd\x9c" "Assistant\xef\xbd\x9c>"
#define DS_EOS "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>"
static void render_deepseek(struct sbuf *b, const struct chat_msg *msgs, size_t n, bool gen,
                            bool r1, enum chat_thinking think) {
  bool first = true;
  for (size_t i = 0; i < n; i++) {
    if (msgs[i].role != CHAT_ROLE_SYSTEM) continue;
    if (!first) sb_str(b, "\n\n");
    sb_span(b, content(&msgs[i], false, false));
    first = false;
  }
  for (size_t i = 0; i < n; i++) {
    const struct chat_msg *m = &msgs[i];
    if (m->role == CHAT_ROLE_USER) {
      sb_str(b, DS_USER);
      sb_span(b, content(m, false, false));
    } else if (m->role == CHAT_ROLE_ASSISTANT) {
      sb_str(b, DS_ASSISTANT);
      sb_span(b, r1 ? without_thinking(m) : content(m, false, false));
      sb_str(b, DS_EOS);
    }
  }
  if (gen) {
    sb_str(b, DS_ASSISTANT);
    if (r1) sb_str(b, think == CHAT_THINK_OFF ? "<think>\n\n</think>\n\n" : "<think>\n");
  }
}

static void render_plain(struct sbuf *b, const struct chat_msg *msgs, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (i > 0) sb_str(b, "\n");
    sb_span(b, content(&msgs[i], false, false));
  }
}

int chat_render(enum chat_family fam, const struct chat_msg *msgs, size_t n,
                bool add_generation_prompt, char **ret, size_t *ret_len) {
  struct chat_opts o = {.add_generation_prompt = add_generation_prompt};
  return chat_render_opts(fam, msgs, n, &o, ret, ret_len);
}

int chat_render_opts(enum chat_family fam, const struct chat_msg *msgs, size_t n,
                     const struct chat_opts *opts, char **ret, size_t *ret_len) {
  struct chat_opts o = opts ? *opts : (struct chat_opts){.add_generation_prompt = true};
  if ((unsigned)fam >= CHAT_FAMILY_COUNT || (n > 0 && !msgs) ||
      (unsigned)o.thinking > CHAT_THINK_OFF)
    return KVD_EINVAL;
  for (size_t i = 0; i < n; i++)
    if ((unsigned)msgs[i].role > CHAT_ROLE_ASSISTANT) return KVD_EINVAL;
  struct sbuf b = {0};
  sb_add(&b, "", 0); /* an empty conversation still yields an empty string, not NULL */
  bool gen = o.add_generation_prompt;
  switch (fam) {
  case CHAT_PLAIN:
    render_plain(&b, msgs, n);
    break;
  case CHAT_LLAMA2:
    /* The prompt already ends in [/INST], which is where the answer starts. */
    render_llama2(&b, msgs, n);
    break;
  case CHAT_LLAMA3:
    render_tagged(&b, &TAG_LLAMA3, msgs, n, gen, false);
    break;
  case CHAT_CHATML:
    render_tagged(&b, &TAG_CHATML, msgs, n, gen, false);
    break;
  case CHAT_MISTRAL_V1:
  case CHAT_MISTRAL_V3:
  case CHAT_MISTRAL_V7:
    render_mistral(&b, fam, msgs, n);
    break;
  case CHAT_ZEPHYR:
    render_tagged(&b, &TAG_ZEPHYR, msgs, n, gen, false);
    break;
  case CHAT_GEMMA:
    render_gemma(&b, msgs, n, gen);
    break;
  case CHAT_QWEN3:
    /* Qwen3 is ChatML; with thinking off the answer opens with an empty think block. */
    render_tagged(&b, &TAG_CHATML, msgs, n, gen, true);
    if (gen && o.thinking == CHAT_THINK_OFF) sb_str(&b, "<think>\n\n</think>\n\n");
    break;
  case CHAT_PHI3:
  case CHAT_PHI4_MINI:
    render_tagged(&b, fam == CHAT_PHI3 ? &TAG_PHI3 : &TAG_PHI4_MINI, msgs, n, gen, false);
    break;
  case CHAT_PHI4:
    render_tagged(&b, &TAG_PHI4, msgs, n, gen, false);
    break;
  case CHAT_DEEPSEEK3:
  case CHAT_DEEPSEEK_R1:
    render_deepseek(&b, msgs, n, gen, fam == CHAT_DEEPSEEK_R1, o.thinking);
    break;
  case CHAT_FAMILY_COUNT:
    break;
  }
  if (b.err) {
    free(b.p);
    return b.err;
  }
  *ret = b.p;
  if (ret_len) *ret_len = b.len;
  return 0;
}
