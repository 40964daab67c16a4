/* kvd's Vulkan compute runtime: instance and device selection, the capabilities struct, a
 * sub-allocating device-memory allocator, transfers, pipelines from the embedded SPIR-V, command
 * recording with barriers and timestamps.
 *
 * This header is Vulkan-free on purpose: gpu/ is the only code that calls Vulkan or sees a VkResult
 * (gpu_internal.h). Every fallible call returns 0 or a negative kvd code; gpu_error_detail() then
 * holds what failed and the VkResult name, for the caller to log once. */
#ifndef KVD_GPU_H
#define KVD_GPU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define GPU_MAX_HEAPS 16
#define GPU_MAX_BINDINGS 12
#define GPU_MAX_PUSH_BYTES 128 /* the minimum every Vulkan device guarantees */
#define GPU_MAX_SPEC 8

enum gpu_device_type {
  GPU_TYPE_OTHER = 0,
  GPU_TYPE_INTEGRATED = 1,
  GPU_TYPE_DISCRETE = 2,
  GPU_TYPE_VIRTUAL = 3,
  GPU_TYPE_CPU = 4,
};

/* Subgroup operation bits, numerically equal to VkSubgroupFeatureFlagBits. */
enum gpu_subgroup_op {
  GPU_SG_BASIC = 1u << 0,
  GPU_SG_VOTE = 1u << 1,
  GPU_SG_ARITHMETIC = 1u << 2,
  GPU_SG_BALLOT = 1u << 3,
  GPU_SG_SHUFFLE = 1u << 4,
  GPU_SG_SHUFFLE_RELATIVE = 1u << 5,
  GPU_SG_CLUSTERED = 1u << 6,
  GPU_SG_QUAD = 1u << 7,
};

struct gpu_heap {
  uint64_t size;
  uint64_t budget; /* VK_EXT_memory_budget, else size; capped by the device's mem_limit */
  uint64_t usage;  /* VK_EXT_memory_budget (all processes), at least what kvd reserved */
  bool device_local;
};

/* What kvd reads from a device. Shaders pick variants from it; nothing assumes a limit that is not
 * here. */
struct gpu_caps {
  char name[256];
  enum gpu_device_type type;
  uint32_t vendor_id;
  uint32_t device_id;
  uint32_t api_version;    /* VK_MAKE_API_VERSION encoding */
  uint32_t driver_version; /* vendor encoding */
  char driver_name[256];
  char driver_info[256];

  uint32_t subgroup_size;
  uint32_t subgroup_ops;               /* gpu_subgroup_op bits usable in compute shaders */
  uint32_t subgroup_min, subgroup_max; /* VK_EXT_subgroup_size_control range, else both = size */

  bool fp16_arith;      /* shaderFloat16 */
  bool storage_16bit;   /* storageBuffer16BitAccess */
  bool storage_8bit;    /* storageBuffer8BitAccess */
  bool int8_arith;      /* shaderInt8 */
  bool int_dot_product; /* VK_KHR_shader_integer_dot_product */
  bool coop_matrix;     /* VK_KHR_cooperative_matrix */
  bool push_descriptor; /* VK_KHR_push_descriptor */
  bool memory_budget;   /* VK_EXT_memory_budget */
  bool debug_utils;     /* VK_EXT_debug_utils (buffer names) */

  uint32_t max_wg_size[3];
  uint32_t max_wg_invocations;
  uint32_t max_wg_count[3];
  uint32_t max_shared_bytes;
  uint32_t max_push_bytes;
  uint64_t max_storage_range;
  uint64_t max_alloc_size;
  uint64_t min_storage_align; /* minStorageBufferOffsetAlignment */
  uint32_t max_alloc_count;
  bool timestamps;        /* compute queue can write timestamps */
  float timestamp_period; /* ns per tick */

  uint32_t n_heaps;
  /* budget and usage as they were when the caps were read: gpu_device_heaps() has the current
   * ones (the caps struct is shared by threads and never changes after gpu_device_new). */
  struct gpu_heap heaps[GPU_MAX_HEAPS];
  bool unified_memory; /* a device-local type is also host-visible (UMA, ReBAR, CPU) */
};

struct gpu_instance;
struct gpu_device;
struct gpu_buffer;
struct gpu_pipeline;
struct gpu_cmd;
struct shader_spirv; /* shaders/shader_registry.h */

/* The last failure on this thread: "vkCreateDevice: VK_ERROR_INITIALIZATION_FAILED". */
const char *gpu_error_detail(void);

