#include "gpu_fixture.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static struct gpu_instance *inst;
static struct gpu_device *dev;
static bool tried;

static void fixture_teardown(void) {
  gpu_device_free(dev);
  gpu_instance_free(inst);
  dev = NULL;
  inst = NULL;
}

struct gpu_device *fixture_device(void) {
  if (tried) return dev;
  tried = true;
  /* Tests always validate unless explicitly told not to (KVD_VALIDATE=0, e.g. for benchmarks). */
  const char *v = getenv("KVD_VALIDATE");
  struct gpu_instance_opts io = {.validate = !(v && strcmp(v, "0") == 0)};
  if (gpu_instance_new(&io, &inst) < 0) return NULL;
  struct gpu_device_opts dopts = {.select = getenv("KVD_DEVICE")};
  if (gpu_device_new(inst, &dopts, &dev) < 0) {
    gpu_instance_free(inst);
    inst = NULL;
    return NULL;
  }
  kt_log("device: %s (validation %s)", gpu_device_caps(dev)->name, io.validate ? "on" : "off");
  atexit(fixture_teardown);
  return dev;
}

uint32_t fixture_validation_errors(void) {
  return inst ? gpu_instance_validation_errors(inst) : 0;
}
