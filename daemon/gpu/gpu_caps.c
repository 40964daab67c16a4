#include "gpu_internal.h"

#include "kvd_error.h"

#include <stdlib.h>
#include <string.h>

bool gpu__has_extension(VkPhysicalDevice phys, const char *name) {
  uint32_t n = 0;
  if (vkEnumerateDeviceExtensionProperties(phys, NULL, &n, NULL) != VK_SUCCESS || n == 0)
    return false;
  VkExtensionProperties *props = calloc(n, sizeof *props);
  if (!props) return false;
  bool found = false;
  if (vkEnumerateDeviceExtensionProperties(phys, NULL, &n, props) == VK_SUCCESS)
    for (uint32_t i = 0; i < n && !found; i++)
      found = strcmp(props[i].extensionName, name) == 0;
  free(props);
  return found;
}

/* The first queue family with compute: kvd submits everything to one compute queue. */
static int caps_compute_family(VkPhysicalDevice phys, VkQueueFamilyProperties *ret,
                               uint32_t *ret_index) {
  uint32_t n = 0;
  vkGetPhysicalDeviceQueueFamilyProperties(phys, &n, NULL);
  VkQueueFamilyProperties *fams = calloc(n ? n : 1, sizeof *fams);
  if (!fams) return KVD_ENOMEM;
  vkGetPhysicalDeviceQueueFamilyProperties(phys, &n, fams);
  int rc = gpu__fail(KVD_E_NO_DEVICE, "device has no compute queue");
  for (uint32_t i = 0; i < n; i++) {
    if (fams[i].queueFlags & VK_QUEUE_COMPUTE_BIT) {
      *ret = fams[i];
      *ret_index = i;
      rc = 0;
      break;
    }
  }
  free(fams);
  return rc;
}

