#include "gpu_internal.h"

#include "kvd_error.h"

#include <ctype.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define VALIDATION_LAYER "VK_LAYER_KHRONOS_validation"

static bool instance_has_layer(const char *name) {
  uint32_t n = 0;
  if (vkEnumerateInstanceLayerProperties(&n, NULL) != VK_SUCCESS || n == 0) return false;
  VkLayerProperties *props = calloc(n, sizeof *props);
  if (!props) return false;
  bool found = false;
  if (vkEnumerateInstanceLayerProperties(&n, props) == VK_SUCCESS)
    for (uint32_t i = 0; i < n && !found; i++)
      found = strcmp(props[i].layerName, name) == 0;
  free(props);
  return found;
}

static bool instance_has_extension(const char *name) {
  uint32_t n = 0;
  if (vkEnumerateInstanceExtensionProperties(NULL, &n, NULL) != VK_SUCCESS || n == 0) return false;
  VkExtensionProperties *props = calloc(n, sizeof *props);
  if (!props) return false;
  bool found = false;
  if (vkEnumerateInstanceExtensionProperties(NULL, &n, props) == VK_SUCCESS)
    for (uint32_t i = 0; i < n && !found; i++)
      found = strcmp(props[i].extensionName, name) == 0;
  free(props);
  return found;
}

/* Validation messages arrive here, possibly on driver threads. Errors are counted so tests can
 * fail on any; every message is printed because a validation report is only useful when seen. */
static VKAPI_ATTR VkBool32 VKAPI_CALL instance_on_message(
    VkDebugUtilsMessageSeverityFlagBitsEXT severity, VkDebugUtilsMessageTypeFlagsEXT types,
    const VkDebugUtilsMessengerCallbackDataEXT *data, void *user) {
  struct gpu_instance *inst = user;
  (void)types;
  if (severity & VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT) {
    atomic_fetch_add_explicit((_Atomic uint32_t *)&inst->validation_errors, 1,
                              memory_order_relaxed);
    fprintf(stderr, "<3>kvd: vulkan validation error: %s\n", data->pMessage);
  } else if (severity & VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT) {
    fprintf(stderr, "<4>kvd: vulkan validation warning: %s\n", data->pMessage);
  }
  return VK_FALSE;
}

int gpu_instance_new(const struct gpu_instance_opts *opts, struct gpu_instance **ret) {
  struct gpu_instance *inst = calloc(1, sizeof *inst);
  if (!inst) return KVD_ENOMEM;
  int rc;

  const char *exts[4];
  uint32_t n_exts = 0;
  bool debug_utils = instance_has_extension(VK_EXT_DEBUG_UTILS_EXTENSION_NAME);
  if (debug_utils) exts[n_exts++] = VK_EXT_DEBUG_UTILS_EXTENSION_NAME;
  bool portability = instance_has_extension(VK_KHR_PORTABILITY_ENUMERATION_EXTENSION_NAME);
  if (portability) exts[n_exts++] = VK_KHR_PORTABILITY_ENUMERATION_EXTENSION_NAME;

  const char *layers[1];
  uint32_t n_layers = 0;
  if (opts && opts->validate) {
    if (!instance_has_layer(VALIDATION_LAYER)) {
      rc = gpu__fail(KVD_ENOTSUP,
                     "validation requested but %s is not installed "
                     "(Debian: vulkan-validationlayers)",
                     VALIDATION_LAYER);
      goto fail;
    }
    layers[n_layers++] = VALIDATION_LAYER;
    inst->validate = true;
  }

  VkApplicationInfo app = {
      .sType = VK_STRUCTURE_TYPE_APPLICATION_INFO,
      .pApplicationName = "kvd",
      .applicationVersion = VK_MAKE_API_VERSION(0, 0, 1, 0),
      .pEngineName = "kvd",
      .apiVersion = VK_API_VERSION_1_2,
  };
  VkDebugUtilsMessengerCreateInfoEXT dbg = {
      .sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT,
      .messageSeverity = VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT |
                         VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT,
      .messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
                     VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT,
      .pfnUserCallback = instance_on_message,
      .pUserData = inst,
  };
  VkInstanceCreateInfo ci = {
      .sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO,
      .pNext = (inst->validate && debug_utils) ? &dbg : NULL,
      .flags = portability ? VK_INSTANCE_CREATE_ENUMERATE_PORTABILITY_BIT_KHR : 0,
      .pApplicationInfo = &app,
      .enabledLayerCount = n_layers,
      .ppEnabledLayerNames = layers,
      .enabledExtensionCount = n_exts,
      .ppEnabledExtensionNames = exts,
  };
  rc = gpu__check(vkCreateInstance(&ci, NULL, &inst->instance), "vkCreateInstance");
  if (rc < 0) goto fail;

  if (debug_utils) {
    inst->set_object_name = (PFN_vkSetDebugUtilsObjectNameEXT)vkGetInstanceProcAddr(
        inst->instance, "vkSetDebugUtilsObjectNameEXT");
    if (inst->validate) {
      PFN_vkCreateDebugUtilsMessengerEXT create =
          (PFN_vkCreateDebugUtilsMessengerEXT)vkGetInstanceProcAddr(
              inst->instance, "vkCreateDebugUtilsMessengerEXT");
      inst->destroy_messenger = (PFN_vkDestroyDebugUtilsMessengerEXT)vkGetInstanceProcAddr(
          inst->instance, "vkDestroyDebugUtilsMessengerEXT");
      if (create && inst->destroy_messenger) {
        rc = gpu__check(create(inst->instance, &dbg, NULL, &inst->messenger),
                        "vkCreateDebugUtilsMessengerEXT");
        if (rc < 0) goto fail;
      }
    }
  }

  rc = gpu__check(vkEnumeratePhysicalDevices(inst->instance, &inst->n_phys, NULL),
                  "vkEnumeratePhysicalDevices");
  if (rc < 0) goto fail;
  if (inst->n_phys > 0) {
    inst->phys = calloc(inst->n_phys, sizeof *inst->phys);
    if (!inst->phys) {
      rc = KVD_ENOMEM;
      goto fail;
    }
    VkResult r = vkEnumeratePhysicalDevices(inst->instance, &inst->n_phys, inst->phys);
    rc = gpu__check(r == VK_INCOMPLETE ? VK_SUCCESS : r, "vkEnumeratePhysicalDevices");
    if (rc < 0) goto fail;
  }
  *ret = inst;
  return 0;

fail:
  gpu_instance_free(inst);
  return rc;
}

