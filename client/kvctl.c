/* kvctl: kvd's command line. Streams completions, chats, and shows and manages the daemon's
 * models; a thin program over libkvd (generation and chat live in kvctl_gen.c). */
#include "kvctl.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Largest prompt read from stdin; kvd's own limit (IPC_MAX_PROMPT_BYTES) is below it, so kvd
 * names the limit when it is crossed. */
#define MAX_STDIN_PROMPT (4u << 20)

static const char usage_text[] =
    "Usage: kvctl [OPTION]... PROMPT...      stream a completion of PROMPT (read from stdin\n"
    "                                         when no PROMPT is given and stdin is not a "
    "terminal)\n"
    "       kvctl [OPTION]... generate PROMPT the same, for a prompt that is also a command name\n"
    "       kvctl [OPTION]... chat            interactive chat in one session (/reset, /quit)\n"
    "       kvctl [OPTION]... status          the daemon's devices, memory, KV cache, requests\n"
    "       kvctl [OPTION]... models          the loaded models\n"
    "       kvctl [OPTION]... load PATH [--name NAME] [--chat-template F] [--kv-type T]\n"
    "                                         load a GGUF model\n"
    "       kvctl [OPTION]... unload NAME     unload a model\n"
    "       kvctl [OPTION]... tokenize TEXT   token ids of TEXT\n"
    "       kvctl [OPTION]... detokenize ID...  text of token ids\n"
    "       kvctl [OPTION]... sessions [rm NAME]  saved sessions; rm deletes one\n"
    "\n"
    "Options:\n"
    "  -s, --socket PATH        kvd's socket (default: $KVD_SOCKET, else\n"
    "                           $XDG_RUNTIME_DIR/kvd/kvd.sock, else /run/kvd/kvd.sock)\n"
    "  -m, --model NAME         model to use (default: the daemon's default model)\n"
    "  -n, --max-tokens N       most tokens to generate\n"
    "  -t, --temperature T      sampling temperature; 0 for greedy\n"
    "      --top-k K            keep the K most likely tokens (0: off)\n"
    "      --top-p P            nucleus sampling (1: off)\n"
    "      --min-p P            drop tokens below P times the most likely (0: off)\n"
    "      --repeat-penalty R   penalise repeated tokens (1: off)\n"
    "      --seed N             sampler seed, for repeatable output\n"
    "      --stop STR           stop before STR (repeatable)\n"
    "      --logprobs K         log-probabilities of each token and the K most likely\n"
    "                           (stderr, or in --json)\n"
    "      --overflow P         at the context's end: shift (forget old turns, the default),\n"
    "                           window (attention sinks + recent tokens) or error (stop)\n"
    "      --speculative MODE   speculative decoding: auto, off, lookup (drafts from the text\n"
    "                           itself) or draft (the model's draft model); same text, faster\n"
    "      --system TEXT        chat, and PROMPT on a chat model: system prompt\n"
    "      --session NAME       chat: resume the saved session NAME (or start it) and save it\n"
    "                           after every answer, so the conversation survives restarts\n"
    "      --raw                send PROMPT as raw text, not as a chat message (a model with a\n"
    "                           chat template gets PROMPT through it otherwise)\n"
    "      --chat-template F    load: the chat template family to use (llama3, chatml, gemma,\n"
    "                           qwen3, phi3, phi4, deepseek-r1, ...; see PROTOCOL.md)\n"
    "      --name NAME          load: name to load the model under\n"
    "      --kv-type T          load: how its KV cache stores keys and values: f32, f16,\n"
    "                           q8_0 or q4_0 (default: the daemon's --kv-type)\n"
    "  -j, --json               print one JSON object (per answer in chat) instead of text\n"
    "  -v, --verbose            token counts and speed on stderr after each answer\n"
    "  -h, --help               this help\n"
    "  -V, --version            kvctl's version\n"
    "\n"
    "Ctrl-C while text streams cancels the generation (a second one leaves at once).\n"
    "\n"
    "Exit status:\n"
    "  0  success\n"
    "  1  the request failed: kvd refused it, or the generation ended in an error\n"
    "  2  usage error\n"
    "  3  cannot connect to kvd (not running, no permission, no answer)\n"
    "  4  interrupted (Ctrl-C) or cancelled\n"
    "  5  the connection to kvd was lost during the request\n";

