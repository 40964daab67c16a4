/* Chat templates: each family renders a system+user+assistant+user conversation exactly, the
 * families are recognised from real-looking template texts, and anything else falls back to plain
 * completion and says so. */
#include "kt.h"

#include <stdlib.h>
#include <string.h>

#include "chat.h"
#include "gguf.h"
#include "gguf_write.h"
#include "kvd_error.h"
#include "tok.h"

static const struct chat_msg CONVERSATION[] = {
    {CHAT_ROLE_SYSTEM, "You are terse.", 14},
    {CHAT_ROLE_USER, "Hi there", 8},
    {CHAT_ROLE_ASSISTANT, "Hello! How can I help?", 22},
    {CHAT_ROLE_USER, "What is 2+2?", 12},
};
#define N_CONV (sizeof CONVERSATION / sizeof CONVERSATION[0])

static const struct {
  enum chat_family fam;
  const char *want;
} EXPECTED[] = {
    {CHAT_LLAMA2, "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! How can I "
                  "help? </s><s>[INST] What is 2+2? [/INST]"},
    {CHAT_LLAMA3,
     "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n"},
    {CHAT_CHATML,
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>"
     "\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\n"
     "What is 2+2?<|im_end|>\n<|im_start|>assistant\n"},
    {CHAT_MISTRAL_V1, "[INST] You are terse.\n\nHi there [/INST] Hello! How can I help?</s>"
                      "[INST] What is 2+2? [/INST]"},
    {CHAT_MISTRAL_V3, "[INST]Hi there[/INST]Hello! How can I help?</s>[INST]You are terse.\n\n"
                      "What is 2+2?[/INST]"},
    {CHAT_MISTRAL_V7, "[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT][INST]Hi there[/INST]Hello! "
                      "How can I help?</s>[INST]What is 2+2?[/INST]"},
    {CHAT_ZEPHYR, "<|system|>\nYou are terse.</s>\n<|user|>\nHi there</s>\n<|assistant|>\nHello! "
                  "How can I help?</s>\n<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n"},
    {CHAT_GEMMA, "<start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n<start_of_turn>"
                 "model\nHello! How can I help?<end_of_turn>\n<start_of_turn>user\nWhat is 2+2?"
                 "<end_of_turn>\n<start_of_turn>model\n"},
    {CHAT_QWEN3,
     "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>"
     "\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\n"
     "What is 2+2?<|im_end|>\n<|im_start|>assistant\n"},
    {CHAT_PHI3, "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n"
                "Hello! How can I help?<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"},
    {CHAT_PHI4_MINI, "<|system|>You are terse.<|end|><|user|>Hi there<|end|><|assistant|>"
                     "Hello! How can I help?<|end|><|user|>What is 2+2?<|end|><|assistant|>"},
    {CHAT_PHI4, "<|im_start|>system<|im_sep|>You are terse.<|im_end|><|im_start|>user<|im_sep|>"
                "Hi there<|im_end|><|im_start|>assistant<|im_sep|>Hello! How can I help?<|im_end|>"
                "<|im_start|>user<|im_sep|>What is 2+2?<|im_end|><|im_start|>assistant<|im_sep|>"},
    {CHAT_DEEPSEEK3, "You are terse.<\uff5cUser\uff5c>Hi there<\uff5cAssistant\uff5c>Hello! How "
                     "can I help?<\uff5c"
                     "end\u2581of\u2581sentence\uff5c><\uff5cUser\uff5c>What is 2+2?<\uff5c"
                     "Assistant\uff5c>"},
    {CHAT_DEEPSEEK_R1, "You are terse.<\uff5cUser\uff5c>Hi there<\uff5cAssistant\uff5c>Hello! How "
                       "can I help?<\uff5c"
                       "end\u2581of\u2581sentence\uff5c><\uff5cUser\uff5c>What is 2+2?<\uff5c"
                       "Assistant\uff5c><think>\n"},
    {CHAT_PLAIN, "You are terse.\nHi there\nHello! How can I help?\nWhat is 2+2?"},
};

KT_TEST(every_family_renders_exactly) {
  KT_CHECK_EQ(sizeof EXPECTED / sizeof EXPECTED[0], CHAT_FAMILY_COUNT);
  for (size_t i = 0; i < sizeof EXPECTED / sizeof EXPECTED[0]; i++) {
    char *s = NULL;
    size_t len = 0;
    KT_ASSERT_OK(chat_render(EXPECTED[i].fam, CONVERSATION, N_CONV, true, &s, &len));
    if (strcmp(s, EXPECTED[i].want) != 0)
      kt_log("%s:\n got: %s\nwant: %s", chat_family_name(EXPECTED[i].fam), s, EXPECTED[i].want);
    KT_CHECK(strcmp(s, EXPECTED[i].want) == 0);
    KT_CHECK_EQ(len, strlen(s));
    free(s);
  }
}

