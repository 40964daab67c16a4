#include "gpu_range.h"

#include "kvd_error.h"

#include <stdlib.h>
#include <string.h>

int gpu_range_init(struct gpu_range *r, uint64_t size) {
  memset(r, 0, sizeof *r);
  r->size = size;
  r->cap_free = 8;
  r->free = malloc(r->cap_free * sizeof *r->free);
  if (!r->free) return KVD_ENOMEM;
  if (size > 0) {
    r->free[0].offset = 0;
    r->free[0].size = size;
    r->n_free = 1;
  }
  return 0;
}

void gpu_range_destroy(struct gpu_range *r) {
  free(r->free);
  memset(r, 0, sizeof *r);
}

static int range_reserve(struct gpu_range *r, uint32_t n) {
  if (n <= r->cap_free) return 0;
  uint32_t cap = r->cap_free * 2;
  while (cap < n)
    cap *= 2;
  struct gpu_range_span *p = realloc(r->free, cap * sizeof *p);
  if (!p) return KVD_ENOMEM;
  r->free = p;
  r->cap_free = cap;
  return 0;
}

static void range_insert_at(struct gpu_range *r, uint32_t i, uint64_t offset, uint64_t size) {
  memmove(&r->free[i + 1], &r->free[i], (r->n_free - i) * sizeof *r->free);
  r->free[i].offset = offset;
  r->free[i].size = size;
  r->n_free++;
}

static void range_remove_at(struct gpu_range *r, uint32_t i) {
  memmove(&r->free[i], &r->free[i + 1], (r->n_free - i - 1) * sizeof *r->free);
  r->n_free--;
}

int gpu_range_alloc(struct gpu_range *r, uint64_t size, uint64_t align, uint64_t *ret_offset) {
  if (size == 0 || align == 0 || (align & (align - 1))) return KVD_EINVAL;
  for (uint32_t i = 0; i < r->n_free; i++) {
    struct gpu_range_span s = r->free[i];
    uint64_t start = (s.offset + align - 1) & ~(align - 1);
    if (start < s.offset) continue; /* wrapped */
    uint64_t pad = start - s.offset;
    if (pad > s.size || s.size - pad < size) continue;
    uint64_t tail = s.size - pad - size;
    /* The span becomes up to two: the alignment padding before and the remainder after. */
    if (pad && tail) {
      if (range_reserve(r, r->n_free + 1) < 0) return KVD_ENOMEM;
      r->free[i].size = pad;
      range_insert_at(r, i + 1, start + size, tail);
    } else if (pad) {
      r->free[i].size = pad;
    } else if (tail) {
      r->free[i].offset = start + size;
      r->free[i].size = tail;
    } else {
      range_remove_at(r, i);
    }
    r->used += size;
    *ret_offset = start;
    return 0;
  }
  return KVD_ENOSPC;
}

int gpu_range_free(struct gpu_range *r, uint64_t offset, uint64_t size) {
  if (size == 0 || offset > r->size || size > r->size - offset) return KVD_EINVAL;
  /* First free span that starts after the freed range. */
  uint32_t i = 0;
  while (i < r->n_free && r->free[i].offset < offset)
    i++;
  /* A double free or overlap would corrupt the list: refuse it. */
  if (i > 0 && r->free[i - 1].offset + r->free[i - 1].size > offset) return KVD_EINVAL;
  if (i < r->n_free && offset + size > r->free[i].offset) return KVD_EINVAL;
  bool merge_prev = i > 0 && r->free[i - 1].offset + r->free[i - 1].size == offset;
  bool merge_next = i < r->n_free && offset + size == r->free[i].offset;
  if (merge_prev && merge_next) {
    r->free[i - 1].size += size + r->free[i].size;
    range_remove_at(r, i);
  } else if (merge_prev) {
    r->free[i - 1].size += size;
  } else if (merge_next) {
    r->free[i].offset = offset;
    r->free[i].size += size;
  } else {
    if (range_reserve(r, r->n_free + 1) < 0) return KVD_ENOMEM;
    range_insert_at(r, i, offset, size);
  }
  r->used -= size;
  return 0;
}

uint64_t gpu_range_largest(const struct gpu_range *r) {
  uint64_t best = 0;
  for (uint32_t i = 0; i < r->n_free; i++)
    if (r->free[i].size > best) best = r->free[i].size;
  return best;
}
