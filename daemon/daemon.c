/* Lifetimes in one place, in order: Vulkan instance and device, then the server (which owns the
 * socket, connections and models), the startup model, the loop; torn down in reverse. The
 * server sees the device only through struct srv_device: it never includes gpu.h. */
#include "daemon.h"

#include "gpu.h"
#include "kvd_error.h"
#include "log.h"
#include "sd.h"
#include "srv.h"

#include <uv.h>

static void daemon_device_memory(struct gpu_device *dev, struct srv_device_mem *ret) {
  struct gpu_mem_stats ms;
  gpu_memory_stats(dev, &ms);
  ret->reserved = ms.reserved;
  ret->allocated = ms.allocated;
}

static const char *daemon_device_type(enum gpu_device_type t) {
  static const char *const types[] = {"other", "integrated", "discrete", "virtual", "cpu"};
  return (unsigned)t < sizeof types / sizeof types[0] ? types[t] : "other";
}

/* The startup model (--model): loaded before the socket opens, so the first client finds it. */
static int daemon_load_startup_model(struct srv *s, const struct kvd_config *cfg) {
  if (!cfg->model) {
    log_info("no --model given: clients can load one with models.load (kvctl load FILE)");
    return 0;
  }
  char err[256] = "";
  struct srv_model *m;
  sdn_status("loading model");
  int rc = srv_model_load(s, cfg->model, cfg->model_name, cfg->chat_template, cfg->draft_model, &m,
                          err, sizeof err);
  if (rc < 0) log_err("cannot load %s: %s", cfg->model, err[0] ? err : kvd_strerror(rc));
  return rc;
}

int daemon_serve(const struct kvd_config *cfg) {
  struct gpu_instance *inst = NULL;
  struct gpu_device *dev = NULL;
  int rc = gpu_instance_new(&(struct gpu_instance_opts){.validate = cfg->validate}, &inst);
  if (rc < 0) {
    log_err("Vulkan instance: %s (%s)", kvd_strerror(rc), gpu_error_detail());
    return 1;
  }
  rc = gpu_device_new(
      inst, &(struct gpu_device_opts){.select = cfg->device, .cache_dir = cfg->cache_dir}, &dev);
  if (rc < 0) {
    log_err("Vulkan device: %s (%s)", kvd_strerror(rc), gpu_error_detail());
    gpu_instance_free(inst);
    return 1;
  }
  const struct gpu_caps *caps = gpu_device_caps(dev);
  log_info("device: %s (%s)", caps->name, gpu_device_type_name(caps->type));
  uint64_t local = 0;
  for (uint32_t i = 0; i < caps->n_heaps; i++)
    if (caps->heaps[i].device_local) local += caps->heaps[i].size;
  struct srv_device sd = {.dev = dev,
                          .name = caps->name,
                          .type = daemon_device_type(caps->type),
                          .memory_total = local,
                          .memory = daemon_device_memory};

  uv_loop_t loop;
  if (uv_loop_init(&loop) < 0) {
    gpu_device_free(dev);
    gpu_instance_free(inst);
    return 1;
  }
  struct srv s;
  srv_init(&s, &loop, cfg, &sd);
  rc = daemon_load_startup_model(&s, cfg);
  if (rc == 0) rc = srv_start(&s);
  if (rc < 0) srv_abort(&s);
  uv_run(&loop, UV_RUN_DEFAULT);
  srv_destroy(&s);
  if (uv_loop_close(&loop) != 0) log_warn("event loop closed with handles still open");
  gpu_device_free(dev); /* after every engine: the models went with the loop */
  gpu_instance_free(inst);
  if (rc == 0) log_info("stopped");
  return rc < 0 ? 1 : 0;
}