/* Without the generation prompt a rendering is a prefix of the one with it; families whose
 * format opens the assistant turn explicitly add something. */
KT_TEST(generation_prompt_only_appends) {
  for (int fam = 0; fam < CHAT_FAMILY_COUNT; fam++) {
    char *with = NULL, *without = NULL;
    size_t lw = 0, lo = 0;
    KT_ASSERT_OK(chat_render((enum chat_family)fam, CONVERSATION, N_CONV, true, &with, &lw));
    KT_ASSERT_OK(chat_render((enum chat_family)fam, CONVERSATION, N_CONV, false, &without, &lo));
    KT_CHECK(lo <= lw && memcmp(with, without, lo) == 0);
    bool opens_turn = fam == CHAT_LLAMA3 || fam == CHAT_CHATML || fam == CHAT_ZEPHYR ||
                      fam == CHAT_GEMMA || fam == CHAT_QWEN3 || fam == CHAT_PHI3 ||
                      fam == CHAT_PHI4_MINI || fam == CHAT_PHI4 || fam == CHAT_DEEPSEEK3 ||
                      fam == CHAT_DEEPSEEK_R1;
    KT_CHECK_EQ(lo < lw, opens_turn);
    free(with);
    free(without);
  }
  char *s = NULL;
  KT_ASSERT_OK(chat_render(CHAT_CHATML, CONVERSATION + 1, 1, false, &s, NULL));
  KT_CHECK(strcmp(s, "<|im_start|>user\nHi there<|im_end|>\n") == 0);
  free(s);
}

KT_TEST(contents_trimmed_only_where_the_format_does) {
  static const struct chat_msg msgs[] = {
      {CHAT_ROLE_USER, "  Hi there \n", 12},
      {CHAT_ROLE_ASSISTANT, " ok ", 4},
      {CHAT_ROLE_USER, "again", 5},
  };
  char *s = NULL;
  KT_ASSERT_OK(chat_render(CHAT_LLAMA2, msgs, 3, true, &s, NULL));
  KT_CHECK(strcmp(s, "[INST] Hi there [/INST] ok </s><s>[INST] again [/INST]") == 0);
  free(s);
  KT_ASSERT_OK(chat_render(CHAT_LLAMA3, msgs, 1, false, &s, NULL));
  KT_CHECK(strcmp(s, "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>") == 0);
  free(s);
  KT_ASSERT_OK(chat_render(CHAT_CHATML, msgs, 1, false, &s, NULL));
  KT_CHECK(strcmp(s, "<|im_start|>user\n  Hi there \n<|im_end|>\n") == 0);
  free(s);
  /* Contents are byte strings with a length: no NUL needed, embedded bytes kept. */
  static const struct chat_msg cut[] = {{CHAT_ROLE_USER, "abcdef", 3}};
  KT_ASSERT_OK(chat_render(CHAT_PLAIN, cut, 1, true, &s, NULL));
  KT_CHECK(strcmp(s, "abc") == 0);
  free(s);
}

KT_TEST(edge_conversations) {
  char *s = NULL;
  size_t len = 99;
  /* Nothing to render is an empty string, not an error. */
  KT_ASSERT_OK(chat_render(CHAT_LLAMA2, NULL, 0, true, &s, &len));
  KT_CHECK(s && len == 0 && s[0] == '\0');
  free(s);
  KT_ASSERT_OK(chat_render(CHAT_CHATML, NULL, 0, true, &s, &len));
  KT_CHECK(strcmp(s, "<|im_start|>assistant\n") == 0);
  free(s);
  /* A lone system prompt still reaches models that have no system role. */
  static const struct chat_msg sys[] = {{CHAT_ROLE_SYSTEM, "Be brief.", 9}};
  KT_ASSERT_OK(chat_render(CHAT_MISTRAL_V3, sys, 1, true, &s, NULL));
  KT_CHECK(strcmp(s, "[INST]Be brief.[/INST]") == 0);
  free(s);
  KT_ASSERT_OK(chat_render(CHAT_GEMMA, sys, 1, true, &s, NULL));
  KT_CHECK(strcmp(s, "<start_of_turn>user\nBe brief.<end_of_turn>\n<start_of_turn>model\n") == 0);
  free(s);
  KT_ASSERT_OK(chat_render(CHAT_LLAMA2, sys, 1, true, &s, NULL));
  KT_CHECK(strcmp(s, "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n [/INST]") == 0);
  free(s);
  /* Bad arguments. */
  KT_CHECK_EQ(chat_render(CHAT_FAMILY_COUNT, sys, 1, true, &s, NULL), KVD_EINVAL);
  struct chat_msg bad = {(enum chat_role)7, "x", 1};
  KT_CHECK_EQ(chat_render(CHAT_CHATML, &bad, 1, true, &s, NULL), KVD_EINVAL);
}