int gpu__caps_read(struct gpu_instance *inst, VkPhysicalDevice phys, struct gpu_caps *caps) {
  (void)inst;
  memset(caps, 0, sizeof *caps);
  VkPhysicalDeviceProperties base;
  vkGetPhysicalDeviceProperties(phys, &base);
  bool v12 = base.apiVersion >= VK_API_VERSION_1_2;
  bool sg_ctl = base.apiVersion >= VK_API_VERSION_1_3 ||
                gpu__has_extension(phys, VK_EXT_SUBGROUP_SIZE_CONTROL_EXTENSION_NAME);

  VkPhysicalDeviceSubgroupProperties sg = {
      .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES};
  VkPhysicalDeviceMaintenance3Properties m3 = {
      .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES, .pNext = &sg};
  VkPhysicalDeviceDriverProperties drv = {.sType =
                                              VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES};
  VkPhysicalDeviceSubgroupSizeControlPropertiesEXT sgc = {
      .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_SIZE_CONTROL_PROPERTIES_EXT};
  void *chain = &m3;
  if (v12) {
    drv.pNext = chain;
    chain = &drv;
  }
  if (sg_ctl) {
    sgc.pNext = chain;
    chain = &sgc;
  }
  VkPhysicalDeviceProperties2 props = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2,
                                       .pNext = chain};
  vkGetPhysicalDeviceProperties2(phys, &props);
  const VkPhysicalDeviceLimits *lim = &props.properties.limits;

  snprintf(caps->name, sizeof caps->name, "%s", props.properties.deviceName);
  switch (props.properties.deviceType) {
  case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU:
    caps->type = GPU_TYPE_INTEGRATED;
    break;
  case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU:
    caps->type = GPU_TYPE_DISCRETE;
    break;
  case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU:
    caps->type = GPU_TYPE_VIRTUAL;
    break;
  case VK_PHYSICAL_DEVICE_TYPE_CPU:
    caps->type = GPU_TYPE_CPU;
    break;
  default:
    caps->type = GPU_TYPE_OTHER;
  }
  caps->vendor_id = props.properties.vendorID;
  caps->device_id = props.properties.deviceID;
  caps->api_version = props.properties.apiVersion;
  caps->driver_version = props.properties.driverVersion;
  if (v12) {
    snprintf(caps->driver_name, sizeof caps->driver_name, "%s", drv.driverName);
    snprintf(caps->driver_info, sizeof caps->driver_info, "%s", drv.driverInfo);
  }

  caps->subgroup_size = sg.subgroupSize;
  caps->subgroup_ops =
      (sg.supportedStages & VK_SHADER_STAGE_COMPUTE_BIT) ? (uint32_t)sg.supportedOperations : 0;
  caps->subgroup_min = caps->subgroup_max = sg.subgroupSize;
  if (sg_ctl && sgc.minSubgroupSize) {
    caps->subgroup_min = sgc.minSubgroupSize;
    caps->subgroup_max = sgc.maxSubgroupSize;
  }

  /* Features: Vulkan 1.2 devices report them in the core structs, older ones in the KHR ones. */
  VkPhysicalDeviceVulkan11Features f11 = {
      .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES};
  VkPhysicalDeviceVulkan12Features f12 = {
      .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES, .pNext = &f11};
  VkPhysicalDevice16BitStorageFeatures s16 = {
      .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_16BIT_STORAGE_FEATURES};
  VkPhysicalDeviceFeatures2 feats = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2,
                                     .pNext = v12 ? (void *)&f12 : (void *)&s16};
  vkGetPhysicalDeviceFeatures2(phys, &feats);
  if (v12) {
    caps->fp16_arith = f12.shaderFloat16;
    caps->int8_arith = f12.shaderInt8;
    caps->storage_8bit = f12.storageBuffer8BitAccess;
    caps->storage_16bit = f11.storageBuffer16BitAccess;
  } else {
    caps->storage_16bit = s16.storageBuffer16BitAccess;
  }
  caps->int_dot_product = gpu__has_extension(phys, "VK_KHR_shader_integer_dot_product");
  caps->coop_matrix = gpu__has_extension(phys, "VK_KHR_cooperative_matrix");
  caps->push_descriptor = gpu__has_extension(phys, VK_KHR_PUSH_DESCRIPTOR_EXTENSION_NAME);
  caps->memory_budget = gpu__has_extension(phys, VK_EXT_MEMORY_BUDGET_EXTENSION_NAME);
  caps->debug_utils = inst->set_object_name != NULL;

  for (int i = 0; i < 3; i++) {
    caps->max_wg_size[i] = lim->maxComputeWorkGroupSize[i];
    caps->max_wg_count[i] = lim->maxComputeWorkGroupCount[i];
  }
  caps->max_wg_invocations = lim->maxComputeWorkGroupInvocations;
  caps->max_shared_bytes = lim->maxComputeSharedMemorySize;
  caps->max_push_bytes = lim->maxPushConstantsSize;
  caps->max_storage_range = lim->maxStorageBufferRange;
  caps->max_alloc_size = m3.maxMemoryAllocationSize;
  caps->min_storage_align = lim->minStorageBufferOffsetAlignment;
  caps->max_alloc_count = lim->maxMemoryAllocationCount;
  caps->timestamp_period = lim->timestampPeriod;

  VkQueueFamilyProperties fam = {0};
  uint32_t fam_index = 0;
  int rc = caps_compute_family(phys, &fam, &fam_index);
  if (rc < 0) return rc;
  caps->timestamps = fam.timestampValidBits > 0 && lim->timestampPeriod > 0;

  VkPhysicalDeviceMemoryBudgetPropertiesEXT budget = {
      .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MEMORY_BUDGET_PROPERTIES_EXT};
  VkPhysicalDeviceMemoryProperties2 mem = {
      .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MEMORY_PROPERTIES_2,
      .pNext = caps->memory_budget ? &budget : NULL};
  vkGetPhysicalDeviceMemoryProperties2(phys, &mem);
  caps->n_heaps = mem.memoryProperties.memoryHeapCount;
  if (caps->n_heaps > GPU_MAX_HEAPS) caps->n_heaps = GPU_MAX_HEAPS;
  for (uint32_t i = 0; i < caps->n_heaps; i++) {
    const VkMemoryHeap *h = &mem.memoryProperties.memoryHeaps[i];
    caps->heaps[i].size = h->size;
    caps->heaps[i].device_local = h->flags & VK_MEMORY_HEAP_DEVICE_LOCAL_BIT;
    caps->heaps[i].budget = caps->memory_budget ? budget.heapBudget[i] : h->size;
    caps->heaps[i].usage = caps->memory_budget ? budget.heapUsage[i] : 0;
  }
  for (uint32_t i = 0; i < mem.memoryProperties.memoryTypeCount; i++) {
    VkMemoryPropertyFlags f = mem.memoryProperties.memoryTypes[i].propertyFlags;
    if ((f & VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT) && (f & VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT))
      caps->unified_memory = true;
  }
  return 0;
}

