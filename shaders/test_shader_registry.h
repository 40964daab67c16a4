/* The test-only kernels (the foundation vec_add, f32 mat-vec and mat-mul that tests and benchmarks
 * check the runtime with): embedded like the daemon's (shader_registry.h) but in their own
 * registry and library, kvd_test_shaders, which only tests and benchmarks link. A test device
 * finds them through gpu_device_opts.extra_shaders = test_shader_spirv_find. */
#ifndef KVD_TEST_SHADER_REGISTRY_H
#define KVD_TEST_SHADER_REGISTRY_H

#include "shader_registry.h"

extern const size_t test_shader_spirv_count;
/* NULL when no test-only variant has that name. */
const struct shader_spirv *test_shader_spirv_find(const char *name);
const struct shader_spirv *test_shader_spirv_at(size_t i);

#endif
