/* Shared set-up for GPU tests: one validated instance and device per test binary, created on first
 * use. A missing device skips locally and fails under CI=true (see KT_SKIP). */
#ifndef KVD_GPU_FIXTURE_H
#define KVD_GPU_FIXTURE_H

#include "gpu.h"
#include "kt.h"

struct gpu_device *fixture_device(void);
/* Validation errors seen so far in this binary; tests assert it stays 0. */
uint32_t fixture_validation_errors(void);

/* Fetch the device or skip the test (a failure under CI). */
#define FIXTURE_DEVICE(var)                                                                        \
  struct gpu_device *var = fixture_device();                                                       \
  if (!var) KT_SKIP("no Vulkan device: %s", gpu_error_detail())

/* Every GPU test ends with this: a validation error anywhere fails the test that caused it. */
#define FIXTURE_CHECK_VALIDATION()                                                                 \
  KT_ASSERT_MSG(fixture_validation_errors() == 0, "%u Vulkan validation errors",                  \
                fixture_validation_errors())

#endif
