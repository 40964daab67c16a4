/* What every benchmark does the same way: a monotonic clock, and the device KVD_DEVICE names
 * (as kvd chooses it). Benchmarks only. */
#ifndef KVD_BENCH_UTIL_H
#define KVD_BENCH_UTIL_H

#include "gpu.h"

/* Seconds on the monotonic clock. */
double bench_now(void);

/* A Vulkan instance and the device $KVD_DEVICE selects (kvd's default choice when unset);
 * extra_shaders as gpu_device_opts (NULL for the daemon's kernels only). 0, or a negative kvd
 * code with nothing left open (gpu_error_detail() says more). */
int bench_device_open(const struct shader_spirv *(*extra_shaders)(const char *name),
                      struct gpu_instance **ret_inst, struct gpu_device **ret_dev);

#endif
