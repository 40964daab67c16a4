#include "gpu_internal.h"

#include "kvd_error.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char detail[512];

const char *gpu_error_detail(void) {
  return detail[0] ? detail : "no detail";
}

const char *gpu__result_name(VkResult r) {
  switch (r) {
#define R(x)                                                                                       \
  case x:                                                                                          \
    return #x;
    R(VK_SUCCESS)
    R(VK_NOT_READY)
    R(VK_TIMEOUT)
    R(VK_EVENT_SET)
    R(VK_EVENT_RESET)
    R(VK_INCOMPLETE)
    R(VK_ERROR_OUT_OF_HOST_MEMORY)
    R(VK_ERROR_OUT_OF_DEVICE_MEMORY)
    R(VK_ERROR_INITIALIZATION_FAILED)
    R(VK_ERROR_DEVICE_LOST)
    R(VK_ERROR_MEMORY_MAP_FAILED)
    R(VK_ERROR_LAYER_NOT_PRESENT)
    R(VK_ERROR_EXTENSION_NOT_PRESENT)
    R(VK_ERROR_FEATURE_NOT_PRESENT)
    R(VK_ERROR_INCOMPATIBLE_DRIVER)
    R(VK_ERROR_TOO_MANY_OBJECTS)
    R(VK_ERROR_FORMAT_NOT_SUPPORTED)
    R(VK_ERROR_FRAGMENTED_POOL)
    R(VK_ERROR_UNKNOWN)
    R(VK_ERROR_OUT_OF_POOL_MEMORY)
    R(VK_ERROR_INVALID_EXTERNAL_HANDLE)
    R(VK_ERROR_FRAGMENTATION)
    R(VK_ERROR_INVALID_OPAQUE_CAPTURE_ADDRESS)
    R(VK_PIPELINE_COMPILE_REQUIRED)
#undef R
  default:
    return "VK_RESULT_UNKNOWN";
  }
}

int gpu__check(VkResult r, const char *what) {
  if (r == VK_SUCCESS) return 0;
  snprintf(detail, sizeof detail, "%s: %s (%d)", what, gpu__result_name(r), (int)r);
  switch (r) {
  case VK_ERROR_OUT_OF_HOST_MEMORY:
    return KVD_ENOMEM;
  case VK_ERROR_OUT_OF_DEVICE_MEMORY:
  case VK_ERROR_TOO_MANY_OBJECTS:
  case VK_ERROR_FRAGMENTATION:
    return KVD_E_DEVICE_OOM;
  case VK_ERROR_DEVICE_LOST:
    return KVD_E_DEVICE_LOST;
  case VK_ERROR_INCOMPATIBLE_DRIVER:
  case VK_ERROR_INITIALIZATION_FAILED:
    return KVD_E_NO_DEVICE;
  case VK_ERROR_EXTENSION_NOT_PRESENT:
  case VK_ERROR_FEATURE_NOT_PRESENT:
  case VK_ERROR_LAYER_NOT_PRESENT:
    return KVD_ENOTSUP;
  case VK_TIMEOUT:
    return KVD_EAGAIN;
  default:
    return KVD_E_VULKAN;
  }
}

int gpu__fail(int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(detail, sizeof detail, fmt, ap);
  va_end(ap);
  return code;
}