static int usage_error(const char *fmt, const char *arg) {
  fprintf(stderr, "kvctl: ");
  fprintf(stderr, fmt, arg);
  fprintf(stderr, "\nTry 'kvctl --help'.\n");
  return KVCTL_EUSAGE;
}

int kvctl_fail(struct kvd_client *c, int rc) {
  fprintf(stderr, "kvctl: %s\n",
          kvd_client_last_error(c)[0] ? kvd_client_last_error(c) : kvd_strerror(rc));
  return kvd_client_connected(c) ? KVCTL_EFAIL : KVCTL_ELOST;
}

/* ---- Option values ------------------------------------------------------------------------- */

static bool parse_i64(const char *s, int64_t max, int64_t *ret) {
  char *end;
  errno = 0;
  if (!s[0] || s[0] == '-') return false;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || *end || v > (unsigned long long)max) return false;
  *ret = (int64_t)v;
  return true;
}

static bool parse_f64(const char *s, double *ret) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || !s[0] || *end || !isfinite(v)) return false;
  *ret = v;
  return true;
}

enum {
  OPT_TOP_K = 256,
  OPT_TOP_P,
  OPT_MIN_P,
  OPT_REPEAT_PENALTY,
  OPT_SEED,
  OPT_STOP,
  OPT_LOGPROBS,
  OPT_SYSTEM,
  OPT_NAME,
  OPT_RAW,
  OPT_CHAT_TEMPLATE,
  OPT_KV_TYPE,
  OPT_OVERFLOW,
  OPT_SESSION,
  OPT_SPECULATIVE,
};

static const struct option long_opts[] = {
    {"socket", required_argument, NULL, 's'},
    {"model", required_argument, NULL, 'm'},
    {"max-tokens", required_argument, NULL, 'n'},
    {"temperature", required_argument, NULL, 't'},
    {"top-k", required_argument, NULL, OPT_TOP_K},
    {"top-p", required_argument, NULL, OPT_TOP_P},
    {"min-p", required_argument, NULL, OPT_MIN_P},
    {"repeat-penalty", required_argument, NULL, OPT_REPEAT_PENALTY},
    {"seed", required_argument, NULL, OPT_SEED},
    {"stop", required_argument, NULL, OPT_STOP},
    {"logprobs", required_argument, NULL, OPT_LOGPROBS},
    {"system", required_argument, NULL, OPT_SYSTEM},
    {"name", required_argument, NULL, OPT_NAME},
    {"raw", no_argument, NULL, OPT_RAW},
    {"chat-template", required_argument, NULL, OPT_CHAT_TEMPLATE},
    {"kv-type", required_argument, NULL, OPT_KV_TYPE},
    {"overflow", required_argument, NULL, OPT_OVERFLOW},
    {"session", required_argument, NULL, OPT_SESSION},
    {"speculative", required_argument, NULL, OPT_SPECULATIVE},
    {"json", no_argument, NULL, 'j'},
    {"verbose", no_argument, NULL, 'v'},
    {"help", no_argument, NULL, 'h'},
    {"version", no_argument, NULL, 'V'},
    {NULL, 0, NULL, 0},
};

