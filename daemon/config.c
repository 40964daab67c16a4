#include "config.h"

#include "kvd_error.h"

#include <ini.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum opt_type { OPT_BOOL, OPT_STR, OPT_INT };

struct opt {
  const char *flag; /* long flag without the dashes */
  enum opt_type type;
  size_t offset;   /* field in struct kvd_config */
  const char *def; /* default, as text */
  const char *env; /* environment variable, or NULL */
  const char *help;
};

#define F(field) offsetof(struct kvd_config, field)

/* The one options table: defaults, environment, flags and --help all come from here. */
static const struct opt opts[] = {
    {"help", OPT_BOOL, F(help), "0", NULL, "print this help and exit"},
    {"version", OPT_BOOL, F(version), "0", NULL, "print the version and exit"},
    {"list-devices", OPT_BOOL, F(list_devices), "0", NULL,
     "list every Vulkan device with its capabilities and exit"},
    {"model-info", OPT_STR, F(model_info), NULL, NULL,
     "print a GGUF model's metadata, hyperparameters and tensors, then exit"},
    {"config", OPT_STR, F(config), NULL, "KVD_CONFIG",
     "config file (default: $XDG_CONFIG_HOME/kvd/kvd.conf, or /etc/kvd/kvd.conf with --system)"},
    {"system", OPT_BOOL, F(system), "0", NULL,
     "run as the system service: socket /run/kvd/kvd.sock, config /etc/kvd/kvd.conf"},
    {"socket", OPT_STR, F(socket), NULL, "KVD_SOCKET",
     "socket path (default: $XDG_RUNTIME_DIR/kvd/kvd.sock, /run/kvd/kvd.sock with --system)"},
    {"socket-group", OPT_STR, F(socket_group), NULL, NULL,
     "group allowed to connect (socket mode 0660); default: owner only (0600)"},
    {"model", OPT_STR, F(model), NULL, "KVD_MODEL", "GGUF model to load at start"},
    {"model-name", OPT_STR, F(model_name), NULL, NULL,
     "name clients use for it (default: the file name without .gguf)"},
    {"chat-template", OPT_STR, F(chat_template), NULL, NULL,
     "its chat template family, over what the file's template says (kvd --help lists them)"},
    {"draft-model", OPT_STR, F(draft_model), NULL, "KVD_DRAFT_MODEL",
     "a small GGUF with the same vocabulary that drafts tokens for --model (speculative decoding)"},
    {"speculative", OPT_STR, F(speculative), "auto", "KVD_SPECULATIVE",
     "requests' default speculation: auto (lookup, else the draft model), off, lookup or draft"},
    {"max-clients", OPT_INT, F(max_clients), "64", NULL,
     "most connections at once (the longest idle makes room for a new one)"},
    {"client-backlog", OPT_INT, F(client_backlog), "4194304", NULL,
     "bytes of unread output a client may have queued before it is dropped"},
    {"step-tokens", OPT_INT, F(step_tokens), "256", NULL,
     "tokens per engine step: long prompts are prefilled in chunks of this size"},
    {"max-seqs", OPT_INT, F(max_seqs), "32", NULL, "requests decoding at once per model"},
    {"device", OPT_STR, F(device), NULL, "KVD_DEVICE",
     "Vulkan device: index or name substring (default: discrete > integrated > virtual > CPU)"},
    {"validate", OPT_BOOL, F(validate), "0", "KVD_VALIDATE", "enable Vulkan validation layers"},
    {"check-results", OPT_BOOL, F(check_results), "0", "KVD_CHECK_RESULTS",
     "check every result sent against api.json, logging \"api drift\" (tests)"},
    {"cache-dir", OPT_STR, F(cache_dir), NULL, NULL,
     "pipeline cache folder (default: $XDG_CACHE_HOME/kvd or ~/.cache/kvd)"},
    {"kv-budget", OPT_STR, F(kv_budget), "50%", "KVD_KV_BUDGET",
     "KV cache memory: bytes (512M, 2G) or a share of free device memory (50%)"},
    {"block-size", OPT_INT, F(block_size), "16", NULL, "KV block size in tokens"},
    {"kv-type", OPT_STR, F(kv_type), "f16", "KVD_KV_TYPE",
     "how the KV cache stores keys and values: f32, f16, q8_0 (half of f16) or q4_0 (a quarter)"},
    {"overflow", OPT_STR, F(overflow), "shift", "KVD_OVERFLOW",
     "at the context's end: shift (forget old tokens), window (sinks + recent) or error"},
    {"kv-host", OPT_STR, F(kv_host), "10%", "KVD_KV_HOST",
     "host RAM per model for KV swapped out of the device: bytes (4G) or a share of RAM (10%); 0 = none"},
    {"kv-disk", OPT_STR, F(kv_disk), "2G", "KVD_KV_DISK",
     "disk per model for KV blocks of prompts seen before, kept across restarts: bytes (2G); 0 = none"},
    {"kv-disk-dir", OPT_STR, F(kv_disk_dir), NULL, NULL,
     "its folder (default: CACHE-DIR/kv, i.e. $XDG_CACHE_HOME/kvd/kv or /var/cache/kvd/kv)"},
    {"sessions-dir", OPT_STR, F(sessions_dir), NULL, NULL,
     "saved sessions folder (default: $XDG_STATE_HOME/kvd/sessions, /var/lib/kvd/sessions with --system)"},
    {"log-level", OPT_INT, F(log_level), "6", "KVD_LOG_LEVEL",
     "log verbosity as a syslog level: 3 errors .. 7 debug"},
};
#define N_OPTS (sizeof opts / sizeof opts[0])

