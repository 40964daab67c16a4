#include "gpu_fixture.h"
#include "test_shader_registry.h"

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
  /* The test-only kernels (vec_add, f32 mat-vec/mat-mul) are not in kvd's registry. */
  struct gpu_device_opts dopts = {.select = getenv("KVD_DEVICE"),
                                  .extra_shaders = test_shader_spirv_find};
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

struct gpu_buffer *fixture_upload(const void *data, size_t bytes) {
  struct gpu_device *d = fixture_device();
  struct gpu_buffer *b;
  if (!d || gpu_buffer_new(d, bytes ? bytes : 4, GPU_MEM_DEVICE, "fixture", &b) < 0) return NULL;
  if (data && gpu_buffer_upload(d, b, 0, data, bytes) < 0) {
    gpu_buffer_free(b);
    return NULL;
  }
  return b;
}

void *fixture_download(struct gpu_buffer *buf, size_t bytes) {
  void *p = malloc(bytes ? bytes : 1);
  if (p && gpu_buffer_download(fixture_device(), buf, 0, p, bytes) < 0) {
    free(p);
    return NULL;
  }
  return p;
}

int fixture_dispatch(const struct gpu_pipeline_desc *desc, struct gpu_buffer *const *bufs,
                     uint32_t n, const void *push, uint32_t gx, uint32_t gy, uint32_t gz) {
  struct gpu_device *d = fixture_device();
  struct gpu_pipeline *pipe = NULL;
  struct gpu_cmd *cmd = NULL;
  struct gpu_binding bind[GPU_MAX_BINDINGS];
  if (n > GPU_MAX_BINDINGS) return -22;
  for (uint32_t i = 0; i < n; i++)
    bind[i] = (struct gpu_binding){bufs[i], 0, 0};
  int rc = gpu_pipeline_new(d, desc, &pipe);
  if (rc == 0) rc = gpu_cmd_new(d, &cmd);
  if (rc == 0) rc = gpu_cmd_begin(cmd);
  if (rc == 0) {
    rc = gpu_cmd_dispatch(cmd, pipe, bind, n, push, desc->push_size, gx, gy, gz, NULL);
    int rc2 = gpu_cmd_submit(cmd);
    if (rc == 0) rc = rc2;
    if (rc == 0) rc = gpu_cmd_wait(cmd);
  }
  gpu_cmd_free(cmd);
  gpu_pipeline_free(pipe);
  return rc;
}

double fixture_rel_err(const float *got, const float *want, size_t n, double floor) {
  return kt_max_rel_err(got, want, n, floor);
}