/* Fills o from argv; the operands are left at argv[optind..]. -1 to go on, else an exit code. */
static int parse_options(int argc, char **argv, struct kvctl_opts *o) {
  struct kvd_gen_params *g = &o->gen;
  int64_t v;
  int opt;
  opterr = 0; /* our own messages, with the --help hint */
  while ((opt = getopt_long(argc, argv, ":s:m:n:t:jvhV", long_opts, NULL)) != -1) {
    switch (opt) {
    case 's':
      o->socket = optarg;
      break;
    case 'm':
      g->model = optarg;
      break;
    case 'n':
      if (!parse_i64(optarg, UINT32_MAX, &g->max_tokens))
        return usage_error("--max-tokens wants a count, not '%s'", optarg);
      break;
    case 't':
      if (!parse_f64(optarg, &g->temperature))
        return usage_error("--temperature wants a number, not '%s'", optarg);
      break;
    case OPT_TOP_K:
      if (!parse_i64(optarg, UINT32_MAX, &g->top_k))
        return usage_error("--top-k wants a count, not '%s'", optarg);
      break;
    case OPT_TOP_P:
      if (!parse_f64(optarg, &g->top_p))
        return usage_error("--top-p wants a number, not '%s'", optarg);
      break;
    case OPT_MIN_P:
      if (!parse_f64(optarg, &g->min_p))
        return usage_error("--min-p wants a number, not '%s'", optarg);
      break;
    case OPT_REPEAT_PENALTY:
      if (!parse_f64(optarg, &g->repeat_penalty))
        return usage_error("--repeat-penalty wants a number, not '%s'", optarg);
      break;
    case OPT_SEED:
      if (!parse_i64(optarg, INT64_MAX, &g->seed))
        return usage_error("--seed wants a non-negative integer, not '%s'", optarg);
      break;
    case OPT_STOP:
      if (g->n_stop == KVCTL_MAX_STOP) return usage_error("too many --stop strings%s", "");
      o->stop[g->n_stop++] = optarg;
      g->stop = o->stop;
      break;
    case OPT_LOGPROBS:
      if (!parse_i64(optarg, UINT32_MAX, &v))
        return usage_error("--logprobs wants a count, not '%s'", optarg);
      g->logprobs = (uint32_t)v;
      break;
    case OPT_SYSTEM:
      o->system = optarg;
      break;
    case OPT_NAME:
      o->name = optarg;
      break;
    case OPT_RAW:
      o->raw = true;
      break;
    case OPT_CHAT_TEMPLATE:
      o->chat_template = optarg;
      break;
    case OPT_KV_TYPE:
      o->kv_type = optarg;
      break;
    case OPT_SESSION:
      o->session = optarg;
      break;
    case OPT_OVERFLOW:
      if (strcmp(optarg, "shift") && strcmp(optarg, "window") && strcmp(optarg, "error")) {
        return usage_error("--overflow wants shift, window or error, not '%s'", optarg);
      }
      o->gen.overflow = optarg;
      break;
    case OPT_SPECULATIVE:
      if (strcmp(optarg, "auto") && strcmp(optarg, "off") && strcmp(optarg, "lookup") &&
          strcmp(optarg, "draft"))
        return usage_error("--speculative wants auto, off, lookup or draft, not '%s'", optarg);
      o->gen.speculative = optarg;
      break;
    case 'j':
      o->json = true;
      break;
    case 'v':
      o->verbose = true;
      break;
    case 'h':
      fputs(usage_text, stdout);
      return KVCTL_OK;
    case 'V':
      printf("kvctl %s\n", kvd_library_version());
      return KVCTL_OK;
    case ':':
      return usage_error("option '%s' needs a value", argv[optind - 1]);
    default:
      return usage_error("unknown option '%s'", argv[optind - 1]);
    }
  }
  return -1;
}

/* ---- Commands ------------------------------------------------------------------------------ */

/* 1536 MiB style sizes for people. */
static const char *human_bytes(uint64_t n, char *buf, size_t size) {
  static const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = (double)n;
  unsigned u = 0;
  while (v >= 1024 && u < 4)
    v /= 1024, u++;
  if (u == 0)
    snprintf(buf, size, "%llu B", (unsigned long long)n);
  else
    snprintf(buf, size, "%.1f %s", v, unit[u]);
  return buf;
}

/* ", draft NAME, 120 of 300 drafted tokens accepted (40%)" for model i of a status answer, from
 * its JSON (struct kvd_model_info does not carry speculation); "" when there is nothing to say. */
static const char *spec_line(const cJSON *models, size_t i, char *buf, size_t size) {
  const cJSON *spec =
      cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(models, (int)i), "speculative");
  const cJSON *name = cJSON_GetObjectItemCaseSensitive(spec, "draft_model");
  const cJSON *drafted = cJSON_GetObjectItemCaseSensitive(spec, "drafted");
  const cJSON *accepted = cJSON_GetObjectItemCaseSensitive(spec, "accepted");
  size_t n = 0;
  buf[0] = '\0';
  if (cJSON_IsString(name)) n = (size_t)snprintf(buf, size, ", draft %s", name->valuestring);
  if (n < size && cJSON_IsNumber(drafted) && cJSON_IsNumber(accepted) && drafted->valuedouble > 0)
    snprintf(buf + n, size - n, ", %.0f of %.0f drafted tokens accepted (%.0f%%)",
             accepted->valuedouble, drafted->valuedouble,
             100.0 * accepted->valuedouble / drafted->valuedouble);
  return buf;
}