static int opt_set(struct kvd_config *cfg, const struct opt *o, const char *val, const char *src) {
  void *field = (char *)cfg + o->offset;
  switch (o->type) {
  case OPT_BOOL:
    if (!val || !strcmp(val, "1") || !strcmp(val, "true") || !strcmp(val, "yes")) {
      *(bool *)field = true;
    } else if (!strcmp(val, "0") || !strcmp(val, "false") || !strcmp(val, "no")) {
      *(bool *)field = false;
    } else {
      fprintf(stderr, "kvd: %s: --%s expects a boolean, got \"%s\"\n", src, o->flag, val);
      return KVD_EINVAL;
    }
    return 0;
  case OPT_INT: {
    char *end;
    long v = val ? strtol(val, &end, 10) : 0;
    if (!val || *end || end == val) {
      fprintf(stderr, "kvd: %s: --%s expects a number, got \"%s\"\n", src, o->flag, val ? val : "");
      return KVD_EINVAL;
    }
    *(int *)field = (int)v;
    return 0;
  }
  case OPT_STR: {
    char **s = field;
    free(*s);
    *s = val ? strdup(val) : NULL;
    return (val && !*s) ? KVD_ENOMEM : 0;
  }
  }
  return KVD_EINVAL;
}

static const struct opt *opt_find(const char *flag, size_t len) {
  for (size_t i = 0; i < N_OPTS; i++)
    if (strlen(opts[i].flag) == len && !strncmp(opts[i].flag, flag, len)) return &opts[i];
  return NULL;
}

static const char *default_cache_dir(char *buf, size_t n) {
  const char *xdg = getenv("XDG_CACHE_HOME");
  const char *home = getenv("HOME");
  if (xdg && *xdg)
    snprintf(buf, n, "%s/kvd", xdg);
  else if (home && *home)
    snprintf(buf, n, "%s/.cache/kvd", home);
  else
    return NULL;
  return buf;
}

/* systemd's StateDirectory= (STATE_DIRECTORY) for a service, else the system path with --system,
 * else the XDG state folder. */
static const char *default_sessions_dir(bool system, char *buf, size_t n) {
  const char *sd = getenv("STATE_DIRECTORY"), *xdg = getenv("XDG_STATE_HOME");
  const char *home = getenv("HOME");
  if (sd && *sd && !strchr(sd, ':'))
    snprintf(buf, n, "%s/sessions", sd);
  else if (system)
    snprintf(buf, n, "/var/lib/kvd/sessions");
  else if (xdg && *xdg)
    snprintf(buf, n, "%s/kvd/sessions", xdg);
  else if (home && *home)
    snprintf(buf, n, "%s/.local/state/kvd/sessions", home);
  else
    return NULL;
  return buf;
}

/* inih calls this for every `key = value`; keys are the long flag names, in any section. */
static int config_ini_cb(void *user, const char *section, const char *name, const char *value) {
  (void)section;
  struct kvd_config *cfg = user;
  const struct opt *o = opt_find(name, strlen(name));
  if (!o) {
    fprintf(stderr, "kvd: config: unknown key \"%s\"\n", name);
    return 0;
  }
  return opt_set(cfg, o, value, "config file") == 0;
}

/* Flags that decide which file to read are looked at before the file itself. */
static const char *config_pre_scan(int argc, char **argv, const char *flag) {
  size_t n = strlen(flag);
  for (int a = 1; a < argc; a++) {
    if (strncmp(argv[a], "--", 2) || strncmp(argv[a] + 2, flag, n)) continue;
    if (argv[a][2 + n] == '=') return argv[a] + 3 + n;
    if (argv[a][2 + n] == '\0') return (a + 1 < argc && argv[a + 1][0] != '-') ? argv[a + 1] : "1";
  }
  return NULL;
}

