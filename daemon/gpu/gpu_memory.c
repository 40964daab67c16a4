#include "gpu_internal.h"

#include "kvd_error.h"

#include <stdlib.h>
#include <string.h>

#define DEFAULT_BLOCK_SIZE (64ull << 20)

int gpu__memory_init(struct gpu_device *dev, uint64_t block_size, uint64_t limit) {
  struct gpu_memory *m = &dev->mem;
  vkGetPhysicalDeviceMemoryProperties(dev->phys, &m->props);
  m->block_size = block_size ? block_size : DEFAULT_BLOCK_SIZE;
  if (dev->caps.max_alloc_size && m->block_size > dev->caps.max_alloc_size)
    m->block_size = dev->caps.max_alloc_size;
  m->limit = limit;
  return 0;
}

static void memory_release_block(struct gpu_device *dev, uint32_t index) {
  struct gpu_memory *m = &dev->mem;
  struct gpu_block *b = m->blocks[index];
  if (!b) return;
  if (b->mapped) vkUnmapMemory(dev->device, b->memory);
  vkFreeMemory(dev->device, b->memory, NULL);
  m->reserved -= b->size;
  m->heap_reserved[m->props.memoryTypes[b->type_index].heapIndex] -= b->size;
  gpu_range_destroy(&b->ranges);
  free(b);
  m->blocks[index] = NULL;
}

void gpu__memory_destroy(struct gpu_device *dev) {
  struct gpu_memory *m = &dev->mem;
  for (uint32_t i = 0; i < m->n_blocks; i++)
    memory_release_block(dev, i);
  free(m->blocks);
  m->blocks = NULL;
  m->n_blocks = m->cap_blocks = 0;
}

/* Ordered preference: required flags first, the better-suited ones before the fallbacks. */
struct mem_pref {
  VkMemoryPropertyFlags flags[3];
  uint32_t n;
};

static struct mem_pref memory_prefs(enum gpu_mem_kind kind) {
  const VkMemoryPropertyFlags DL = VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT;
  const VkMemoryPropertyFlags HV =
      VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
  const VkMemoryPropertyFlags HC = VK_MEMORY_PROPERTY_HOST_CACHED_BIT;
  switch (kind) {
  case GPU_MEM_HOST:
    return (struct mem_pref){{HV | HC, HV}, 2};
  case GPU_MEM_MAPPABLE:
    return (struct mem_pref){{DL | HV, HV}, 2};
  case GPU_MEM_DEVICE:
  default:
    /* A device without any device-local type (rare) still works, slowly, from any memory. */
    return (struct mem_pref){{DL, 0}, 2};
  }
}

static int memory_new_block(struct gpu_device *dev, uint32_t type, uint64_t size, bool dedicated,
                            uint32_t *ret_index) {
  struct gpu_memory *m = &dev->mem;
  if (m->limit && m->reserved + size > m->limit)
    return gpu__fail(
        KVD_E_DEVICE_OOM, "device memory limit: %llu bytes reserved + %llu requested > limit %llu",
        (unsigned long long)m->reserved, (unsigned long long)size, (unsigned long long)m->limit);
  if (dev->caps.max_alloc_size && size > dev->caps.max_alloc_size)
    return gpu__fail(KVD_E_LIMIT, "allocation of %llu bytes exceeds maxMemoryAllocationSize %llu",
                     (unsigned long long)size, (unsigned long long)dev->caps.max_alloc_size);
  uint32_t live = 0;
  for (uint32_t i = 0; i < m->n_blocks; i++)
    live += m->blocks[i] != NULL;
  if (dev->caps.max_alloc_count && live >= dev->caps.max_alloc_count)
    return gpu__fail(KVD_E_DEVICE_OOM, "maxMemoryAllocationCount (%u) reached",
                     dev->caps.max_alloc_count);

  uint32_t index = m->n_blocks;
  for (uint32_t i = 0; i < m->n_blocks; i++)
    if (!m->blocks[i]) {
      index = i;
      break;
    }
  if (index == m->n_blocks && m->n_blocks == m->cap_blocks) {
    uint32_t cap = m->cap_blocks ? m->cap_blocks * 2 : 8;
    struct gpu_block **p = realloc(m->blocks, cap * sizeof *p);
    if (!p) return KVD_ENOMEM;
    m->blocks = p;
    m->cap_blocks = cap;
  }
  struct gpu_block *b = calloc(1, sizeof *b);
  if (!b) return KVD_ENOMEM;
  int rc = gpu_range_init(&b->ranges, size);
  if (rc < 0) {
    free(b);
    return rc;
  }
  VkMemoryAllocateInfo ai = {
      .sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO,
      .allocationSize = size,
      .memoryTypeIndex = type,
  };
  rc = gpu__check(vkAllocateMemory(dev->device, &ai, NULL, &b->memory), "vkAllocateMemory");
  if (rc < 0) {
    gpu_range_destroy(&b->ranges);
    free(b);
    return rc;
  }
  if (m->props.memoryTypes[type].propertyFlags & VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT) {
    rc = gpu__check(vkMapMemory(dev->device, b->memory, 0, VK_WHOLE_SIZE, 0, &b->mapped),
                    "vkMapMemory");
    if (rc < 0) {
      vkFreeMemory(dev->device, b->memory, NULL);
      gpu_range_destroy(&b->ranges);
      free(b);
      return rc;
    }
  }
  b->size = size;
  b->type_index = type;
  b->dedicated = dedicated;
  m->blocks[index] = b;
  if (index == m->n_blocks) m->n_blocks++;
  m->reserved += size;
  m->heap_reserved[m->props.memoryTypes[type].heapIndex] += size;
  *ret_index = index;
  return 0;
}