const char *gpu_device_type_name(enum gpu_device_type t) {
  switch (t) {
  case GPU_TYPE_INTEGRATED:
    return "integrated GPU";
  case GPU_TYPE_DISCRETE:
    return "discrete GPU";
  case GPU_TYPE_VIRTUAL:
    return "virtual GPU";
  case GPU_TYPE_CPU:
    return "CPU";
  default:
    return "other";
  }
}

static void caps_print_bytes(FILE *out, const char *label, uint64_t v) {
  if (v >= (1ull << 30))
    fprintf(out, "  %-22s %.2f GiB (%llu bytes)\n", label, (double)v / (1ull << 30),
            (unsigned long long)v);
  else if (v >= (1ull << 20))
    fprintf(out, "  %-22s %.2f MiB (%llu bytes)\n", label, (double)v / (1ull << 20),
            (unsigned long long)v);
  else
    fprintf(out, "  %-22s %llu bytes\n", label, (unsigned long long)v);
}

void gpu_caps_print(const struct gpu_caps *c, uint32_t index, FILE *out) {
  static const char *sg_names[] = {
      "basic", "vote", "arithmetic", "ballot", "shuffle", "shuffle_relative", "clustered", "quad"};
  fprintf(out, "device %u: %s\n", index, c->name);
  fprintf(out, "  %-22s %s\n", "type", gpu_device_type_name(c->type));
  fprintf(out, "  %-22s 0x%04x / 0x%04x\n", "vendor / device id", c->vendor_id, c->device_id);
  fprintf(out, "  %-22s %u.%u.%u\n", "Vulkan API", VK_API_VERSION_MAJOR(c->api_version),
          VK_API_VERSION_MINOR(c->api_version), VK_API_VERSION_PATCH(c->api_version));
  fprintf(out, "  %-22s %s %s (0x%x)\n", "driver", c->driver_name[0] ? c->driver_name : "?",
          c->driver_info, c->driver_version);
  fprintf(out, "  %-22s %u (range %u..%u)\n", "subgroup size", c->subgroup_size, c->subgroup_min,
          c->subgroup_max);
  fprintf(out, "  %-22s", "subgroup ops (compute)");
  for (int i = 0; i < 8; i++)
    if (c->subgroup_ops & (1u << i)) fprintf(out, " %s", sg_names[i]);
  fprintf(out, "%s\n", c->subgroup_ops ? "" : " none");
  fprintf(out, "  %-22s fp16 arithmetic %s, int8 arithmetic %s\n", "shader types",
          c->fp16_arith ? "yes" : "no", c->int8_arith ? "yes" : "no");
  fprintf(out, "  %-22s 16-bit %s, 8-bit %s\n", "storage access", c->storage_16bit ? "yes" : "no",
          c->storage_8bit ? "yes" : "no");
  fprintf(out, "  %-22s integer dot product %s, cooperative matrix %s\n", "extensions",
          c->int_dot_product ? "yes" : "no", c->coop_matrix ? "yes" : "no");
  fprintf(out, "  %-22s push descriptors %s, memory budget %s, timestamps %s\n", "",
          c->push_descriptor ? "yes" : "no", c->memory_budget ? "yes" : "no",
          c->timestamps ? "yes" : "no");
  fprintf(out, "  %-22s %u x %u x %u (%u invocations)\n", "max workgroup size", c->max_wg_size[0],
          c->max_wg_size[1], c->max_wg_size[2], c->max_wg_invocations);
  fprintf(out, "  %-22s %u x %u x %u\n", "max workgroup count", c->max_wg_count[0],
          c->max_wg_count[1], c->max_wg_count[2]);
  caps_print_bytes(out, "shared memory", c->max_shared_bytes);
  caps_print_bytes(out, "push constants", c->max_push_bytes);
  caps_print_bytes(out, "max storage range", c->max_storage_range);
  caps_print_bytes(out, "max allocation", c->max_alloc_size);
  fprintf(out, "  %-22s %llu bytes\n", "storage offset align",
          (unsigned long long)c->min_storage_align);
  for (uint32_t i = 0; i < c->n_heaps; i++) {
    char label[32];
    snprintf(label, sizeof label, "heap %u%s", i, c->heaps[i].device_local ? " (device)" : "");
    fprintf(out, "  %-22s %.2f GiB, budget %.2f GiB, used %.2f GiB\n", label,
            (double)c->heaps[i].size / (1ull << 30), (double)c->heaps[i].budget / (1ull << 30),
            (double)c->heaps[i].usage / (1ull << 30));
  }
  fprintf(out, "  %-22s %s\n", "unified memory", c->unified_memory ? "yes" : "no");
}