/* ---- instance ---- */
struct gpu_instance_opts {
  bool validate; /* enable VK_LAYER_KHRONOS_validation (KVD_VALIDATE=1 at the caller) */
};
int gpu_instance_new(const struct gpu_instance_opts *opts, struct gpu_instance **ret);
void gpu_instance_free(struct gpu_instance *inst);
uint32_t gpu_instance_device_count(const struct gpu_instance *inst);
int gpu_instance_device_caps(struct gpu_instance *inst, uint32_t index, struct gpu_caps *ret);
/* Validation messages of error severity seen so far (tests fail on any). */
uint32_t gpu_instance_validation_errors(const struct gpu_instance *inst);
bool gpu_instance_validating(const struct gpu_instance *inst);
/* Default choice: discrete > integrated > virtual > CPU, first wins on ties. `select` overrides:
 * a decimal index, or a case-insensitive substring of the device name. */
int gpu_instance_pick(struct gpu_instance *inst, const char *select, uint32_t *ret_index);

/* ---- device ---- */
struct gpu_device_opts {
  const char *select;    /* see gpu_instance_pick(); NULL = default order */
  const char *cache_dir; /* pipeline cache folder (the daemon passes $XDG_CACHE_HOME/kvd);
                            NULL or "" = no persistent cache */
  uint64_t mem_limit;    /* cap on device memory this device allocates (0 = none) */
  uint64_t block_size;   /* allocator block size (0 = default 64 MiB, capped by limits) */
  /* SPIR-V that pipelines may name beside the daemon's embedded registry, searched after it:
   * tests and benchmarks pass test_shader_spirv_find (shaders/test_shader_registry.h) for the
   * test-only kernels, which kvd itself never links. NULL = the embedded registry only. */
  const struct shader_spirv *(*extra_shaders)(const char *name);
};
int gpu_device_new(struct gpu_instance *inst, const struct gpu_device_opts *opts,
                   struct gpu_device **ret);
/* Saves the pipeline cache, then releases everything. Buffers and pipelines must be freed first. */
void gpu_device_free(struct gpu_device *dev);
const struct gpu_caps *gpu_device_caps(const struct gpu_device *dev);
/* The current budget and usage of every heap, one consistent snapshot taken under the device's
 * memory lock (so kvd's own reservations in it match the allocator's), the device's mem_limit
 * applied: budget - usage never exceeds what the limit still allows. Thread-safe. Returns the
 * number of heaps written to ret. */
uint32_t gpu_device_heaps(struct gpu_device *dev, struct gpu_heap ret[GPU_MAX_HEAPS]);
/* The largest budget - usage over the device-local heaps of gpu_device_heaps(). */
uint64_t gpu_device_free_memory(struct gpu_device *dev);
/* Several threads may size allocations by the free memory at once (two models loading on libuv's
 * threadpool): each would see the same free memory and together take it twice. Whoever measures
 * free memory to decide how much to allocate holds this lock from the measurement until the
 * allocations are made, so the next one measures what is left. Never held while waiting for
 * anything else; buffer allocation and freeing work (and are thread-safe) without it. */
void gpu_device_budget_lock(struct gpu_device *dev);
void gpu_device_budget_unlock(struct gpu_device *dev);

void gpu_caps_print(const struct gpu_caps *caps, uint32_t index, FILE *out);
const char *gpu_device_type_name(enum gpu_device_type t);

/* ---- memory ---- */
enum gpu_mem_kind {
  GPU_MEM_DEVICE,   /* device-local storage buffer: weights, KV, activations */
  GPU_MEM_HOST,     /* host-visible, coherent: staging, readback */
  GPU_MEM_MAPPABLE, /* device-local and host-visible where the device has it, else host-visible */
};

struct gpu_mem_stats {
  uint64_t allocated; /* bytes in live buffers */
  uint64_t reserved;  /* bytes of VkDeviceMemory held in blocks */
  uint32_t n_blocks;
  uint32_t n_buffers;
  uint64_t device_local; /* reserved bytes on device-local heaps */
};

/* A buffer of `size` bytes sub-allocated from a block. `name` labels it for debug tools.
 * KVD_E_DEVICE_OOM when memory (or the configured limit) runs out: never aborts. */
int gpu_buffer_new(struct gpu_device *dev, uint64_t size, enum gpu_mem_kind kind, const char *name,
                   struct gpu_buffer **ret);
void gpu_buffer_free(struct gpu_buffer *buf); /* NULL is a no-op */
uint64_t gpu_buffer_size(const struct gpu_buffer *buf);
/* Host pointer for host-visible buffers, else NULL. */
void *gpu_buffer_map(const struct gpu_buffer *buf);
/* Where the sub-allocation lies (for tests of the allocator). */
void gpu_buffer_placement(const struct gpu_buffer *buf, uint32_t *ret_block, uint64_t *ret_offset);
void gpu_memory_stats(const struct gpu_device *dev, struct gpu_mem_stats *ret);