static int cmd_status(struct kvd_client *c, const struct kvctl_opts *o) {
  struct kvd_server_status *s;
  int rc = kvd_status(c, &s);
  if (rc < 0) return kvctl_fail(c, rc);
  if (o->json) {
    printf("%s\n", s->json);
    kvd_server_status_free(s);
    return KVCTL_OK;
  }
  char a[32], b[32], d[32], e[32];
  uint64_t up = s->uptime_ms / 1000;
  printf("kvd %s, up %llu:%02llu:%02llu, %llu connection%s\n", s->version ? s->version : "?",
         (unsigned long long)(up / 3600), (unsigned long long)(up / 60 % 60),
         (unsigned long long)(up % 60), (unsigned long long)s->connections,
         s->connections == 1 ? "" : "s");
  for (size_t i = 0; i < s->n_devices; i++) {
    const struct kvd_device_info *dv = &s->devices[i];
    printf("device %llu: %s (%s), %s of %s used by kvd\n", (unsigned long long)dv->index,
           dv->name ? dv->name : "?", dv->type ? dv->type : "?",
           human_bytes(dv->memory_used, a, sizeof a), human_bytes(dv->memory_total, b, sizeof b));
  }
  printf("memory: host %s, device %s (weights %s, KV cache %s)\n",
         human_bytes(s->memory.host, a, sizeof a), human_bytes(s->memory.device, b, sizeof b),
         human_bytes(s->memory.weights, d, sizeof d), human_bytes(s->memory.kv, e, sizeof e));
  printf("KV cache: %llu of %llu blocks used, %llu free, %llu cached (%llu tokens per block)\n",
         (unsigned long long)s->kv.blocks_used, (unsigned long long)s->kv.blocks_total,
         (unsigned long long)s->kv.blocks_free, (unsigned long long)s->kv.blocks_cached,
         (unsigned long long)s->kv.block_tokens);
  printf("requests: %llu running, %llu queued\n", (unsigned long long)s->running,
         (unsigned long long)s->queue_depth);
  for (size_t i = 0; i < s->n_requests; i++) {
    const struct kvd_request_info *q = &s->requests[i];
    printf("  #%u %s %s: prompt %llu (%llu cached), generated %llu, %.1f tokens/s\n", q->id,
           q->model ? q->model : "?", q->state ? q->state : "?",
           (unsigned long long)q->prompt_tokens, (unsigned long long)q->cached_tokens,
           (unsigned long long)q->completion_tokens, q->tokens_per_s);
  }
  printf("models: %zu loaded\n", s->n_models);
  cJSON *all = s->json ? cJSON_Parse(s->json) : NULL;
  const cJSON *models = cJSON_GetObjectItemCaseSensitive(all, "models");
  char spec[160];
  for (size_t i = 0; i < s->n_models; i++)
    printf("  %s%s%s\n", s->models[i].name ? s->models[i].name : "?",
           s->models[i].is_default ? " (default)" : "", spec_line(models, i, spec, sizeof spec));
  cJSON_Delete(all);
  kvd_server_status_free(s);
  return KVCTL_OK;
}

static cJSON *model_json(const struct kvd_model_info *m) {
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "name", m->name ? m->name : "");
  if (m->path) cJSON_AddStringToObject(o, "path", m->path);
  if (m->arch) cJSON_AddStringToObject(o, "arch", m->arch);
  cJSON_AddNumberToObject(o, "n_ctx", (double)m->n_ctx);
  cJSON_AddNumberToObject(o, "n_vocab", (double)m->n_vocab);
  cJSON_AddNumberToObject(o, "n_params", (double)m->n_params);
  cJSON_AddNumberToObject(o, "bytes", (double)m->bytes);
  cJSON_AddBoolToObject(o, "default", m->is_default);
  if (m->chat_template) cJSON_AddStringToObject(o, "chat_template", m->chat_template);
  if (m->chat_template_warning)
    cJSON_AddStringToObject(o, "chat_template_warning", m->chat_template_warning);
  if (m->kv_type) cJSON_AddStringToObject(o, "kv_type", m->kv_type);
  if (m->kv_bytes_per_token)
    cJSON_AddNumberToObject(o, "kv_bytes_per_token", (double)m->kv_bytes_per_token);
  return o;
}

static void print_json(cJSON *o) {
  char *s = cJSON_PrintUnformatted(o);
  if (s) printf("%s\n", s);
  cJSON_free(s);
  cJSON_Delete(o);
}