/* Template texts shaped like the ones models ship (abridged). */
static const struct {
  const char *what;
  const char *tmpl;
  enum chat_family want;
} TEMPLATES[] = {
    {"llama-2-chat",
     "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
     "system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set "
     "system_message = false %}{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 "
     "and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
     "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}"
     "{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' "
     "[/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + "
     "eos_token }}{% endif %}{% endfor %}",
     CHAT_LLAMA2},
    {"llama-3-instruct",
     "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
     "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | "
     "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% "
     "endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
     "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
     CHAT_LLAMA3},
    {"qwen2.5",
     "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- endif %}{%- for message in messages %}{{- "
     "'<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endfor "
     "%}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
     CHAT_CHATML},
    {"mistral-7b-instruct-v0.1",
     "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
     "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
     "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ ' "
     "[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' "
     "' + message['content'] + eos_token }}{% endif %}{% endfor %}",
     CHAT_MISTRAL_V1},
    {"mistral-7b-instruct-v0.3",
     "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}{%- if "
     "loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + "
     "message['content'] + '[/INST]' }}{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' "
     "}}{%- endif %}{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + "
     "eos_token}}{%- endif %}{%- endfor %}",
     CHAT_MISTRAL_V3},
    {"mistral-nemo (tekken)",
     "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}{{- '[INST]' + "
     "message['content'] + '[/INST]' }}{%- elif message['role'] == 'assistant' %}{{- "
     "message['content'] + eos_token }}{%- endif %}{%- endfor %}",
     CHAT_MISTRAL_V3},
    {"mistral-small-2501",
     "{{- bos_token }}{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}{%- for "
     "message in loop_messages %}{%- if message['role'] == 'user' %}{{- '[INST]' + "
     "message['content'] + '[/INST]' }}{%- endif %}{%- endfor %}",
     CHAT_MISTRAL_V7},
    {"zephyr-7b-beta",
     "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + "
     "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ "
     "'<|system|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' "
     "%}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last "
     "and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",
     CHAT_ZEPHYR},
    {"gemma-2",
     "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set "
     "role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + "
     "role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if "
     "add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}",
     CHAT_GEMMA},
    {"phi-3",
     "{% for message in messages %}{% if message['role'] == 'user' %}{{'<|user|>\\n' + "
     "message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
     "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}",
     CHAT_PHI3},
    {"phi-4-mini",
     "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message %}"
     "{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
     "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] "
     "+ '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}"
     "{% else %}{{ eos_token }}{% endif %}",
     CHAT_PHI4_MINI},
    {"phi-4",
     "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system"
     "<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if "
     "add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}",
     CHAT_PHI4},
    {"qwen3",
     "{%- for message in messages %}{%- if message.role == \"assistant\" %}{%- if '</think>' in "
     "content %}{%- set reasoning_content = content.split('</think>')[0] %}{%- endif %}{{- "
     "'<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content }}{%- endif %}{%- "
     "endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if "
     "enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>"
     "\\n\\n' }}{%- endif %}{%- endif %}",
     CHAT_QWEN3},
    {"deepseek-v3",
     "{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == "
     "'user' %}{{'<\uff5cUser\uff5c>' + message['content']}}{%- endif %}{%- if message['role'] == "
     "'assistant' %}{{'<\uff5cAssistant\uff5c>' + message['content'] + "
     "'<\uff5cend\u2581of\u2581sentence\uff5c>'}}{%- endif %}{%- endfor %}{% if "
     "add_generation_prompt %}{{'<\uff5cAssistant\uff5c>'}}{% endif %}",
     CHAT_DEEPSEEK3},
    {"deepseek-r1-distill-qwen",
     "{{bos_token}}{%- for message in messages %}{%- if message['role'] == 'user' %}"
     "{{'<\uff5cUser\uff5c>' + message['content']}}{%- endif %}{%- if message['role'] == "
     "'assistant' %}{% set content = message['content'] %}{% if '</think>' in content %}{% set "
     "content = content.split('</think>')[-1] %}{% endif %}{{'<\uff5cAssistant\uff5c>' + content "
     "+ '<\uff5cend\u2581of\u2581sentence\uff5c>'}}{%- endif %}{%- endfor %}{% if "
     "add_generation_prompt %}{{'<\uff5cAssistant\uff5c><think>\\n'}}{% endif %}",
     CHAT_DEEPSEEK_R1},
    {"vicuna (not supported)",
     "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + "
     "message['content'] + '\\n' }}{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token + "
     "'\\n' }}{% endif %}{% endfor %}",
     CHAT_PLAIN},
};

