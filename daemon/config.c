#include "config.h"

#include "kvd_error.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

enum opt_type { OPT_BOOL, OPT_STR, OPT_INT };

struct opt {
  const char *flag; /* long flag without the dashes */
  enum opt_type type;
  size_t offset;       /* field in struct kvd_config */
  const char *def;     /* default, as text */
  const char *env;     /* environment variable, or NULL */
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
    {"device", OPT_STR, F(device), NULL, "KVD_DEVICE",
     "Vulkan device: index or name substring (default: discrete > integrated > virtual > CPU)"},
    {"validate", OPT_BOOL, F(validate), "0", "KVD_VALIDATE", "enable Vulkan validation layers"},
    {"cache-dir", OPT_STR, F(cache_dir), NULL, NULL,
     "pipeline cache folder (default: $XDG_CACHE_HOME/kvd or ~/.cache/kvd)"},
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
      fprintf(stderr, "kvd: %s: --%s expects a number, got \"%s\"\n", src, o->flag,
              val ? val : "");
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

int config_load(struct kvd_config *cfg, int argc, char **argv) {
  memset(cfg, 0, sizeof *cfg);
  int rc = 0;
  for (size_t i = 0; i < N_OPTS && rc == 0; i++) {
    const char *env = opts[i].env ? getenv(opts[i].env) : NULL;
    if (opts[i].def) rc = opt_set(cfg, &opts[i], opts[i].def, "default");
    if (rc == 0 && env && *env) rc = opt_set(cfg, &opts[i], env, opts[i].env);
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
  if (rc == 0 && !cfg->cache_dir) {
    char buf[1024];
    const char *d = default_cache_dir(buf, sizeof buf);
    if (d) rc = opt_set(cfg, opt_find("cache-dir", 9), d, "default");
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
  fprintf(out, "usage: kvd [OPTIONS]\n\nkvd: a local LLM inference daemon on Vulkan.\n\noptions:\n");
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