/* Carve (size, align) from an existing block of `type`, else from a new one. */
static int memory_place(struct gpu_device *dev, uint32_t type, uint64_t size, uint64_t align,
                        uint32_t *ret_block, uint64_t *ret_offset) {
  struct gpu_memory *m = &dev->mem;
  /* Large buffers get their own block: sharing would strand most of a block when they go. */
  bool dedicated = size > m->block_size / 2;
  if (!dedicated) {
    for (uint32_t i = 0; i < m->n_blocks; i++) {
      struct gpu_block *b = m->blocks[i];
      if (!b || b->dedicated || b->type_index != type) continue;
      if (gpu_range_alloc(&b->ranges, size, align, ret_offset) == 0) {
        b->n_live++;
        *ret_block = i;
        return 0;
      }
    }
  }
  uint64_t block_size = dedicated ? size : m->block_size;
  /* Near the limit, a smaller block that fits this buffer beats failing. */
  if (!dedicated && m->limit && m->reserved + block_size > m->limit &&
      m->reserved + size <= m->limit)
    block_size = size;
  uint32_t index = 0;
  int rc = memory_new_block(dev, type, block_size, dedicated, &index);
  if (rc < 0) return rc;
  struct gpu_block *b = m->blocks[index];
  rc = gpu_range_alloc(&b->ranges, size, align, ret_offset);
  if (rc < 0) { /* cannot happen for a fresh block of >= size, offset 0 is aligned */
    memory_release_block(dev, index);
    return gpu__fail(KVD_E_DEVICE_OOM, "fresh block cannot hold %llu bytes",
                     (unsigned long long)size);
  }
  b->n_live++;
  *ret_block = index;
  return 0;
}

