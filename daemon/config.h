/* The daemon's configuration: one options table (config.c) fills one struct at start-up, from
 * defaults, then environment variables, then command-line flags. No other module calls getenv. */
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
  /* device */
  char *device;     /* index or name substring; NULL = discrete > integrated > virtual > CPU */
  bool validate;    /* Vulkan validation layers */
  char *cache_dir;  /* pipeline cache folder */
  int log_level;    /* syslog levels: 3 err .. 7 debug */
};

/* Fills cfg; returns 0, or a negative code after printing what was wrong to stderr. */
int config_load(struct kvd_config *cfg, int argc, char **argv);
void config_destroy(struct kvd_config *cfg);
void config_print_help(FILE *out);

#endif
