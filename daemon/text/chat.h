/* Chat templates: a list of {role, content} messages -> one prompt string.
 *
 * kvd does not run Jinja. A model's `tokenizer.chat_template` is recognised by substrings that
 * only one family's template contains, and the family's format is then written in C. A model with
 * no template, or one that matches no family, falls back to plain completion (CHAT_PLAIN: the
 * contents joined by "\n"), and chat_detect says why so the caller can log it.
 *
 * The rendered text is the family's official format without the leading BOS token: encode it with
 * TOK_ADD_SPECIAL (which adds BOS where the model wants one) and TOK_PARSE_SPECIAL (so
 * <|im_start|>, </s> ... become their tokens). Where a reference implementation gets a space from
 * SentencePiece's ▁ prefix, the text leaves that space out because kvd's SPM encoder prepends ▁ at
 * the start and after each special token (mistral: "</s>[INST]", not "</s> [INST]"). Contents are
 * copied verbatim, except where the official template trims them (llama-2 and llama-3, gemma). */
#ifndef KVD_CHAT_H
#define KVD_CHAT_H

#include <stdbool.h>
#include <stddef.h>

struct gguf_file;

enum chat_family {
  CHAT_PLAIN = 0,  /* no chat format: contents joined by "\n" */
  CHAT_LLAMA2,     /* [INST] <<SYS>>\n…\n<</SYS>>\n\n… [/INST] … </s><s>[INST] … [/INST] */
  CHAT_LLAMA3,     /* <|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|> */
  CHAT_CHATML,     /* <|im_start|>role\n…<|im_end|>\n (Qwen, many fine-tunes) */
  CHAT_MISTRAL_V1, /* [INST] … [/INST] …</s> (Mistral 7B v0.1/v0.2, Mixtral 8x7B) */
  CHAT_MISTRAL_V3, /* [INST]…[/INST]…</s> (v2/v3 and Tekken: 7B v0.3, 8x22B, Nemo) */
  CHAT_MISTRAL_V7, /* [SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]…[/INST]…</s> (Small 2501) */
  CHAT_ZEPHYR,     /* <|user|>\n…</s>\n<|assistant|>\n */
  CHAT_GEMMA,      /* <start_of_turn>user\n…<end_of_turn>\n<start_of_turn>model\n */
  CHAT_QWEN3,      /* ChatML with <think> blocks: history answers lose their reasoning, and
                      thinking can be switched off (an empty <think></think> opens the answer) */
  CHAT_PHI3,       /* <|user|>\n…<|end|>\n<|assistant|>\n (Phi-3, Phi-3.5) */
  CHAT_PHI4_MINI,  /* <|user|>…<|end|><|assistant|> (Phi-4-mini: no newlines) */
  CHAT_PHI4,       /* <|im_start|>user<|im_sep|>…<|im_end|> (Phi-4) */
  CHAT_DEEPSEEK3,  /* system<｜User｜>…<｜Assistant｜>…<｜end▁of▁sentence｜> (DeepSeek V3) */
  CHAT_DEEPSEEK_R1, /* the same, answers opening with <think>\n, history answers without their
                       reasoning (R1 and its Qwen/Llama distills) */
  CHAT_FAMILY_COUNT,
};

/* Whether a reasoning model thinks before it answers (CHAT_QWEN3, CHAT_DEEPSEEK_R1; ignored by
 * the others). */
enum chat_thinking {
  CHAT_THINK_DEFAULT, /* what the model's template does by default: think */
  CHAT_THINK_ON,
  CHAT_THINK_OFF, /* the answer opens with an empty <think></think>, as the templates do */
};

struct chat_opts {
  bool add_generation_prompt;
  enum chat_thinking thinking;
};

/* Why chat_detect chose what it chose. */
enum chat_source {
  CHAT_SRC_TEMPLATE,     /* the model's template was recognised */
  CHAT_SRC_NO_TEMPLATE,  /* the model has no tokenizer.chat_template: plain completion */
  CHAT_SRC_UNRECOGNISED, /* it has one, but no family matched: plain completion */
  CHAT_SRC_OVERRIDE,     /* the family was configured (chat_template), whatever the file says */
};

/* Every family name, comma-separated, for messages and --help. */
const char *chat_family_list(void);

enum chat_role {
  CHAT_ROLE_SYSTEM,
  CHAT_ROLE_USER,
  CHAT_ROLE_ASSISTANT,
};

struct chat_msg {
  enum chat_role role;
  const char *content; /* need not be NUL-terminated */
  size_t len;
};

/* The family a template's text belongs to, CHAT_PLAIN when none matches. */
enum chat_family chat_detect_template(const char *tmpl, size_t len);
/* The family for a model (its tokenizer.chat_template), and why (ret_source may be NULL). */
enum chat_family chat_detect(const struct gguf_file *f, enum chat_source *ret_source);

/* "llama2", "llama3", "chatml", "mistral-v1", "mistral-v3", "mistral-v7", "zephyr", "gemma",
 * "qwen3", "phi3", "phi4-mini", "phi4", "deepseek3", "deepseek-r1", "plain"; and back
 * (KVD_EINVAL for an unknown name), for a configured override. */
const char *chat_family_name(enum chat_family fam);
int chat_family_parse(const char *name, enum chat_family *ret);
const char *chat_source_name(enum chat_source src);
/* "system", "user", "assistant" (also "model", Gemma's word) -> role; KVD_EINVAL otherwise. */
int chat_role_parse(const char *name, size_t len, enum chat_role *ret);

/* Renders msgs in fam's format into a malloc'd, NUL-terminated string (*ret_len excludes the NUL;
 * free() it). add_generation_prompt appends the opening of an assistant turn so the model answers
 * next. Families without a system role (mistral, gemma) fold system messages into a user turn the
 * way their reference implementations do. Returns 0, KVD_EINVAL (bad family or role), KVD_E2BIG
 * or KVD_ENOMEM. */
int chat_render(enum chat_family fam, const struct chat_msg *msgs, size_t n,
                bool add_generation_prompt, char **ret, size_t *ret_len);
/* The same with every option (opts NULL: a generation prompt, default thinking). */
int chat_render_opts(enum chat_family fam, const struct chat_msg *msgs, size_t n,
                     const struct chat_opts *opts, char **ret, size_t *ret_len);

#endif