static int cmd_models(struct kvd_client *c, const struct kvctl_opts *o) {
  struct kvd_model_list *l;
  int rc = kvd_models_list(c, &l);
  if (rc < 0) return kvctl_fail(c, rc);
  if (o->json) {
    cJSON *root = cJSON_CreateObject(), *a = cJSON_CreateArray();
    for (size_t i = 0; i < l->n; i++)
      cJSON_AddItemToArray(a, model_json(&l->models[i]));
    cJSON_AddItemToObject(root, "models", a);
    print_json(root);
  } else if (!l->n) {
    printf("no models loaded (kvctl load FILE.gguf)\n");
  } else {
    printf("%-24s %-8s %8s %8s %9s %10s  %s\n", "NAME", "ARCH", "CONTEXT", "VOCAB", "PARAMS",
           "SIZE", "PATH");
    for (size_t i = 0; i < l->n; i++) {
      const struct kvd_model_info *m = &l->models[i];
      char sz[32], name[64];
      snprintf(name, sizeof name, "%s%s", m->name ? m->name : "?", m->is_default ? "*" : "");
      printf("%-24s %-8s %8llu %8llu %8.1fM %10s  %s\n", name, m->arch ? m->arch : "?",
             (unsigned long long)m->n_ctx, (unsigned long long)m->n_vocab,
             (double)m->n_params / 1e6, human_bytes(m->bytes, sz, sizeof sz),
             m->path ? m->path : "");
    }
    printf("(* the default model)\n");
    for (size_t i = 0; i < l->n; i++)
      if (l->models[i].chat_template_warning)
        fprintf(stderr, "kvctl: warning: %s: %s\n", l->models[i].name ? l->models[i].name : "?",
                l->models[i].chat_template_warning);
  }
  kvd_model_list_free(l);
  return KVCTL_OK;
}

static int cmd_load(struct kvd_client *c, const struct kvctl_opts *o, const char *path) {
  /* kvd wants an absolute path; it runs on this machine, so make ours absolute. Not realpath():
   * a symlink's own name is the model's default name (second.gguf -> "second"), as the user
   * typed it. */
  char *abs = NULL;
  if (path[0] != '/') {
    char cwd[4096];
    size_t n = getcwd(cwd, sizeof cwd) ? strlen(cwd) + strlen(path) + 2 : 0;
    if (n && (abs = malloc(n))) snprintf(abs, n, "%s/%s", cwd, path);
  }
  struct kvd_model_info *m;
  struct kvd_load_opts lo = {
      .name = o->name, .chat_template = o->chat_template, .kv_type = o->kv_type};
  int rc = kvd_models_load_opts(c, abs ? abs : path, &lo, &m);
  free(abs);
  if (rc < 0) return kvctl_fail(c, rc);
  if (o->json)
    print_json(model_json(m));
  else
    printf("loaded %s (%s, context %llu, vocabulary %llu, KV %s, %llu bytes/token)\n",
           m->name ? m->name : "?", m->arch ? m->arch : "?", (unsigned long long)m->n_ctx,
           (unsigned long long)m->n_vocab, m->kv_type ? m->kv_type : "?",
           (unsigned long long)m->kv_bytes_per_token);
  kvd_model_info_free(m);
  return KVCTL_OK;
}