/* Synchronous copies host <-> buffer: a memcpy for mapped buffers, else through a staging buffer
 * and one submission. */
int gpu_buffer_upload(struct gpu_device *dev, struct gpu_buffer *dst, uint64_t offset,
                      const void *src, uint64_t size);
int gpu_buffer_download(struct gpu_device *dev, struct gpu_buffer *src, uint64_t offset, void *dst,
                        uint64_t size);

/* ---- pipelines ---- */
struct gpu_pipeline_desc {
  const char *shader; /* variant name in the embedded registry */
  uint32_t n_buffers; /* storage buffers at bindings 0..n-1 */
  uint32_t push_size; /* bytes of the push-constant struct */
  uint32_t n_spec;    /* specialization constants 0..n_spec-1, all 32-bit */
  uint32_t spec[GPU_MAX_SPEC];
  uint32_t local_size[3]; /* the workgroup size the spec constants give (checked at dispatch) */
};
int gpu_pipeline_new(struct gpu_device *dev, const struct gpu_pipeline_desc *desc,
                     struct gpu_pipeline **ret);
void gpu_pipeline_free(struct gpu_pipeline *pipe);

/* ---- command recording ---- */
struct gpu_binding {
  struct gpu_buffer *buf;
  uint64_t offset;
  uint64_t range; /* 0 = to the end of the buffer */
};

/* Errors are sticky within a recording, like a stdio stream's error flag. The first failing call
 * between gpu_cmd_begin() and gpu_cmd_submit() (begin itself included) stores its error in the
 * gpu_cmd; every later record call (dispatch, barrier, copy, fill) records nothing and returns
 * that first error, and gpu_cmd_submit() ends the buffer, submits nothing and returns it. So a
 * caller may record a whole pass without checking each call and check only the submit: a step
 * is never half-run. The next gpu_cmd_begin() clears the error. Recorders built on these calls
 * that refuse a shape before dispatching store their error with gpu_cmd_fail(). */
int gpu_cmd_new(struct gpu_device *dev, struct gpu_cmd **ret);
void gpu_cmd_free(struct gpu_cmd *cmd);
/* Starts a recording; a gpu_cmd is reusable after gpu_cmd_wait() (or a failed submit). */
int gpu_cmd_begin(struct gpu_cmd *cmd);
/* Stores rc (< 0) as the recording's error unless one is stored already; returns the stored error,
 * or rc when rc >= 0. */
int gpu_cmd_fail(struct gpu_cmd *cmd, int rc);
/* The recording's first error, 0 if none. */
int gpu_cmd_error(const struct gpu_cmd *cmd);
/* Records one dispatch. Checks the binding count, push size, workgroup-count limits, storage range
 * and offset alignment against the caps, so a shape that would overrun a limit is an error here,
 * not a device fault. `label` names it in the timings (may be NULL). Returns 0 or the recording's
 * first error (see above). */
int gpu_cmd_dispatch(struct gpu_cmd *cmd, const struct gpu_pipeline *pipe,
                     const struct gpu_binding *bindings, uint32_t n_bindings, const void *push,
                     uint32_t push_size, uint32_t gx, uint32_t gy, uint32_t gz, const char *label);
/* Makes every earlier dispatch's writes visible to later dispatches and copies. */
void gpu_cmd_barrier(struct gpu_cmd *cmd);
/* Record calls like gpu_cmd_dispatch(): 0 or the recording's first error. */
int gpu_cmd_copy(struct gpu_cmd *cmd, struct gpu_buffer *src, uint64_t src_off,
                 struct gpu_buffer *dst, uint64_t dst_off, uint64_t size);
int gpu_cmd_fill(struct gpu_cmd *cmd, struct gpu_buffer *dst, uint64_t off, uint64_t size,
                 uint32_t value);
/* Ends the recording and submits it; returns the recording's first error instead, if any. */
int gpu_cmd_submit(struct gpu_cmd *cmd);
/* Blocks until the submission finishes (never call on the event-loop thread). */
int gpu_cmd_wait(struct gpu_cmd *cmd);

struct gpu_timing {
  const char *label;
  double ns;
};
/* Per-dispatch GPU times of the last finished submission; 0 entries where timestamps are absent. */
uint32_t gpu_cmd_timings(const struct gpu_cmd *cmd, const struct gpu_timing **ret);

/* Splits n workgroups over a 2D grid within maxComputeWorkGroupCount (shaders index rows as
 * y * num_groups.x + x and return on overshoot). */
void gpu_grid_2d(const struct gpu_device *dev, uint32_t n, uint32_t *ret_x, uint32_t *ret_y);

#endif
