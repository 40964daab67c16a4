/* The daemon's configuration: one options table (config.c) fills one struct at start-up, from
 * defaults, then the config file (INI, parsed by inih), then environment variables, then
 * command-line flags. No other module calls getenv. */
#ifndef KVD_CONFIG_H
#define KVD_CONFIG_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

struct kvd_config {
  /* modes */
  bool help;
  bool version;
  bool list_devices;
  char *model_info; /* print a GGUF file's metadata, tensors and hyperparameters, then exit */
  /* serving */
  char *config;       /* config file read (NULL: the default paths, when present) */
  bool system;        /* system service: /run/kvd/kvd.sock, /etc/kvd/kvd.conf */
  char *socket;       /* socket path */
  char *socket_group; /* group allowed to connect (mode 0660), else 0600 */
  char *model;        /* model to load at start */
  char *model_name;   /* its name for clients (default: file name without .gguf) */
  char *chat_template; /* its chat template family (chat_family_parse), over the file's */
  char *draft_model;   /* a GGUF drafting for that model (speculative decoding), or NULL */
  char *speculative;   /* requests' default: "auto" (the default), "off", "lookup" or "draft" */
  int max_clients;
  int client_backlog; /* bytes of unread output before a client is dropped */
  int step_tokens; /* tokens per engine step (chunked prefill budget) */
  int max_seqs;    /* requests decoding at once */
  /* device and memory */
  char *device;    /* index or name substring; NULL = discrete > integrated > virtual > CPU */
  bool validate;   /* Vulkan validation layers */
  bool check_results; /* decode every reply again and check it against api.json (tests) */
  char *cache_dir; /* pipeline cache folder */
  char *kv_budget; /* KV cache bytes ("512M", "2G") or a share of free memory ("50%") */
  int block_size;  /* KV block size in tokens */
  char *kv_type;   /* KV storage type name (kv_format.h), "f16" by default */
  char *overflow;  /* past the context: "shift" (default), "window" or "error" (kv.h) */
  char *kv_host;   /* host-RAM tier per model: bytes or a share of RAM ("10%"); "0" = none */
  char *sessions_dir; /* where session.save writes (default under XDG_STATE_HOME) */
  char *kv_disk;      /* the prefix cache's disk tier per model, bytes ("2G"); "0" = none */
  char *kv_disk_dir;  /* its folder (default: <cache-dir>/kv) */
  int log_level;   /* syslog levels: 3 err .. 7 debug */
};

/* Fills cfg; returns 0, or a negative code after printing what was wrong to stderr. */
int config_load(struct kvd_config *cfg, int argc, char **argv);
void config_destroy(struct kvd_config *cfg);
void config_print_help(FILE *out);
/* "512M" -> bytes, "40%" -> *ret_fraction = 0.4 (and *ret_bytes = 0). KVD_EINVAL if malformed. */
int config_parse_budget(const char *s, uint64_t *ret_bytes, double *ret_fraction);

#endif