/* kvctl sessions: the saved sessions; kvctl sessions rm NAME deletes one. */
static int cmd_sessions(struct kvd_client *c, const struct kvctl_opts *o, char **args, int n) {
  if (n == 2 && !strcmp(args[0], "rm")) {
    int rc = kvd_session_delete(c, args[1]);
    if (rc < 0) return kvctl_fail(c, rc);
    printf("deleted session %s\n", args[1]);
    return KVCTL_OK;
  }
  if (n != 0) return usage_error("sessions takes nothing, or rm NAME%s", "");
  struct kvd_saved_list *l;
  int rc = kvd_sessions_list(c, &l);
  if (rc < 0) return kvctl_fail(c, rc);
  if (o->json) {
    cJSON *root = cJSON_CreateObject(), *a = cJSON_CreateArray();
    for (size_t i = 0; i < l->n; i++) {
      const struct kvd_saved_session *s = &l->sessions[i];
      cJSON *j = cJSON_CreateObject();
      cJSON_AddStringToObject(j, "name", s->name ? s->name : "");
      cJSON_AddStringToObject(j, "model", s->model ? s->model : "");
      cJSON_AddStringToObject(j, "kv_type", s->kv_type ? s->kv_type : "");
      cJSON_AddNumberToObject(j, "tokens", (double)s->tokens);
      cJSON_AddNumberToObject(j, "bytes", (double)s->bytes);
      cJSON_AddNumberToObject(j, "saved", (double)s->saved);
      cJSON_AddBoolToObject(j, "loadable", s->loadable);
      cJSON_AddItemToArray(a, j);
    }
    cJSON_AddItemToObject(root, "sessions", a);
    print_json(root);
  } else if (!l->n) {
    printf("no saved sessions (kvctl chat --session NAME saves one)\n");
  } else {
    printf("%-24s %-24s %-5s %8s %10s  %s\n", "NAME", "MODEL", "KV", "TOKENS", "SIZE", "SAVED");
    for (size_t i = 0; i < l->n; i++) {
      const struct kvd_saved_session *s = &l->sessions[i];
      char sz[32], when[32] = "?";
      time_t t = (time_t)s->saved;
      struct tm tm;
      if (localtime_r(&t, &tm)) strftime(when, sizeof when, "%Y-%m-%d %H:%M", &tm);
      printf("%-24s %-24s %-5s %8llu %10s  %s%s\n", s->name ? s->name : "?",
             s->model ? s->model : "?", s->kv_type ? s->kv_type : "?",
             (unsigned long long)s->tokens, human_bytes(s->bytes, sz, sizeof sz), when,
             s->loadable ? "" : "  (no loaded model can restore it)");
    }
  }
  kvd_saved_list_free(l);
  return KVCTL_OK;
}

static int cmd_unload(struct kvd_client *c, const char *name) {
  int rc = kvd_models_unload(c, name);
  if (rc < 0) return kvctl_fail(c, rc);
  printf("unloaded %s\n", name);
  return KVCTL_OK;
}

static int cmd_tokenize(struct kvd_client *c, const struct kvctl_opts *o, const char *text) {
  uint32_t *t;
  size_t n;
  int rc = kvd_tokenize(c, o->gen.model, text, KVD_TOKENIZE_ADD_SPECIAL, &t, &n);
  if (rc < 0) return kvctl_fail(c, rc);
  if (o->json) {
    cJSON *root = cJSON_CreateObject(), *a = cJSON_CreateArray();
    for (size_t i = 0; i < n; i++)
      cJSON_AddItemToArray(a, cJSON_CreateNumber(t[i]));
    cJSON_AddItemToObject(root, "tokens", a);
    print_json(root);
  } else {
    for (size_t i = 0; i < n; i++)
      printf("%s%u", i ? " " : "", t[i]);
    printf("\n");
  }
  free(t);
  return KVCTL_OK;
}

static int cmd_detokenize(struct kvd_client *c, const struct kvctl_opts *o, char **ids, int n) {
  uint32_t *t = calloc(n ? (size_t)n : 1, sizeof *t);
  if (!t) {
    fprintf(stderr, "kvctl: out of memory\n");
    return KVCTL_EFAIL;
  }
  for (int i = 0; i < n; i++) {
    int64_t v;
    if (!parse_i64(ids[i], UINT32_MAX, &v)) {
      free(t);
      return usage_error("detokenize wants token ids, not '%s'", ids[i]);
    }
    t[i] = (uint32_t)v;
  }
  char *text;
  int rc = kvd_detokenize(c, o->gen.model, t, (size_t)n, &text);
  free(t);
  if (rc < 0) return kvctl_fail(c, rc);
  if (o->json) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "text", text);
    print_json(root);
  } else {
    printf("%s\n", text);
  }
  free(text);
  return KVCTL_OK;
}

/* All of stdin as one string (the prompt); NULL on a read error. */
static char *read_stdin(void) {
  size_t len = 0, cap = 4096;
  char *buf = malloc(cap);
  while (buf) {
    if (cap - len < 2) {
      char *p = cap < MAX_STDIN_PROMPT ? realloc(buf, cap * 2) : NULL;
      if (!p) {
        fprintf(stderr, "kvctl: the prompt on stdin is over %u bytes\n", MAX_STDIN_PROMPT);
        free(buf);
        return NULL;
      }
      buf = p;
      cap *= 2;
    }
    size_t n = fread(buf + len, 1, cap - len - 1, stdin);
    len += n;
    if (n == 0) {
      if (ferror(stdin)) {
        perror("kvctl: stdin");
        free(buf);
        return NULL;
      }
      buf[len] = '\0';
      return buf;
    }
  }
  return NULL;
}