static int memory_buffer_new(struct gpu_device *dev, uint64_t size, enum gpu_mem_kind kind,
                             const char *name, struct gpu_buffer **ret) {
  if (size == 0) return gpu__fail(KVD_EINVAL, "gpu_buffer_new: zero size");
  struct gpu_buffer *buf = calloc(1, sizeof *buf);
  if (!buf) return KVD_ENOMEM;
  buf->dev = dev;
  buf->size = size;
  VkBufferCreateInfo bci = {
      .sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO,
      .size = size,
      .usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
               VK_BUFFER_USAGE_TRANSFER_DST_BIT,
      .sharingMode = VK_SHARING_MODE_EXCLUSIVE,
  };
  int rc = gpu__check(vkCreateBuffer(dev->device, &bci, NULL, &buf->buffer), "vkCreateBuffer");
  if (rc < 0) {
    free(buf);
    return rc;
  }
  VkMemoryRequirements req;
  vkGetBufferMemoryRequirements(dev->device, buf->buffer, &req);
  uint64_t align = req.alignment;
  /* Buffers are bound as storage at offset 0, but sub-ranges of them are too: keep both legal. */
  if (dev->caps.min_storage_align > align) align = dev->caps.min_storage_align;
  uint64_t span = (req.size + align - 1) & ~(align - 1);

  struct mem_pref pref = memory_prefs(kind);
  rc = gpu__fail(KVD_E_DEVICE_OOM, "no memory type fits buffer '%s'", name ? name : "?");
  for (uint32_t p = 0; p < pref.n; p++) {
    for (uint32_t t = 0; t < dev->mem.props.memoryTypeCount; t++) {
      if (!(req.memoryTypeBits & (1u << t))) continue;
      if ((dev->mem.props.memoryTypes[t].propertyFlags & pref.flags[p]) != pref.flags[p]) continue;
      rc = memory_place(dev, t, span, align, &buf->block, &buf->offset);
      if (rc == 0) goto placed;
      if (rc != KVD_E_DEVICE_OOM) goto fail; /* a hard error, not just this type being full */
    }
  }
  goto fail;

placed:;
  struct gpu_block *b = dev->mem.blocks[buf->block];
  rc = gpu__check(vkBindBufferMemory(dev->device, buf->buffer, b->memory, buf->offset),
                  "vkBindBufferMemory");
  if (rc < 0) {
    gpu_range_free(&b->ranges, buf->offset, span);
    b->n_live--;
    goto fail;
  }
  buf->span = span;
  buf->mapped = b->mapped ? (uint8_t *)b->mapped + buf->offset : NULL;
  dev->mem.allocated += span;
  dev->mem.n_buffers++;
  gpu__name_object(dev, VK_OBJECT_TYPE_BUFFER, (uint64_t)(uintptr_t)buf->buffer, name);
  *ret = buf;
  return 0;

fail:
  vkDestroyBuffer(dev->device, buf->buffer, NULL);
  free(buf);
  return rc;
}

static void memory_buffer_free(struct gpu_buffer *buf) {
  struct gpu_device *dev = buf->dev;
  struct gpu_memory *m = &dev->mem;
  vkDestroyBuffer(dev->device, buf->buffer, NULL);
  struct gpu_block *b = m->blocks[buf->block];
  gpu_range_free(&b->ranges, buf->offset, buf->span);
  b->n_live--;
  m->allocated -= buf->span;
  m->n_buffers--;
  if (b->n_live == 0) {
    /* Keep one empty shared block per memory type for reuse; give the rest back at once. */
    bool other_empty = false;
    for (uint32_t i = 0; i < m->n_blocks && !b->dedicated; i++) {
      struct gpu_block *o = m->blocks[i];
      if (o && o != b && !o->dedicated && o->type_index == b->type_index && o->n_live == 0)
        other_empty = true;
    }
    if (b->dedicated || other_empty) memory_release_block(dev, buf->block);
  }
  free(buf);
}

int gpu_buffer_new(struct gpu_device *dev, uint64_t size, enum gpu_mem_kind kind, const char *name,
                   struct gpu_buffer **ret) {
  pthread_mutex_lock(&dev->mem_lock);
  int rc = memory_buffer_new(dev, size, kind, name, ret);
  pthread_mutex_unlock(&dev->mem_lock);
  return rc;
}

void gpu_buffer_free(struct gpu_buffer *buf) {
  if (!buf) return;
  struct gpu_device *dev = buf->dev;
  pthread_mutex_lock(&dev->mem_lock);
  memory_buffer_free(buf);
  pthread_mutex_unlock(&dev->mem_lock);
}

uint64_t gpu_buffer_size(const struct gpu_buffer *buf) {
  return buf->size;
}

void *gpu_buffer_map(const struct gpu_buffer *buf) {
  return buf->mapped;
}

void gpu_buffer_placement(const struct gpu_buffer *buf, uint32_t *ret_block, uint64_t *ret_offset) {
  *ret_block = buf->block;
  *ret_offset = buf->offset;
}

void gpu_memory_stats(const struct gpu_device *dev, struct gpu_mem_stats *ret) {
  const struct gpu_memory *m = &dev->mem;
  pthread_mutex_t *lock = (pthread_mutex_t *)&dev->mem_lock;
  pthread_mutex_lock(lock);
  memset(ret, 0, sizeof *ret);
  ret->allocated = m->allocated;
  ret->reserved = m->reserved;
  ret->n_buffers = m->n_buffers;
  for (uint32_t i = 0; i < m->n_blocks; i++) {
    const struct gpu_block *b = m->blocks[i];
    if (!b) continue;
    ret->n_blocks++;
    if (m->props.memoryHeaps[m->props.memoryTypes[b->type_index].heapIndex].flags &
        VK_MEMORY_HEAP_DEVICE_LOCAL_BIT)
      ret->device_local += b->size;
  }
  pthread_mutex_unlock(lock);
}
