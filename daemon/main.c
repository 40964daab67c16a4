/* kvd: the daemon's entry point. Parses the configuration, then runs the requested mode. */
#include "arch.h"
#include "config.h"
#include "gguf.h"
#include "gpu.h"
#include "kvd_config.h"
#include "kvd_error.h"
#include "log.h"
#include "daemon.h"

#include <stdio.h>
#include <stdlib.h>

static int main_list_devices(const struct kvd_config *cfg) {
  struct gpu_instance *inst;
  int rc = gpu_instance_new(&(struct gpu_instance_opts){.validate = cfg->validate}, &inst);
  if (rc < 0) {
    log_err("cannot create a Vulkan instance: %s (%s)", kvd_strerror(rc), gpu_error_detail());
    return 1;
  }
  uint32_t n = gpu_instance_device_count(inst);
  if (n == 0) {
    log_err("no Vulkan devices found; on a machine without a GPU install mesa-vulkan-drivers "
            "(lavapipe)");
    gpu_instance_free(inst);
    return 1;
  }
  uint32_t pick = 0;
  bool picked = gpu_instance_pick(inst, cfg->device, &pick) == 0;
  for (uint32_t i = 0; i < n; i++) {
    struct gpu_caps caps;
    rc = gpu_instance_device_caps(inst, i, &caps);
    if (rc < 0) {
      log_err("device %u: cannot read capabilities: %s (%s)", i, kvd_strerror(rc),
              gpu_error_detail());
      continue;
    }
    gpu_caps_print(&caps, i, stdout);
    if (picked && i == pick) printf("  %-22s yes\n", "selected");
    printf("\n");
  }
  gpu_instance_free(inst);
  return 0;
}

/* What gguf-dump shows, then what kvd makes of it: hyperparameters, weights, tokenizer. */
static int main_model_info(const char *path) {
  struct gguf_file *f;
  struct gguf_error err = {0};
  int rc = gguf_open(path, &f, &err);
  if (rc < 0) {
    log_err("%s: %s at offset %llu: %s", path, kvd_strerror(rc), (unsigned long long)err.offset,
            err.msg);
    return 1;
  }
  gguf_print_info(f, stdout);
  struct model_error merr = {{0}};
  struct model_weights *w = NULL;
  rc = model_weights_new(f, &w, &merr);
  if (rc == 0) {
    printf("\n");
    model_print_hparams(&w->hp, stdout);
    model_print_weights(w, stdout);
  } else {
    printf("\nkvd cannot run this file: %s (%s)\n", merr.msg, kvd_strerror(rc));
  }
  struct gguf_str tk;
  if (gguf_get_str(f, "tokenizer.ggml.model", &tk) == 0)
    printf("tokenizer: %.*s\n", (int)tk.len, tk.ptr);
  model_weights_free(w);
  gguf_close(f);
  return 0;
}

int main(int argc, char **argv) {
  struct kvd_config cfg;
  if (config_load(&cfg, argc, argv) < 0) return 2;
  log_set_level(cfg.log_level);
  int status = 0;
  if (cfg.help) {
    config_print_help(stdout);
  } else if (cfg.version) {
    printf("kvd %s\n", KVD_VERSION);
  } else if (cfg.list_devices) {
    status = main_list_devices(&cfg);
  } else if (cfg.model_info) {
    status = main_model_info(cfg.model_info);
  } else {
    status = daemon_serve(&cfg);
  }
  config_destroy(&cfg);
  return status;
}
