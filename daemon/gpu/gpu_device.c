#include "gpu_internal.h"

#include "kvd_error.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* mkdir -p: the cache folder may not exist on a fresh account. */
static int device_mkdirs(const char *path) {
  char buf[1024];
  snprintf(buf, sizeof buf, "%s", path);
  for (char *p = buf + 1; *p; p++) {
    if (*p != '/') continue;
    *p = '\0';
    if (mkdir(buf, 0700) < 0 && errno != EEXIST) return -errno;
    *p = '/';
  }
  if (mkdir(buf, 0700) < 0 && errno != EEXIST) return -errno;
  return 0;
}

static void *device_read_file(const char *path, size_t *ret_size) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  void *data = NULL;
  long n;
  if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) > 0 && n < (256l << 20) &&
      fseek(f, 0, SEEK_SET) == 0) {
    data = malloc((size_t)n);
    if (data && fread(data, 1, (size_t)n, f) != (size_t)n) {
      free(data);
      data = NULL;
    }
    *ret_size = (size_t)n;
  }
  fclose(f);
  return data;
}

/* The driver validates the blob's header (vendor, device, cache UUID) and ignores a stale one, so
 * a cache from another driver version costs a recompile, never a failure. */
static int device_cache_open(struct gpu_device *dev, const char *dir) {
  size_t size = 0;
  void *data = NULL;
  if (dir && *dir) {
    VkPhysicalDeviceProperties p;
    vkGetPhysicalDeviceProperties(dev->phys, &p);
    char uuid[2 * VK_UUID_SIZE + 1];
    for (unsigned i = 0; i < VK_UUID_SIZE; i++)
      snprintf(uuid + 2 * i, 3, "%02x", p.pipelineCacheUUID[i]);
    snprintf(dev->cache_path, sizeof dev->cache_path, "%s/pipelines-%04x-%04x-%s.bin", dir,
             p.vendorID, p.deviceID, uuid);
    data = device_read_file(dev->cache_path, &size);
  }
  VkPipelineCacheCreateInfo ci = {
      .sType = VK_STRUCTURE_TYPE_PIPELINE_CACHE_CREATE_INFO,
      .initialDataSize = data ? size : 0,
      .pInitialData = data,
  };
  VkResult r = vkCreatePipelineCache(dev->device, &ci, NULL, &dev->pipeline_cache);
  if (r != VK_SUCCESS && data) {
    ci.initialDataSize = 0;
    ci.pInitialData = NULL;
    r = vkCreatePipelineCache(dev->device, &ci, NULL, &dev->pipeline_cache);
  }
  free(data);
  return gpu__check(r, "vkCreatePipelineCache");
}

