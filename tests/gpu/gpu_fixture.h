/* Shared set-up for GPU tests: one validated instance and device per test binary, created on first
 * use. A missing device skips locally and fails under CI=true (see KT_SKIP). */
#ifndef KVD_GPU_FIXTURE_H
#define KVD_GPU_FIXTURE_H

#include "gpu.h"
#include "kt.h"

struct gpu_device *fixture_device(void);
/* Validation errors seen so far in this binary; tests assert it stays 0. */
uint32_t fixture_validation_errors(void);

/* Small conveniences for kernel tests (all use the fixture device; NULL/negative on failure, with
 * gpu_error_detail() saying why). */
/* A device buffer of `bytes` holding a copy of data (contents undefined when data is NULL). */
struct gpu_buffer *fixture_upload(const void *data, size_t bytes);
/* A fresh malloc'd copy of the first `bytes` of a buffer (caller frees). */
void *fixture_download(struct gpu_buffer *buf, size_t bytes);
/* Creates the pipeline, records one dispatch over bufs[0..n) bound whole, submits and waits. */
int fixture_dispatch(const struct gpu_pipeline_desc *desc, struct gpu_buffer *const *bufs,
                     uint32_t n, const void *push, uint32_t gx, uint32_t gy, uint32_t gz);
/* Max error of got against want, relative to max(|want|, floor) elementwise. */
double fixture_rel_err(const float *got, const float *want, size_t n, double floor);

/* Fetch the device or skip the test (a failure under CI). */
#define FIXTURE_DEVICE(var)                                                                        \
  struct gpu_device *var = fixture_device();                                                       \
  if (!var) KT_SKIP("no Vulkan device: %s", gpu_error_detail())

/* Every GPU test ends with this: a validation error anywhere fails the test that caused it. */
#define FIXTURE_CHECK_VALIDATION()                                                                 \
  KT_ASSERT_MSG(fixture_validation_errors() == 0, "%u Vulkan validation errors",                   \
                fixture_validation_errors())

#endif
