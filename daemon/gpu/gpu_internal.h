/* Private to gpu/: the Vulkan-typed insides of the objects gpu.h keeps opaque. */
#ifndef KVD_GPU_INTERNAL_H
#define KVD_GPU_INTERNAL_H

#include "gpu.h"
#include "gpu_range.h"

#include <pthread.h>
#include <vulkan/vulkan.h>

/* The one translation of a VkResult: records "what: VK_ERROR_..." as the thread's error detail and
 * returns the kvd code (0 for VK_SUCCESS). */
int gpu__check(VkResult r, const char *what);
/* Records a non-Vulkan failure detail and returns code. */
int gpu__fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *gpu__result_name(VkResult r);

struct gpu_instance {
  VkInstance instance;
  VkDebugUtilsMessengerEXT messenger;
  bool validate;
  uint32_t validation_errors; /* atomic: the messenger may run on driver threads */
  uint32_t n_phys;
  VkPhysicalDevice *phys;
  PFN_vkDestroyDebugUtilsMessengerEXT destroy_messenger;
  PFN_vkSetDebugUtilsObjectNameEXT set_object_name;
};

/* Fill caps from a physical device (also tells which optional extensions are present). */
int gpu__caps_read(struct gpu_instance *inst, VkPhysicalDevice phys, struct gpu_caps *caps);
bool gpu__has_extension(VkPhysicalDevice phys, const char *name);

/* One VkDeviceMemory block that buffers are carved from. */
struct gpu_block {
  VkDeviceMemory memory;
  uint64_t size;
  uint32_t type_index;
  bool dedicated; /* holds exactly one large buffer */
  void *mapped;   /* persistently mapped when host-visible */
  struct gpu_range ranges;
  uint32_t n_live;
};

struct gpu_memory {
  VkPhysicalDeviceMemoryProperties props;
  struct gpu_block **blocks; /* NULL slots are reused */
  uint32_t n_blocks, cap_blocks;
  uint64_t block_size;
  uint64_t limit;     /* 0 = none */
  uint64_t reserved;  /* bytes of VkDeviceMemory held */
  uint64_t allocated; /* bytes in live buffers */
  uint32_t n_buffers;
  uint64_t heap_reserved[VK_MAX_MEMORY_HEAPS];
};

struct gpu_device {
  struct gpu_instance *inst;
  VkPhysicalDevice phys;
  VkDevice device;
  VkQueue queue;
  uint32_t queue_family;
  struct gpu_caps caps;
  VkPipelineCache pipeline_cache;
  char cache_path[1024]; /* "" = not persisted */
  /* gpu_device_opts.extra_shaders: searched after the embedded registry, NULL in kvd. */
  const struct shader_spirv *(*extra_shaders)(const char *name);
  struct gpu_memory mem;
  /* Transfers and one-off submissions share one command buffer and staging buffer. */
  pthread_mutex_t xfer_lock;
  /* Several threads use one device (an engine thread per model, model loads on a worker): the
   * allocator's lists and the queue (vkQueueSubmit needs external synchronisation) are locked. */
  pthread_mutex_t mem_lock;
  pthread_mutex_t queue_lock;
  /* Held across "measure free memory, then allocate a share of it" (gpu_device_budget_lock);
   * taken before mem_lock, never while holding it. */
  pthread_mutex_t budget_lock;
  struct gpu_cmd *xfer_cmd;
  struct gpu_buffer *staging;
};

struct gpu_buffer {
  struct gpu_device *dev;
  VkBuffer buffer;
  uint64_t size;
  uint32_t block;  /* index in dev->mem.blocks */
  uint64_t offset; /* in the block's memory */
  uint64_t span;   /* bytes taken from the block (size rounded to alignment) */
  void *mapped;    /* host pointer or NULL */
};

struct gpu_pipeline {
  struct gpu_device *dev;
  VkDescriptorSetLayout set_layout;
  VkPipelineLayout layout;
  VkPipeline pipeline;
  uint32_t n_buffers;
  uint32_t push_size;
  uint32_t local_size[3];
  char name[64];
};

int gpu__memory_init(struct gpu_device *dev, uint64_t block_size, uint64_t limit);
void gpu__memory_destroy(struct gpu_device *dev);
void gpu__name_object(struct gpu_device *dev, VkObjectType type, uint64_t handle, const char *name);

#endif
