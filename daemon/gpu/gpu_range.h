/* A first-fit free-list allocator over the byte range [0, size) of one memory block.
 *
 * Pure data structure, no Vulkan: the device-memory allocator keeps one per block, and the unit
 * tests drive it directly. Free ranges are kept sorted by offset and coalesced on free, so
 * fragmentation from a free/alloc cycle of equal sizes never grows. */
#ifndef KVD_GPU_RANGE_H
#define KVD_GPU_RANGE_H

#include <stdbool.h>
#include <stdint.h>

struct gpu_range_span {
  uint64_t offset;
  uint64_t size;
};

struct gpu_range {
  uint64_t size;
  uint64_t used;
  struct gpu_range_span *free; /* sorted by offset, never adjacent (always coalesced) */
  uint32_t n_free, cap_free;
};

int gpu_range_init(struct gpu_range *r, uint64_t size);
void gpu_range_destroy(struct gpu_range *r);
/* Finds `size` bytes at an offset that is a multiple of `align` (a power of two). KVD_ENOSPC when
 * no free span fits; KVD_ENOMEM if the free list cannot grow. */
int gpu_range_alloc(struct gpu_range *r, uint64_t size, uint64_t align, uint64_t *ret_offset);
/* Returns [offset, offset+size) to the free list, merging with its neighbours. */
int gpu_range_free(struct gpu_range *r, uint64_t offset, uint64_t size);
/* Largest single free span (what one more allocation could get). */
uint64_t gpu_range_largest(const struct gpu_range *r);

#endif
