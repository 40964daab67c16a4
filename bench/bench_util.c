/* Shared benchmark helpers (bench_util.h). */
#include "bench_util.h"

#include <stdlib.h>
#include <time.h>

double bench_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int bench_device_open(const struct shader_spirv *(*extra_shaders)(const char *name),
                      struct gpu_instance **ret_inst, struct gpu_device **ret_dev) {
  struct gpu_instance *inst;
  int rc = gpu_instance_new(&(struct gpu_instance_opts){0}, &inst);
  if (rc < 0) return rc;
  rc = gpu_device_new(
      inst, &(struct gpu_device_opts){.select = getenv("KVD_DEVICE"), .extra_shaders = extra_shaders},
      ret_dev);
  if (rc < 0) {
    gpu_instance_free(inst);
    return rc;
  }
  *ret_inst = inst;
  return 0;
}