/* Best effort: a cache that cannot be written only costs compile time on the next start. */
static void device_cache_save(struct gpu_device *dev) {
  if (!dev->cache_path[0] || !dev->pipeline_cache) return;
  size_t size = 0;
  if (vkGetPipelineCacheData(dev->device, dev->pipeline_cache, &size, NULL) != VK_SUCCESS ||
      size == 0)
    return;
  void *data = malloc(size);
  if (!data) return;
  if (vkGetPipelineCacheData(dev->device, dev->pipeline_cache, &size, data) == VK_SUCCESS) {
    char dir[1024], tmp[1100];
    snprintf(dir, sizeof dir, "%s", dev->cache_path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = '\0';
    snprintf(tmp, sizeof tmp, "%s.%ld.tmp", dev->cache_path, (long)getpid());
    if (device_mkdirs(dir) == 0) {
      FILE *f = fopen(tmp, "wb");
      if (f) {
        bool ok = fwrite(data, 1, size, f) == size;
        ok = (fclose(f) == 0) && ok;
        /* rename is atomic: a concurrent reader sees the old or the new cache, never half. */
        if (!ok || rename(tmp, dev->cache_path) != 0) unlink(tmp);
      }
    }
  }
  free(data);
}

int gpu_device_new(struct gpu_instance *inst, const struct gpu_device_opts *opts,
                   struct gpu_device **ret) {
  struct gpu_device_opts defaults = {0};
  if (!opts) opts = &defaults;
  uint32_t index;
  int rc = gpu_instance_pick(inst, opts->select, &index);
  if (rc < 0) return rc;

  struct gpu_device *dev = calloc(1, sizeof *dev);
  if (!dev) return KVD_ENOMEM;
  if (pthread_mutex_init(&dev->xfer_lock, NULL) != 0) {
    free(dev);
    return KVD_ENOMEM;
  }
  pthread_mutex_init(&dev->mem_lock, NULL); /* default attributes: cannot fail on Linux */
  pthread_mutex_init(&dev->queue_lock, NULL);
  pthread_mutex_init(&dev->budget_lock, NULL);
  dev->inst = inst;
  dev->phys = inst->phys[index];
  dev->extra_shaders = opts->extra_shaders;
  rc = gpu__caps_read(inst, dev->phys, &dev->caps);
  if (rc < 0) goto fail;

  VkQueueFamilyProperties *fams = NULL;
  uint32_t n_fams = 0;
  vkGetPhysicalDeviceQueueFamilyProperties(dev->phys, &n_fams, NULL);
  fams = calloc(n_fams ? n_fams : 1, sizeof *fams);
  if (!fams) {
    rc = KVD_ENOMEM;
    goto fail;
  }
  vkGetPhysicalDeviceQueueFamilyProperties(dev->phys, &n_fams, fams);
  /* Prefer a compute-only family (async compute on discrete GPUs), else any with compute. */
  int64_t family = -1;
  for (uint32_t i = 0; i < n_fams && family < 0; i++)
    if ((fams[i].queueFlags & VK_QUEUE_COMPUTE_BIT) &&
        !(fams[i].queueFlags & VK_QUEUE_GRAPHICS_BIT))
      family = i;
  for (uint32_t i = 0; i < n_fams && family < 0; i++)
    if (fams[i].queueFlags & VK_QUEUE_COMPUTE_BIT) family = i;
  bool family_timestamps = family >= 0 && fams[family].timestampValidBits > 0;
  free(fams);
  if (family < 0) {
    rc = gpu__fail(KVD_E_NO_DEVICE, "%s has no compute queue", dev->caps.name);
    goto fail;
  }
  dev->queue_family = (uint32_t)family;
  dev->caps.timestamps = dev->caps.timestamps && family_timestamps;

  const char *exts[4];
  uint32_t n_exts = 0;
  if (dev->caps.memory_budget) exts[n_exts++] = VK_EXT_MEMORY_BUDGET_EXTENSION_NAME;

  /* Turn on exactly the optional features the caps found, so shaders may rely on them. */
  bool v12 = dev->caps.api_version >= VK_API_VERSION_1_2;
  VkPhysicalDeviceVulkan11Features f11 = {
      .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES};
  VkPhysicalDeviceVulkan12Features f12 = {
      .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES, .pNext = &f11};
  VkPhysicalDevice16BitStorageFeatures s16 = {
      .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_16BIT_STORAGE_FEATURES};
  if (v12) {
    f11.storageBuffer16BitAccess = dev->caps.storage_16bit;
    f12.storageBuffer8BitAccess = dev->caps.storage_8bit;
    f12.shaderFloat16 = dev->caps.fp16_arith;
    f12.shaderInt8 = dev->caps.int8_arith;
  } else {
    s16.storageBuffer16BitAccess = dev->caps.storage_16bit;
  }
  float prio = 1.0f;
  VkDeviceQueueCreateInfo qci = {
      .sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO,
      .queueFamilyIndex = dev->queue_family,
      .queueCount = 1,
      .pQueuePriorities = &prio,
  };
  VkDeviceCreateInfo dci = {
      .sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO,
      .pNext = v12 ? (void *)&f12 : (void *)&s16,
      .queueCreateInfoCount = 1,
      .pQueueCreateInfos = &qci,
      .enabledExtensionCount = n_exts,
      .ppEnabledExtensionNames = exts,
  };
  rc = gpu__check(vkCreateDevice(dev->phys, &dci, NULL, &dev->device), "vkCreateDevice");
  if (rc < 0) goto fail;
  vkGetDeviceQueue(dev->device, dev->queue_family, 0, &dev->queue);

  rc = device_cache_open(dev, opts->cache_dir);
  if (rc < 0) goto fail;
  rc = gpu__memory_init(dev, opts->block_size, opts->mem_limit);
  if (rc < 0) goto fail;
  *ret = dev;
  return 0;

fail:
  gpu_device_free(dev);
  return rc;
}

void gpu_device_free(struct gpu_device *dev) {
  if (!dev) return;
  if (dev->device) {
    vkDeviceWaitIdle(dev->device);
    gpu_buffer_free(dev->staging);
    gpu_cmd_free(dev->xfer_cmd);
    gpu__memory_destroy(dev);
    device_cache_save(dev);
    if (dev->pipeline_cache) vkDestroyPipelineCache(dev->device, dev->pipeline_cache, NULL);
    vkDestroyDevice(dev->device, NULL);
  }
  pthread_mutex_destroy(&dev->xfer_lock);
  pthread_mutex_destroy(&dev->mem_lock);
  pthread_mutex_destroy(&dev->queue_lock);
  pthread_mutex_destroy(&dev->budget_lock);
  free(dev);
}

const struct gpu_caps *gpu_device_caps(const struct gpu_device *dev) {
  return &dev->caps;
}

uint32_t gpu_device_heaps(struct gpu_device *dev, struct gpu_heap ret[GPU_MAX_HEAPS]) {
  const struct gpu_memory *m = &dev->mem;
  VkPhysicalDeviceMemoryBudgetPropertiesEXT budget = {
      .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MEMORY_BUDGET_PROPERTIES_EXT};
  VkPhysicalDeviceMemoryProperties2 mem = {
      .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MEMORY_PROPERTIES_2,
      .pNext = dev->caps.memory_budget ? &budget : NULL};
  uint32_t n = dev->caps.n_heaps;
  /* Queried under the allocator's lock: no allocation lands between the driver's numbers and
   * kvd's, so the two agree and a concurrent load cannot be half counted. */
  pthread_mutex_lock(&dev->mem_lock);
  vkGetPhysicalDeviceMemoryProperties2(dev->phys, &mem);
  uint64_t room = m->limit ? (m->limit > m->reserved ? m->limit - m->reserved : 0) : UINT64_MAX;
  for (uint32_t i = 0; i < n; i++) {
    struct gpu_heap h = dev->caps.heaps[i];
    h.budget = dev->caps.memory_budget ? budget.heapBudget[i] : h.size;
    h.usage = dev->caps.memory_budget ? budget.heapUsage[i] : 0;
    /* A driver may report its usage late; what kvd holds is used in any case. */
    if (h.usage < m->heap_reserved[i]) h.usage = m->heap_reserved[i];
    if (room != UINT64_MAX && h.budget > h.usage && h.budget - h.usage > room)
      h.budget = h.usage + room;
    ret[i] = h;
  }
  pthread_mutex_unlock(&dev->mem_lock);
  return n;
}

uint64_t gpu_device_free_memory(struct gpu_device *dev) {
  struct gpu_heap heaps[GPU_MAX_HEAPS];
  uint32_t n = gpu_device_heaps(dev, heaps);
  uint64_t best = 0;
  for (uint32_t i = 0; i < n; i++) {
    if (!heaps[i].device_local) continue;
    uint64_t avail = heaps[i].budget > heaps[i].usage ? heaps[i].budget - heaps[i].usage : 0;
    if (avail > best) best = avail;
  }
  return best;
}

void gpu_device_budget_lock(struct gpu_device *dev) {
  pthread_mutex_lock(&dev->budget_lock);
}

void gpu_device_budget_unlock(struct gpu_device *dev) {
  pthread_mutex_unlock(&dev->budget_lock);
}

void gpu__name_object(struct gpu_device *dev, VkObjectType type, uint64_t handle,
                      const char *name) {
  if (!name || !dev->inst->set_object_name) return;
  VkDebugUtilsObjectNameInfoEXT info = {
      .sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_OBJECT_NAME_INFO_EXT,
      .objectType = type,
      .objectHandle = handle,
      .pObjectName = name,
  };
  dev->inst->set_object_name(dev->device, &info);
}

void gpu_grid_2d(const struct gpu_device *dev, uint32_t n, uint32_t *ret_x, uint32_t *ret_y) {
  uint32_t max_x = dev->caps.max_wg_count[0];
  if (n <= max_x) {
    *ret_x = n ? n : 1;
    *ret_y = 1;
    return;
  }
  uint32_t y = (n + max_x - 1) / max_x;
  *ret_x = (n + y - 1) / y;
  *ret_y = y;
}