/* The operands joined by spaces: `kvctl Once upon a time` needs no quotes. */
static char *join(char **words, int n) {
  size_t len = 1;
  for (int i = 0; i < n; i++)
    len += strlen(words[i]) + 1;
  char *s = malloc(len), *p = s;
  if (!s) return NULL;
  for (int i = 0; i < n; i++)
    p += sprintf(p, "%s%s", i ? " " : "", words[i]);
  *p = '\0';
  return s;
}

enum cmd {
  CMD_GENERATE,
  CMD_CHAT,
  CMD_STATUS,
  CMD_MODELS,
  CMD_LOAD,
  CMD_UNLOAD,
  CMD_TOKENIZE,
  CMD_DETOKENIZE,
  CMD_SESSIONS
};

static const struct {
  const char *name;
  enum cmd cmd;
  int min_args, max_args; /* operands after the command name; -1: any number */
} commands[] = {
    {"generate", CMD_GENERATE, 0, -1}, {"chat", CMD_CHAT, 0, 0},
    {"status", CMD_STATUS, 0, 0},      {"models", CMD_MODELS, 0, 0},
    {"load", CMD_LOAD, 1, 1},          {"unload", CMD_UNLOAD, 1, 1},
    {"tokenize", CMD_TOKENIZE, 1, -1}, {"detokenize", CMD_DETOKENIZE, 1, -1},
    {"sessions", CMD_SESSIONS, 0, 2},
};

int main(int argc, char **argv) {
  struct kvctl_opts o = {0};
  kvd_gen_params_init(&o.gen);
  int code = parse_options(argc, argv, &o);
  if (code >= 0) return code;

  char **args = argv + optind;
  int n_args = argc - optind;
  enum cmd cmd = CMD_GENERATE;
  /* A first operand naming a command is that command; `kvctl generate status` or
   * `kvctl -- status` generates from the word. */
  bool dashdash = optind > 1 && !strcmp(argv[optind - 1], "--");
  for (size_t i = 0; n_args > 0 && !dashdash && i < sizeof commands / sizeof commands[0]; i++) {
    if (strcmp(args[0], commands[i].name)) continue;
    cmd = commands[i].cmd;
    args++, n_args--;
    if (n_args < commands[i].min_args ||
        (commands[i].max_args >= 0 && n_args > commands[i].max_args))
      return usage_error("wrong number of operands for '%s'", commands[i].name);
    break;
  }
  if (o.name && cmd != CMD_LOAD) return usage_error("--name is for %s", "load");
  if (o.chat_template && cmd != CMD_LOAD) return usage_error("--chat-template is for %s", "load");
  if (o.kv_type && cmd != CMD_LOAD) return usage_error("--kv-type is for %s", "load");
  if (o.raw && o.system && cmd == CMD_GENERATE)
    return usage_error("--system needs a chat message, not --raw%s", "");

  char *prompt = NULL;
  if (cmd == CMD_GENERATE) {
    if (n_args > 0)
      prompt = join(args, n_args);
    else if (!isatty(STDIN_FILENO))
      prompt = read_stdin();
    else
      return usage_error("no prompt given%s", "");
    if (!prompt) return KVCTL_EFAIL;
  }

  struct kvd_client *c;
  int rc = kvd_client_connect(o.socket, &c);
  if (rc < 0) {
    fprintf(stderr, "kvctl: %s\n", kvd_client_last_error(NULL));
    free(prompt);
    return KVCTL_ECONNECT;
  }
  switch (cmd) {
  case CMD_GENERATE:
    code = kvctl_generate(c, &o, prompt);
    break;
  case CMD_CHAT:
    code = kvctl_chat(c, &o);
    break;
  case CMD_STATUS:
    code = cmd_status(c, &o);
    break;
  case CMD_MODELS:
    code = cmd_models(c, &o);
    break;
  case CMD_LOAD:
    code = cmd_load(c, &o, args[0]);
    break;
  case CMD_UNLOAD:
    code = cmd_unload(c, args[0]);
    break;
  case CMD_TOKENIZE: {
    char *text = join(args, n_args);
    code = text ? cmd_tokenize(c, &o, text) : KVCTL_EFAIL;
    free(text);
    break;
  }
  case CMD_DETOKENIZE:
    code = cmd_detokenize(c, &o, args, n_args);
    break;
  case CMD_SESSIONS:
    code = cmd_sessions(c, &o, args, n_args);
    break;
  }
  free(prompt);
  kvd_client_close(c);
  return code;
}