int config_load(struct kvd_config *cfg, int argc, char **argv) {
  memset(cfg, 0, sizeof *cfg);
  int rc = 0;
  for (size_t i = 0; i < N_OPTS && rc == 0; i++)
    if (opts[i].def) rc = opt_set(cfg, &opts[i], opts[i].def, "default");
  /* The config file: --config / KVD_CONFIG, else the default path when it exists. */
  const char *file = config_pre_scan(argc, argv, "config");
  if (!file) file = getenv("KVD_CONFIG");
  char buf[1024];
  bool explicit_file = file != NULL;
  if (!file) {
    const char *sys = config_pre_scan(argc, argv, "system");
    const char *xdg = getenv("XDG_CONFIG_HOME"), *home = getenv("HOME");
    if (sys && strcmp(sys, "0") != 0)
      file = "/etc/kvd/kvd.conf";
    else if (xdg && *xdg)
      snprintf(buf, sizeof buf, "%s/kvd/kvd.conf", xdg), file = buf;
    else if (home && *home)
      snprintf(buf, sizeof buf, "%s/.config/kvd/kvd.conf", home), file = buf;
  }
  if (rc == 0 && file) {
    int line = ini_parse(file, config_ini_cb, cfg);
    if (line == -1 && explicit_file) {
      fprintf(stderr, "kvd: cannot read config file %s\n", file);
      rc = KVD_ENOENT;
    } else if (line > 0) {
      fprintf(stderr, "kvd: %s:%d: bad line\n", file, line);
      rc = KVD_EINVAL;
    } else if (line < -1) {
      rc = KVD_ENOMEM;
    }
  }
  for (size_t i = 0; i < N_OPTS && rc == 0; i++) {
    const char *env = opts[i].env ? getenv(opts[i].env) : NULL;
    if (env && *env) rc = opt_set(cfg, &opts[i], env, opts[i].env);
  }
  for (int a = 1; a < argc && rc == 0; a++) {
    const char *arg = argv[a];
    if (strncmp(arg, "--", 2) != 0) {
      fprintf(stderr, "kvd: unexpected argument \"%s\" (see kvd --help)\n", arg);
      rc = KVD_EINVAL;
      break;
    }
    const char *name = arg + 2, *eq = strchr(name, '=');
    size_t len = eq ? (size_t)(eq - name) : strlen(name);
    const struct opt *o = opt_find(name, len);
    if (!o) {
      fprintf(stderr, "kvd: unknown option \"%s\" (see kvd --help)\n", arg);
      rc = KVD_EINVAL;
      break;
    }
    const char *val = eq ? eq + 1 : NULL;
    if (!val && o->type != OPT_BOOL) {
      if (a + 1 >= argc) {
        fprintf(stderr, "kvd: --%s needs a value\n", o->flag);
        rc = KVD_EINVAL;
        break;
      }
      val = argv[++a];
    }
    rc = opt_set(cfg, o, val, "command line");
  }
  if (rc == 0 && !cfg->socket) {
    const char *run = getenv("XDG_RUNTIME_DIR");
    char path[1024];
    if (cfg->system || ((!run || !*run) && geteuid() == 0)) {
      snprintf(path, sizeof path, "/run/kvd/kvd.sock");
      rc = opt_set(cfg, opt_find("socket", 6), path, "default");
    } else if ((!run || !*run) && !cfg->help && !cfg->version && !cfg->list_devices &&
               !cfg->model_info) {
      /* A user's kvd must not quietly take the system path (it cannot create /run/kvd, or it
       * would serve there as if it were the service). */
      fprintf(stderr, "kvd: XDG_RUNTIME_DIR is not set, so there is no per-user socket folder: "
                      "give --socket PATH, or --system for /run/kvd/kvd.sock\n");
      rc = KVD_EINVAL;
    } else if (!run || !*run) {
      rc = 0; /* a mode that serves nothing needs no socket */
    } else {
      snprintf(path, sizeof path, "%s/kvd/kvd.sock", run);
      rc = opt_set(cfg, opt_find("socket", 6), path, "default");
    }
  }
  if (rc == 0 && (cfg->max_clients < 1 || cfg->client_backlog < 65536 || cfg->step_tokens < 1 ||
                  cfg->max_seqs < 1 || cfg->block_size < 1 || cfg->block_size > 4096)) {
    fprintf(stderr, "kvd: --max-clients, --step-tokens, --max-seqs and --block-size must be "
                    "positive (block size at most 4096), --client-backlog at least 65536\n");
    rc = KVD_EINVAL;
  }
  uint64_t b;
  double frac;
  if (rc == 0 && config_parse_budget(cfg->kv_budget, &b, &frac) < 0) {
    fprintf(stderr, "kvd: --kv-budget \"%s\": expected bytes (512M, 2G) or a share (50%%)\n",
            cfg->kv_budget);
    rc = KVD_EINVAL;
  }
  if (rc == 0 && strcmp(cfg->overflow, "shift") && strcmp(cfg->overflow, "window") &&
      strcmp(cfg->overflow, "error")) {
    fprintf(stderr, "kvd: --overflow must be shift, window or error\n");
    rc = KVD_EINVAL;
  }
  if (rc == 0 && strcmp(cfg->speculative, "auto") && strcmp(cfg->speculative, "off") &&
      strcmp(cfg->speculative, "lookup") && strcmp(cfg->speculative, "draft")) {
    fprintf(stderr, "kvd: --speculative must be auto, off, lookup or draft\n");
    rc = KVD_EINVAL;
  }
  /* The draft pairs with the startup model: alone it would have nothing to draft for. */
  if (rc == 0 && cfg->draft_model && *cfg->draft_model && !cfg->model) {
    fprintf(stderr, "kvd: --draft-model drafts for --model, and no --model was given\n");
    rc = KVD_EINVAL;
  }
  if (rc == 0 && config_parse_budget(cfg->kv_host, &b, &frac) < 0) {
    fprintf(stderr, "kvd: --kv-host \"%s\": expected bytes (4G) or a share of RAM (10%%)\n",
            cfg->kv_host);
    rc = KVD_EINVAL;
  }
  if (rc == 0 && (config_parse_budget(cfg->kv_disk, &b, &frac) < 0 || frac > 0)) {
    fprintf(stderr, "kvd: --kv-disk \"%s\": expected bytes (2G), or 0 for none\n", cfg->kv_disk);
    rc = KVD_EINVAL;
  }
  if (rc == 0 && !cfg->sessions_dir) {
    char dir[1024];
    const char *d = default_sessions_dir(cfg->system, dir, sizeof dir);
    if (d) rc = opt_set(cfg, opt_find("sessions-dir", 12), d, "default");
  }
  if (rc == 0 && !cfg->cache_dir) {
    char dir[1024];
    const char *d = default_cache_dir(dir, sizeof dir);
    if (d) rc = opt_set(cfg, opt_find("cache-dir", 9), d, "default");
  }
  if (rc == 0 && !cfg->kv_disk_dir && cfg->cache_dir) {
    char dir[1100];
    snprintf(dir, sizeof dir, "%s/kv", cfg->cache_dir);
    rc = opt_set(cfg, opt_find("kv-disk-dir", 11), dir, "default");
  }
  if (rc < 0) config_destroy(cfg);
  return rc;
}

