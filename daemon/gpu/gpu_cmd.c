#include "gpu_internal.h"

#include "kvd_error.h"

#include <stdlib.h>
#include <string.h>

/* Descriptor sets come from pools reset at every begin: a step records many dispatches, each
 * with its own small set, and none outlives the submission. */
#define POOL_SETS 256
#define MAX_POOLS 64
#define MAX_TIMED 1024 /* dispatches timed per submission; later ones run untimed */

struct gpu_cmd {
  struct gpu_device *dev;
  VkCommandPool pool;
  VkCommandBuffer cb;
  VkFence fence;
  VkDescriptorPool pools[MAX_POOLS];
  uint32_t n_pools, cur_pool;
  VkQueryPool queries;
  uint32_t n_timed;
  const char *labels[MAX_TIMED];
  struct gpu_timing timings[MAX_TIMED];
  uint32_t n_timings;
  bool recording;
  bool pending; /* submitted, not yet waited for */
  /* The first error since gpu_cmd_begin (see gpu.h): once set, record calls do nothing and
   * gpu_cmd_submit returns it instead of submitting a half-recorded buffer. */
  int error;
};

int gpu_cmd_new(struct gpu_device *dev, struct gpu_cmd **ret) {
  struct gpu_cmd *cmd = calloc(1, sizeof *cmd);
  if (!cmd) return KVD_ENOMEM;
  cmd->dev = dev;
  VkCommandPoolCreateInfo pci = {
      .sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
      .flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT,
      .queueFamilyIndex = dev->queue_family,
  };
  int rc =
      gpu__check(vkCreateCommandPool(dev->device, &pci, NULL, &cmd->pool), "vkCreateCommandPool");
  if (rc < 0) goto fail;
  VkCommandBufferAllocateInfo ai = {
      .sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO,
      .commandPool = cmd->pool,
      .level = VK_COMMAND_BUFFER_LEVEL_PRIMARY,
      .commandBufferCount = 1,
  };
  rc = gpu__check(vkAllocateCommandBuffers(dev->device, &ai, &cmd->cb), "vkAllocateCommandBuffers");
  if (rc < 0) goto fail;
  VkFenceCreateInfo fci = {.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
  rc = gpu__check(vkCreateFence(dev->device, &fci, NULL, &cmd->fence), "vkCreateFence");
  if (rc < 0) goto fail;
  if (dev->caps.timestamps) {
    VkQueryPoolCreateInfo qci = {
        .sType = VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO,
        .queryType = VK_QUERY_TYPE_TIMESTAMP,
        .queryCount = 2 * MAX_TIMED,
    };
    rc = gpu__check(vkCreateQueryPool(dev->device, &qci, NULL, &cmd->queries), "vkCreateQueryPool");
    if (rc < 0) goto fail;
  }
  *ret = cmd;
  return 0;
fail:
  gpu_cmd_free(cmd);
  return rc;
}

void gpu_cmd_free(struct gpu_cmd *cmd) {
  if (!cmd) return;
  VkDevice d = cmd->dev->device;
  if (cmd->pending) vkWaitForFences(d, 1, &cmd->fence, VK_TRUE, UINT64_MAX);
  for (uint32_t i = 0; i < cmd->n_pools; i++)
    vkDestroyDescriptorPool(d, cmd->pools[i], NULL);
  if (cmd->queries) vkDestroyQueryPool(d, cmd->queries, NULL);
  if (cmd->fence) vkDestroyFence(d, cmd->fence, NULL);
  if (cmd->pool) vkDestroyCommandPool(d, cmd->pool, NULL);
  free(cmd);
}

static int cmd_record_error(struct gpu_cmd *cmd, int rc) {
  if (!cmd->error) cmd->error = rc;
  return cmd->error;
}

int gpu_cmd_fail(struct gpu_cmd *cmd, int rc) {
  return rc < 0 ? cmd_record_error(cmd, rc) : rc;
}

int gpu_cmd_error(const struct gpu_cmd *cmd) {
  return cmd->error;
}

int gpu_cmd_begin(struct gpu_cmd *cmd) {
  /* A begin during a recording poisons that recording (its submit fails); one while a
   * submission is in flight is refused alone, and the next begin starts clean either way. */
  if (cmd->recording)
    return cmd_record_error(cmd, gpu__fail(KVD_EINVAL, "gpu_cmd_begin during a recording"));
  if (cmd->pending) return gpu__fail(KVD_EINVAL, "gpu_cmd_begin: previous submission not finished");
  VkDevice d = cmd->dev->device;
  for (uint32_t i = 0; i < cmd->n_pools; i++)
    vkResetDescriptorPool(d, cmd->pools[i], 0);
  cmd->cur_pool = 0;
  cmd->n_timed = 0;
  cmd->n_timings = 0;
  cmd->error = 0;
  int rc = gpu__check(vkResetCommandBuffer(cmd->cb, 0), "vkResetCommandBuffer");
  if (rc < 0) return cmd_record_error(cmd, rc);
  VkCommandBufferBeginInfo bi = {
      .sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
      .flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT,
  };
  rc = gpu__check(vkBeginCommandBuffer(cmd->cb, &bi), "vkBeginCommandBuffer");
  if (rc < 0) return cmd_record_error(cmd, rc);
  if (cmd->queries) vkCmdResetQueryPool(cmd->cb, cmd->queries, 0, 2 * MAX_TIMED);
  cmd->recording = true;
  return 0;
}

static int cmd_alloc_set(struct gpu_cmd *cmd, VkDescriptorSetLayout layout, VkDescriptorSet *ret) {
  VkDevice d = cmd->dev->device;
  for (;;) {
    if (cmd->cur_pool == cmd->n_pools) {
      if (cmd->n_pools == MAX_POOLS)
        return gpu__fail(KVD_E_LIMIT, "more than %d dispatches in one submission",
                         MAX_POOLS * POOL_SETS);
      VkDescriptorPoolSize size = {
          .type = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
          .descriptorCount = POOL_SETS * GPU_MAX_BINDINGS,
      };
      VkDescriptorPoolCreateInfo ci = {
          .sType = VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO,
          .maxSets = POOL_SETS,
          .poolSizeCount = 1,
          .pPoolSizes = &size,
      };
      int rc = gpu__check(vkCreateDescriptorPool(d, &ci, NULL, &cmd->pools[cmd->n_pools]),
                          "vkCreateDescriptorPool");
      if (rc < 0) return rc;
      cmd->n_pools++;
    }
    VkDescriptorSetAllocateInfo ai = {
        .sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO,
        .descriptorPool = cmd->pools[cmd->cur_pool],
        .descriptorSetCount = 1,
        .pSetLayouts = &layout,
    };
    VkResult r = vkAllocateDescriptorSets(d, &ai, ret);
    if (r == VK_SUCCESS) return 0;
    if (r != VK_ERROR_OUT_OF_POOL_MEMORY && r != VK_ERROR_FRAGMENTED_POOL)
      return gpu__check(r, "vkAllocateDescriptorSets");
    cmd->cur_pool++;
  }
}

/* 0 when a record call may record; else the error it returns without recording anything. */
static int cmd_check_recording(struct gpu_cmd *cmd, const char *what) {
  if (cmd->error) return cmd->error;
  if (!cmd->recording)
    return cmd_record_error(cmd, gpu__fail(KVD_EINVAL, "%s outside begin/submit", what));
  return 0;
}

int gpu_cmd_dispatch(struct gpu_cmd *cmd, const struct gpu_pipeline *pipe,
                     const struct gpu_binding *bindings, uint32_t n_bindings, const void *push,
                     uint32_t push_size, uint32_t gx, uint32_t gy, uint32_t gz, const char *label) {
  const struct gpu_caps *c = &cmd->dev->caps;
  int rc = cmd_check_recording(cmd, "gpu_cmd_dispatch");
  if (rc < 0) return rc;
  if (n_bindings != pipe->n_buffers || push_size != pipe->push_size)
    return cmd_record_error(
        cmd,
        gpu__fail(KVD_EINVAL, "dispatch '%s': %u bindings / %u push bytes, pipeline wants %u / %u",
                  pipe->name, n_bindings, push_size, pipe->n_buffers, pipe->push_size));
  uint32_t g[3] = {gx, gy, gz};
  for (int i = 0; i < 3; i++)
    if (g[i] == 0 || g[i] > c->max_wg_count[i])
      return cmd_record_error(cmd, gpu__fail(KVD_E_LIMIT,
                                             "dispatch '%s': workgroup count[%d]=%u outside 1..%u",
                                             pipe->name, i, g[i], c->max_wg_count[i]));

  VkDescriptorBufferInfo infos[GPU_MAX_BINDINGS];
  VkWriteDescriptorSet writes[GPU_MAX_BINDINGS];
  VkDescriptorSet set;
  rc = cmd_alloc_set(cmd, pipe->set_layout, &set);
  if (rc < 0) return cmd_record_error(cmd, rc);
  for (uint32_t i = 0; i < n_bindings; i++) {
    const struct gpu_binding *b = &bindings[i];
    uint64_t size = b->buf->size;
    uint64_t range = b->range ? b->range : (b->offset < size ? size - b->offset : 0);
    if (b->offset >= size || range > size - b->offset)
      return cmd_record_error(
          cmd,
          gpu__fail(KVD_ERANGE, "dispatch '%s': binding %u [%llu, +%llu) outside buffer of %llu",
                    pipe->name, i, (unsigned long long)b->offset, (unsigned long long)range,
                    (unsigned long long)size));
    if (range > c->max_storage_range)
      return cmd_record_error(
          cmd,
          gpu__fail(KVD_E_LIMIT,
                    "dispatch '%s': binding %u range %llu > maxStorageBufferRange %llu", pipe->name,
                    i, (unsigned long long)range, (unsigned long long)c->max_storage_range));
    if (c->min_storage_align && b->offset % c->min_storage_align)
      return cmd_record_error(
          cmd, gpu__fail(KVD_EINVAL, "dispatch '%s': binding %u offset %llu not aligned to %llu",
                         pipe->name, i, (unsigned long long)b->offset,
                         (unsigned long long)c->min_storage_align));
    infos[i] =
        (VkDescriptorBufferInfo){.buffer = b->buf->buffer, .offset = b->offset, .range = range};
    writes[i] = (VkWriteDescriptorSet){
        .sType = VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET,
        .dstSet = set,
        .dstBinding = i,
        .descriptorCount = 1,
        .descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
        .pBufferInfo = &infos[i],
    };
  }
  vkUpdateDescriptorSets(cmd->dev->device, n_bindings, writes, 0, NULL);

  bool timed = cmd->queries && cmd->n_timed < MAX_TIMED;
  if (timed)
    vkCmdWriteTimestamp(cmd->cb, VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, cmd->queries, 2 * cmd->n_timed);
  vkCmdBindPipeline(cmd->cb, VK_PIPELINE_BIND_POINT_COMPUTE, pipe->pipeline);
  vkCmdBindDescriptorSets(cmd->cb, VK_PIPELINE_BIND_POINT_COMPUTE, pipe->layout, 0, 1, &set, 0,
                          NULL);
  if (push_size)
    vkCmdPushConstants(cmd->cb, pipe->layout, VK_SHADER_STAGE_COMPUTE_BIT, 0, push_size, push);
  vkCmdDispatch(cmd->cb, gx, gy, gz);
  if (timed) {
    vkCmdWriteTimestamp(cmd->cb, VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, cmd->queries,
                        2 * cmd->n_timed + 1);
    cmd->labels[cmd->n_timed++] = label ? label : pipe->name;
  }
  return 0;
}

static void cmd_memory_barrier(struct gpu_cmd *cmd, VkPipelineStageFlags dst_stage,
                               VkAccessFlags dst_access) {
  VkMemoryBarrier mb = {
      .sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER,
      .srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT,
      .dstAccessMask = dst_access,
  };
  vkCmdPipelineBarrier(cmd->cb,
                       VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT,
                       dst_stage, 0, 1, &mb, 0, NULL, 0, NULL);
}

void gpu_cmd_barrier(struct gpu_cmd *cmd) {
  if (cmd->error || !cmd->recording) return;
  cmd_memory_barrier(cmd, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT,
                     VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT |
                         VK_ACCESS_TRANSFER_READ_BIT | VK_ACCESS_TRANSFER_WRITE_BIT);
}

static int cmd_check_span(struct gpu_cmd *cmd, const struct gpu_buffer *b, uint64_t off,
                          uint64_t size, const char *what) {
  int rc = cmd_check_recording(cmd, what);
  if (rc < 0) return rc;
  if (size == 0 || off > b->size || size > b->size - off)
    return cmd_record_error(cmd, gpu__fail(KVD_ERANGE, "%s: [%llu, +%llu) outside buffer of %llu",
                                           what, (unsigned long long)off, (unsigned long long)size,
                                           (unsigned long long)b->size));
  return 0;
}

int gpu_cmd_copy(struct gpu_cmd *cmd, struct gpu_buffer *src, uint64_t src_off,
                 struct gpu_buffer *dst, uint64_t dst_off, uint64_t size) {
  int rc = cmd_check_span(cmd, src, src_off, size, "gpu_cmd_copy source");
  if (rc == 0) rc = cmd_check_span(cmd, dst, dst_off, size, "gpu_cmd_copy destination");
  if (rc < 0) return rc;
  VkBufferCopy region = {.srcOffset = src_off, .dstOffset = dst_off, .size = size};
  vkCmdCopyBuffer(cmd->cb, src->buffer, dst->buffer, 1, &region);
  return 0;
}

int gpu_cmd_fill(struct gpu_cmd *cmd, struct gpu_buffer *dst, uint64_t off, uint64_t size,
                 uint32_t value) {
  int rc = cmd_check_span(cmd, dst, off, size, "gpu_cmd_fill");
  if (rc < 0) return rc;
  if (off % 4 || size % 4)
    return cmd_record_error(cmd, gpu__fail(KVD_EINVAL, "gpu_cmd_fill: offset and size must be "
                                                       "multiples of 4"));
  vkCmdFillBuffer(cmd->cb, dst->buffer, off, size, value);
  return 0;
}

int gpu_cmd_submit(struct gpu_cmd *cmd) {
  if (!cmd->recording) {
    if (cmd->error) return cmd->error; /* gpu_cmd_begin failed */
    return gpu__fail(KVD_EINVAL, "gpu_cmd_submit without begin");
  }
  /* Results must be visible to the host once the fence signals (mapped readback buffers). */
  if (!cmd->error) cmd_memory_barrier(cmd, VK_PIPELINE_STAGE_HOST_BIT, VK_ACCESS_HOST_READ_BIT);
  cmd->recording = false;
  int rc = gpu__check(vkEndCommandBuffer(cmd->cb), "vkEndCommandBuffer");
  if (cmd->error) return cmd->error; /* something was refused: never run a partial step */
  if (rc < 0) return rc;
  VkSubmitInfo si = {
      .sType = VK_STRUCTURE_TYPE_SUBMIT_INFO,
      .commandBufferCount = 1,
      .pCommandBuffers = &cmd->cb,
  };
  rc = gpu__check(vkResetFences(cmd->dev->device, 1, &cmd->fence), "vkResetFences");
  if (rc < 0) return rc;
  pthread_mutex_lock(&cmd->dev->queue_lock);
  VkResult r = vkQueueSubmit(cmd->dev->queue, 1, &si, cmd->fence);
  pthread_mutex_unlock(&cmd->dev->queue_lock);
  rc = gpu__check(r, "vkQueueSubmit");
  if (rc < 0) return rc;
  cmd->pending = true;
  return 0;
}

int gpu_cmd_wait(struct gpu_cmd *cmd) {
  if (!cmd->pending) return gpu__fail(KVD_EINVAL, "gpu_cmd_wait without a submission");
  int rc = gpu__check(vkWaitForFences(cmd->dev->device, 1, &cmd->fence, VK_TRUE, UINT64_MAX),
                      "vkWaitForFences");
  if (rc < 0) return rc;
  cmd->pending = false;
  cmd->n_timings = 0;
  if (cmd->n_timed) {
    uint64_t ts[2 * MAX_TIMED];
    VkResult r =
        vkGetQueryPoolResults(cmd->dev->device, cmd->queries, 0, 2 * cmd->n_timed, sizeof ts, ts,
                              sizeof ts[0], VK_QUERY_RESULT_64_BIT | VK_QUERY_RESULT_WAIT_BIT);
    if (r == VK_SUCCESS) {
      double period = cmd->dev->caps.timestamp_period;
      for (uint32_t i = 0; i < cmd->n_timed; i++) {
        cmd->timings[i].label = cmd->labels[i];
        cmd->timings[i].ns =
            ts[2 * i + 1] >= ts[2 * i] ? (double)(ts[2 * i + 1] - ts[2 * i]) * period : 0;
      }
      cmd->n_timings = cmd->n_timed;
    }
  }
  return 0;
}

uint32_t gpu_cmd_timings(const struct gpu_cmd *cmd, const struct gpu_timing **ret) {
  *ret = cmd->timings;
  return cmd->n_timings;
}
