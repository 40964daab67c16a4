/* kvd: the daemon's entry point. Parses the configuration, then runs the requested mode. */
#include "config.h"
#include "gpu.h"
#include "kvd_config.h"
#include "kvd_error.h"
#include "log.h"

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
    fprintf(stderr, "kvd: --model-info arrives with the GGUF reader\n");
    status = 2;
  } else {
    fprintf(stderr, "kvd: the serving daemon is not built yet; try --list-devices, --model-info "
                    "FILE or --help\n");
    status = 2;
  }
  config_destroy(&cfg);
  return status;
}