void config_destroy(struct kvd_config *cfg) {
  for (size_t i = 0; i < N_OPTS; i++)
    if (opts[i].type == OPT_STR) {
      char **s = (char **)((char *)cfg + opts[i].offset);
      free(*s);
      *s = NULL;
    }
}

void config_print_help(FILE *out) {
  fprintf(out,
          "usage: kvd [OPTIONS]\n\nkvd: a local LLM inference daemon on Vulkan.\n\noptions:\n");
  for (size_t i = 0; i < N_OPTS; i++) {
    char left[64];
    snprintf(left, sizeof left, "--%s%s", opts[i].flag,
             opts[i].type == OPT_BOOL ? "" : (opts[i].type == OPT_INT ? " N" : " VALUE"));
    fprintf(out, "  %-22s %s", left, opts[i].help);
    if (opts[i].env) fprintf(out, " [env %s]", opts[i].env);
    if (opts[i].def && opts[i].type != OPT_BOOL) fprintf(out, " (default %s)", opts[i].def);
    fprintf(out, "\n");
  }
}

int config_parse_budget(const char *s, uint64_t *ret_bytes, double *ret_fraction) {
  if (!s || !*s) return KVD_EINVAL;
  char *end;
  double v = strtod(s, &end);
  if (end == s || v < 0) return KVD_EINVAL;
  if (*end == '%' && end[1] == '\0') {
    if (v <= 0 || v > 100) return KVD_EINVAL;
    *ret_bytes = 0;
    *ret_fraction = v / 100.0;
    return 0;
  }
  double mul = 1;
  switch (*end) {
  case 'k':
  case 'K':
    mul = 1024.0;
    end++;
    break;
  case 'm':
  case 'M':
    mul = 1024.0 * 1024;
    end++;
    break;
  case 'g':
  case 'G':
    mul = 1024.0 * 1024 * 1024;
    end++;
    break;
  case '\0':
    break;
  default:
    return KVD_EINVAL;
  }
  if (*end == 'i' || *end == 'B') end++;
  if (*end == 'B') end++;
  if (*end || v * mul < 1) return KVD_EINVAL;
  *ret_bytes = (uint64_t)(v * mul);
  *ret_fraction = 0;
  return 0;
}
