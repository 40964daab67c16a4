#include "gpu_internal.h"

#include "kvd_error.h"

#include <string.h>

/* Staging is bounded so a multi-GiB weight upload never needs a multi-GiB host buffer. */
#define STAGING_CHUNK (16ull << 20)

static int transfer_prepare(struct gpu_device *dev, uint64_t want) {
  uint64_t size = want < STAGING_CHUNK ? want : STAGING_CHUNK;
  if (dev->staging && gpu_buffer_size(dev->staging) < size) {
    gpu_buffer_free(dev->staging);
    dev->staging = NULL;
  }
  if (!dev->staging) {
    int rc = gpu_buffer_new(dev, size, GPU_MEM_HOST, "kvd staging", &dev->staging);
    if (rc < 0) return rc;
  }
  if (!dev->xfer_cmd) return gpu_cmd_new(dev, &dev->xfer_cmd);
  return 0;
}

static int transfer_check(const struct gpu_buffer *buf, uint64_t offset, uint64_t size) {
  if (offset > buf->size || size > buf->size - offset)
    return gpu__fail(KVD_ERANGE, "transfer [%llu, +%llu) outside buffer of %llu bytes",
                     (unsigned long long)offset, (unsigned long long)size,
                     (unsigned long long)buf->size);
  return 0;
}

static int transfer_copy(struct gpu_device *dev, struct gpu_buffer *src, uint64_t so,
                         struct gpu_buffer *dst, uint64_t dof, uint64_t n) {
  struct gpu_cmd *cmd = dev->xfer_cmd;
  int rc = gpu_cmd_begin(cmd);
  if (rc < 0) return rc;
  rc = gpu_cmd_copy(cmd, src, so, dst, dof, n);
  int rc2 = gpu_cmd_submit(cmd);
  if (rc < 0) return rc;
  if (rc2 < 0) return rc2;
  return gpu_cmd_wait(cmd);
}

int gpu_buffer_upload(struct gpu_device *dev, struct gpu_buffer *dst, uint64_t offset,
                      const void *src, uint64_t size) {
  int rc = transfer_check(dst, offset, size);
  if (rc < 0 || size == 0) return rc;
  if (dst->mapped) {
    memcpy((uint8_t *)dst->mapped + offset, src, size);
    return 0;
  }
  pthread_mutex_lock(&dev->xfer_lock);
  rc = transfer_prepare(dev, size);
  for (uint64_t done = 0; rc == 0 && done < size;) {
    uint64_t n =
        size - done < gpu_buffer_size(dev->staging) ? size - done : gpu_buffer_size(dev->staging);
    memcpy(dev->staging->mapped, (const uint8_t *)src + done, n);
    rc = transfer_copy(dev, dev->staging, 0, dst, offset + done, n);
    done += n;
  }
  pthread_mutex_unlock(&dev->xfer_lock);
  return rc;
}

int gpu_buffer_download(struct gpu_device *dev, struct gpu_buffer *src, uint64_t offset, void *dst,
                        uint64_t size) {
  int rc = transfer_check(src, offset, size);
  if (rc < 0 || size == 0) return rc;
  if (src->mapped) {
    memcpy(dst, (const uint8_t *)src->mapped + offset, size);
    return 0;
  }
  pthread_mutex_lock(&dev->xfer_lock);
  rc = transfer_prepare(dev, size);
  for (uint64_t done = 0; rc == 0 && done < size;) {
    uint64_t n =
        size - done < gpu_buffer_size(dev->staging) ? size - done : gpu_buffer_size(dev->staging);
    rc = transfer_copy(dev, src, offset + done, dev->staging, 0, n);
    if (rc == 0) memcpy((uint8_t *)dst + done, dev->staging->mapped, n);
    done += n;
  }
  pthread_mutex_unlock(&dev->xfer_lock);
  return rc;
}