KT_TEST(families_detected_from_templates) {
  for (size_t i = 0; i < sizeof TEMPLATES / sizeof TEMPLATES[0]; i++) {
    enum chat_family got = chat_detect_template(TEMPLATES[i].tmpl, strlen(TEMPLATES[i].tmpl));
    if (got != TEMPLATES[i].want)
      kt_log("%s: detected %s, want %s", TEMPLATES[i].what, chat_family_name(got),
             chat_family_name(TEMPLATES[i].want));
    KT_CHECK_EQ(got, TEMPLATES[i].want);
  }
  KT_CHECK_EQ(chat_detect_template(NULL, 0), CHAT_PLAIN);
  KT_CHECK_EQ(chat_detect_template("", 0), CHAT_PLAIN);
}

/* A GGUF holding only a chat template (or nothing), opened from memory. */
static int detect_in_gguf(const char *tmpl, enum chat_family *fam, enum chat_source *src) {
  struct gguf_writer *w;
  int rc = gguf_writer_new(&w);
  if (rc < 0) return rc;
  rc = gguf_writer_add_str(w, "general.architecture", "llama");
  if (rc == 0 && tmpl) rc = gguf_writer_add_str(w, "tokenizer.chat_template", tmpl);
  void *data = NULL;
  size_t size = 0;
  if (rc == 0) rc = gguf_writer_write_mem(w, &data, &size);
  gguf_writer_free(w);
  if (rc < 0) return rc;
  struct gguf_file *f;
  struct gguf_error gerr;
  rc = gguf_open_memory(data, size, &f, &gerr);
  if (rc == 0) {
    *fam = chat_detect(f, src);
    gguf_close(f);
  }
  free(data);
  return rc;
}

KT_TEST(model_detection_reports_fallback) {
  enum chat_family fam;
  enum chat_source src;
  KT_ASSERT_OK(detect_in_gguf(TEMPLATES[2].tmpl, &fam, &src));
  KT_CHECK_EQ(fam, CHAT_CHATML);
  KT_CHECK_EQ(src, CHAT_SRC_TEMPLATE);
  KT_ASSERT_OK(detect_in_gguf(TEMPLATES[15].tmpl, &fam, &src)); /* vicuna */
  KT_CHECK_EQ(fam, CHAT_PLAIN);
  KT_CHECK_EQ(src, CHAT_SRC_UNRECOGNISED);
  KT_ASSERT_OK(detect_in_gguf(NULL, &fam, &src));
  KT_CHECK_EQ(fam, CHAT_PLAIN);
  KT_CHECK_EQ(src, CHAT_SRC_NO_TEMPLATE);
  KT_CHECK(strcmp(chat_source_name(src), "no chat template") == 0);

  /* stories260K is a completion model: no template at all. */
  const char *path = kt_shared_path("models/stories260K.gguf");
  if (!path) KT_SKIP("stories260K.gguf not found");
  struct gguf_file *f;
  struct gguf_error gerr;
  KT_ASSERT_OK(gguf_open(path, &f, &gerr));
  KT_CHECK_EQ(chat_detect(f, &src), CHAT_PLAIN);
  KT_CHECK_EQ(src, CHAT_SRC_NO_TEMPLATE);
  KT_CHECK_EQ(chat_detect(f, NULL), CHAT_PLAIN);
  gguf_close(f);
}

KT_TEST(names_round_trip) {
  for (int i = 0; i < CHAT_FAMILY_COUNT; i++) {
    enum chat_family back;
    KT_ASSERT_OK(chat_family_parse(chat_family_name((enum chat_family)i), &back));
    KT_CHECK_EQ(back, i);
  }
  enum chat_family fam;
  KT_CHECK_EQ(chat_family_parse("jinja", &fam), KVD_EINVAL);
  enum chat_role role;
  KT_ASSERT_OK(chat_role_parse("assistant", 9, &role));
  KT_CHECK_EQ(role, CHAT_ROLE_ASSISTANT);
  KT_ASSERT_OK(chat_role_parse("model", 5, &role));
  KT_CHECK_EQ(role, CHAT_ROLE_ASSISTANT);
  KT_ASSERT_OK(chat_role_parse("system!", 6, &role));
  KT_CHECK_EQ(role, CHAT_ROLE_SYSTEM);
  KT_CHECK_EQ(chat_role_parse("tool", 4, &role), KVD_EINVAL);
  KT_CHECK_EQ(chat_role_parse("user", 3, &role), KVD_EINVAL);
}