void gpu_instance_free(struct gpu_instance *inst) {
  if (!inst) return;
  if (inst->messenger) inst->destroy_messenger(inst->instance, inst->messenger, NULL);
  if (inst->instance) vkDestroyInstance(inst->instance, NULL);
  free(inst->phys);
  free(inst);
}

uint32_t gpu_instance_device_count(const struct gpu_instance *inst) {
  return inst->n_phys;
}

uint32_t gpu_instance_validation_errors(const struct gpu_instance *inst) {
  return atomic_load_explicit((_Atomic uint32_t *)&inst->validation_errors, memory_order_relaxed);
}

bool gpu_instance_validating(const struct gpu_instance *inst) {
  return inst->validate;
}

int gpu_instance_device_caps(struct gpu_instance *inst, uint32_t index, struct gpu_caps *ret) {
  if (index >= inst->n_phys)
    return gpu__fail(KVD_ENOENT, "no Vulkan device %u (%u present)", index, inst->n_phys);
  return gpu__caps_read(inst, inst->phys[index], ret);
}

static int type_rank(enum gpu_device_type t) {
  switch (t) {
  case GPU_TYPE_DISCRETE:
    return 4;
  case GPU_TYPE_INTEGRATED:
    return 3;
  case GPU_TYPE_VIRTUAL:
    return 2;
  case GPU_TYPE_CPU:
    return 1;
  default:
    return 0;
  }
}

static bool name_contains(const char *hay, const char *needle) {
  size_t n = strlen(needle);
  for (const char *p = hay; *p; p++) {
    size_t i = 0;
    while (i < n && p[i] && tolower((unsigned char)p[i]) == tolower((unsigned char)needle[i]))
      i++;
    if (i == n) return true;
  }
  return n == 0;
}

int gpu_instance_pick(struct gpu_instance *inst, const char *select, uint32_t *ret_index) {
  if (inst->n_phys == 0)
    return gpu__fail(KVD_E_NO_DEVICE, "no Vulkan device found (on a machine without a GPU, "
                                      "install mesa-vulkan-drivers for lavapipe)");
  struct gpu_caps caps;
  if (select && *select) {
    char *end;
    unsigned long idx = strtoul(select, &end, 10);
    if (*end == '\0') {
      if (idx >= inst->n_phys)
        return gpu__fail(KVD_E_NO_DEVICE, "device index %lu out of range (%u devices)", idx,
                         inst->n_phys);
      *ret_index = (uint32_t)idx;
      return 0;
    }
    for (uint32_t i = 0; i < inst->n_phys; i++) {
      int rc = gpu__caps_read(inst, inst->phys[i], &caps);
      if (rc < 0) return rc;
      if (name_contains(caps.name, select)) {
        *ret_index = i;
        return 0;
      }
    }
    return gpu__fail(KVD_E_NO_DEVICE, "no Vulkan device name contains \"%s\"", select);
  }
  int best_rank = -1;
  uint32_t best = 0;
  for (uint32_t i = 0; i < inst->n_phys; i++) {
    int rc = gpu__caps_read(inst, inst->phys[i], &caps);
    if (rc < 0) return rc;
    if (type_rank(caps.type) > best_rank) {
      best_rank = type_rank(caps.type);
      best = i;
    }
  }
  *ret_index = best;
  return 0;
}