/* Rendered prompts tokenize to what the reference implementations build by hand: Meta's llama
 * code encodes each exchange separately (SentencePiece adds the ▁ prefix each time) between BOS
 * and EOS; mistral-common v1 does the same without BOS inside the history. */
static int encode_all(const struct tok *t, const char *s, unsigned flags, int32_t *out,
                      size_t cap) {
  return tok_encode(t, s, strlen(s), flags, out, cap);
}

KT_TEST(rendered_prompts_tokenize_like_the_reference) {
  const char *path = kt_shared_path("models/vocab/ggml-vocab-llama-spm.gguf");
  if (!path) KT_SKIP("llama-spm vocabulary not found");
  struct gguf_file *f;
  struct gguf_error gerr;
  struct tok *t;
  KT_ASSERT_OK(gguf_open(path, &f, &gerr));
  char err[200];
  int rc = tok_new(f, &t, err, sizeof err);
  gguf_close(f);
  KT_ASSERT_OK(rc);

  static int32_t got[512], want[512];
  for (int pass = 0; pass < 2; pass++) {
    enum chat_family fam = pass == 0 ? CHAT_LLAMA2 : CHAT_MISTRAL_V1;
    const char *first = pass == 0 ? "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] "
                                    "Hello! How can I help? "
                                  : "[INST] You are terse.\n\nHi there [/INST] Hello! How can I "
                                    "help?";
    const char *second = "[INST] What is 2+2? [/INST]";
    size_t nw = 0;
    want[nw++] = 1;
    nw += (size_t)encode_all(t, first, 0, want + nw, 512 - nw);
    want[nw++] = 2;
    if (fam == CHAT_LLAMA2) want[nw++] = 1;
    nw += (size_t)encode_all(t, second, 0, want + nw, 512 - nw);

    char *s = NULL;
    KT_ASSERT_OK(chat_render(fam, CONVERSATION, N_CONV, true, &s, NULL));
    int n = encode_all(t, s, TOK_ADD_SPECIAL | TOK_PARSE_SPECIAL, got, 512);
    free(s);
    KT_CHECK_EQ(n, (int)nw);
    KT_CHECK(n == (int)nw && memcmp(got, want, nw * sizeof(*got)) == 0);
  }
  tok_free(t);
}

/* Reasoning models: earlier answers are replayed without their <think> block, and thinking can
 * be switched off, as Qwen3's enable_thinking and R1's templates do it. */
KT_TEST(thinking_switch_and_history_reasoning) {
  static const struct chat_msg msgs[] = {
      {CHAT_ROLE_USER, "Hi", 2},
      {CHAT_ROLE_ASSISTANT, "<think>\nthey greet me\n</think>\n\nHello!", 38},
      {CHAT_ROLE_USER, "2+2?", 4},
  };
  char *s = NULL;
  struct chat_opts off = {.add_generation_prompt = true, .thinking = CHAT_THINK_OFF};
  KT_ASSERT_OK(chat_render_opts(CHAT_QWEN3, msgs, 3, &off, &s, NULL));
  KT_CHECK(strcmp(s, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                     "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n"
                     "</think>\n\n") == 0);
  free(s);
  KT_ASSERT_OK(chat_render_opts(CHAT_QWEN3, msgs, 3, NULL, &s, NULL)); /* default: thinks */
  KT_CHECK(strstr(s, "they greet me") == NULL);
  KT_CHECK(strcmp(s + strlen(s) - 22, "<|im_start|>assistant\n") == 0);
  free(s);
  KT_ASSERT_OK(chat_render_opts(CHAT_DEEPSEEK_R1, msgs, 3, &off, &s, NULL));
  KT_CHECK(strstr(s, "they greet me") == NULL);
  KT_CHECK(strcmp(s + strlen(s) - 19, "<think>\n\n</think>\n\n") == 0);
  free(s);
  /* Plain ChatML keeps whatever the answer held; a bad switch value is refused. */
  KT_ASSERT_OK(chat_render_opts(CHAT_CHATML, msgs, 3, &off, &s, NULL));
  KT_CHECK(strstr(s, "they greet me") != NULL);
  free(s);
  struct chat_opts bad = {.thinking = (enum chat_thinking)9};
  KT_CHECK_EQ(chat_render_opts(CHAT_QWEN3, msgs, 3, &bad, &s, NULL), KVD_EINVAL);
}
