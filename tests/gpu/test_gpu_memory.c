/* The device-memory allocator and transfers on a real Vulkan device (lavapipe in CI). */
#include "gpu_fixture.h"
#include "kvd_error.h"

#include <pthread.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

KT_TEST(suballocations_are_aligned_and_share_blocks) {
  FIXTURE_DEVICE(dev);
  const struct gpu_caps *c = gpu_device_caps(dev);
  struct gpu_buffer *b[16];
  for (int i = 0; i < 16; i++) {
    KT_ASSERT_OK(gpu_buffer_new(dev, kt_rand_range(1, 100000), GPU_MEM_DEVICE, "t", &b[i]));
    uint32_t blk;
    uint64_t off;
    gpu_buffer_placement(b[i], &blk, &off);
    KT_CHECK_EQ(off % c->min_storage_align, 0);
  }
  struct gpu_mem_stats st;
  gpu_memory_stats(dev, &st);
  /* 16 small buffers fit one default block: sub-allocation, not one VkDeviceMemory each. */
  KT_CHECK(st.n_blocks < 16);
  KT_CHECK_EQ(st.n_buffers, 16);
  for (int i = 0; i < 16; i++)
    gpu_buffer_free(b[i]);
  gpu_memory_stats(dev, &st);
  KT_CHECK_EQ(st.n_buffers, 0);
  KT_CHECK_EQ(st.allocated, 0);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(freed_space_is_reused) {
  FIXTURE_DEVICE(dev);
  struct gpu_buffer *a, *b;
  KT_ASSERT_OK(gpu_buffer_new(dev, 1 << 20, GPU_MEM_DEVICE, "a", &a));
  uint32_t blk_a;
  uint64_t off_a;
  gpu_buffer_placement(a, &blk_a, &off_a);
  struct gpu_mem_stats before;
  gpu_memory_stats(dev, &before);
  gpu_buffer_free(a);
  KT_ASSERT_OK(gpu_buffer_new(dev, 1 << 20, GPU_MEM_DEVICE, "b", &b));
  uint32_t blk_b;
  uint64_t off_b;
  gpu_buffer_placement(b, &blk_b, &off_b);
  struct gpu_mem_stats after;
  gpu_memory_stats(dev, &after);
  KT_CHECK_EQ(blk_b, blk_a);
  KT_CHECK_EQ(off_b, off_a);
  KT_CHECK_EQ(after.reserved, before.reserved); /* no new VkDeviceMemory */
  gpu_buffer_free(b);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(exhaustion_returns_device_oom) {
  FIXTURE_DEVICE(unused);
  (void)unused;
  /* A second device with a 4 MiB cap: running out must be an error value, never an abort. */
  struct gpu_instance *inst;
  KT_ASSERT_OK(gpu_instance_new(&(struct gpu_instance_opts){.validate = true}, &inst));
  struct gpu_device *dev;
  int rc = gpu_device_new(
      inst, &(struct gpu_device_opts){.mem_limit = 4 << 20, .block_size = 1 << 20}, &dev);
  if (rc < 0) gpu_instance_free(inst);
  KT_ASSERT_OK(rc);
  struct gpu_buffer *bufs[64];
  int n = 0;
  for (; n < 64; n++) {
    rc = gpu_buffer_new(dev, 256 << 10, GPU_MEM_DEVICE, "fill", &bufs[n]);
    if (rc < 0) break;
  }
  KT_CHECK_EQ(rc, KVD_E_DEVICE_OOM);
  KT_CHECK(n >= 12 && n <= 16); /* 4 MiB / 256 KiB, less alignment slack */
  struct gpu_buffer *big;
  KT_CHECK_EQ(gpu_buffer_new(dev, 8 << 20, GPU_MEM_DEVICE, "too big", &big), KVD_E_DEVICE_OOM);
  /* Memory comes back: after freeing, the same requests succeed again. */
  for (int i = 0; i < n; i++)
    gpu_buffer_free(bufs[i]);
  struct gpu_buffer *again;
  KT_CHECK_EQ(gpu_buffer_new(dev, 256 << 10, GPU_MEM_DEVICE, "again", &again), 0);
  if (!kt__failed()) gpu_buffer_free(again);
  uint32_t verr = gpu_instance_validation_errors(inst);
  gpu_device_free(dev);
  gpu_instance_free(inst);
  KT_ASSERT_EQ(verr, 0);
}

static void roundtrip(struct gpu_device *dev, enum gpu_mem_kind kind, uint64_t size) {
  uint8_t *src = malloc(size), *dst = malloc(size);
  KT_ASSERT(src && dst);
  for (uint64_t i = 0; i < size; i++)
    src[i] = (uint8_t)kt_rand_u64();
  struct gpu_buffer *b;
  int rc = gpu_buffer_new(dev, size + 64, kind, "roundtrip", &b);
  if (rc < 0) {
    free(src);
    free(dst);
  }
  KT_ASSERT_OK(rc);
  rc = gpu_buffer_upload(dev, b, 64, src, size);
  if (rc == 0) rc = gpu_buffer_download(dev, b, 64, dst, size);
  gpu_buffer_free(b);
  KT_CHECK_EQ(rc, 0);
  KT_CHECK(memcmp(src, dst, size) == 0);
  free(src);
  free(dst);
}

KT_TEST(upload_download_round_trip_every_kind) {
  FIXTURE_DEVICE(dev);
  roundtrip(dev, GPU_MEM_DEVICE, 12345);
  roundtrip(dev, GPU_MEM_HOST, 777);
  roundtrip(dev, GPU_MEM_MAPPABLE, 4096);
  /* Larger than one staging chunk: exercises the chunked path. */
  roundtrip(dev, GPU_MEM_DEVICE, (40u << 20) + 13);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(out_of_range_transfers_are_refused) {
  FIXTURE_DEVICE(dev);
  struct gpu_buffer *b;
  KT_ASSERT_OK(gpu_buffer_new(dev, 1024, GPU_MEM_DEVICE, "small", &b));
  char tmp[2048] = {0};
  KT_CHECK_EQ(gpu_buffer_upload(dev, b, 512, tmp, 1024), KVD_ERANGE);
  KT_CHECK_EQ(gpu_buffer_download(dev, b, 2000, tmp, 1), KVD_ERANGE);
  gpu_buffer_free(b);
  FIXTURE_CHECK_VALIDATION();
}

KT_TEST(caps_report_real_limits) {
  FIXTURE_DEVICE(dev);
  const struct gpu_caps *c = gpu_device_caps(dev);
  KT_CHECK(c->subgroup_size >= 1);
  KT_CHECK(c->max_shared_bytes >= 16384); /* Vulkan's guaranteed minimum */
  KT_CHECK(c->max_storage_range >= (1u << 27));
  KT_CHECK(c->max_wg_invocations >= 128);
  KT_CHECK(c->n_heaps >= 1 && c->heaps[0].size > 0);
  KT_CHECK(c->max_alloc_size > 0);
  kt_log("%s: subgroup %u, shared %u, storage range %llu", c->name, c->subgroup_size,
         c->max_shared_bytes, (unsigned long long)c->max_storage_range);
}

/* ---- several threads on one device (models loading at once on libuv's threadpool) ---- */

#define LOADERS 8
#define CHURNERS 2

struct load_thread {
  struct gpu_device *dev;
  pthread_barrier_t *start;
  uint64_t free_seen; /* free memory measured under the budget lock */
  uint64_t taken;     /* bytes allocated from it */
  struct gpu_buffer *bufs[4];
  int rc;
};

/* A model load's KV sizing: measure the free memory, take a quarter of it, in a few buffers. */
static void *load_main(void *arg) {
  struct load_thread *t = arg;
  pthread_barrier_wait(t->start);
  gpu_device_budget_lock(t->dev);
  t->free_seen = gpu_device_free_memory(t->dev);
  uint64_t part = t->free_seen / 4 / 4 / 4096 * 4096;
  t->rc = part ? 0 : KVD_E_DEVICE_OOM;
  for (int i = 0; i < 4 && t->rc == 0; i++) {
    t->rc = gpu_buffer_new(t->dev, part, GPU_MEM_DEVICE, "kv share", &t->bufs[i]);
    if (t->rc == 0) t->taken += part;
  }
  gpu_device_budget_unlock(t->dev);
  return NULL;
}

struct churn_thread {
  struct gpu_device *dev;
  pthread_barrier_t *start;
  uint32_t seed;
  int rc;
  uint64_t snapshots;
};

/* Small buffers coming and going (weights, activations of other engines) and budget snapshots
 * taken meanwhile: the allocator's lists and the heap numbers are shared state. */
static void *churn_main(void *arg) {
  struct churn_thread *t = arg;
  pthread_barrier_wait(t->start);
  struct gpu_buffer *live[4] = {0};
  for (int i = 0; i < 400 && t->rc == 0; i++) {
    t->seed = t->seed * 1103515245u + 12345u;
    int slot = (int)(t->seed >> 16) % 4;
    if (live[slot]) {
      gpu_buffer_free(live[slot]);
      live[slot] = NULL;
    } else {
      t->rc = gpu_buffer_new(t->dev, 4096 + (t->seed >> 20) % 16384, GPU_MEM_DEVICE, "churn",
                             &live[slot]);
    }
    struct gpu_heap heaps[GPU_MAX_HEAPS];
    uint32_t n = gpu_device_heaps(t->dev, heaps);
    for (uint32_t h = 0; h < n; h++)
      if (heaps[h].device_local && heaps[h].budget > heaps[h].usage) t->snapshots++;
  }
  for (int i = 0; i < 4; i++)
    gpu_buffer_free(live[i]);
  return NULL;
}

/* Eight loads size their share of free memory at once, on a device capped at 64 MiB, while other
 * threads allocate and free and read the budget. Under the budget lock each load measures what
 * the others left, so all fit; without it (the engine's KV sizing before) all eight saw the same
 * 64 MiB, took a quarter each, and the limit refused most of them. The totals add up after. */
KT_TEST(concurrent_loads_share_free_memory) {
  FIXTURE_DEVICE(unused);
  (void)unused;
  const uint64_t limit = 64ull << 20;
  struct gpu_instance *inst;
  KT_ASSERT_OK(gpu_instance_new(&(struct gpu_instance_opts){.validate = true}, &inst));
  struct gpu_device *dev;
  int rc = gpu_device_new(inst, &(struct gpu_device_opts){.mem_limit = limit, .block_size = 1 << 20},
                          &dev);
  if (rc < 0) gpu_instance_free(inst);
  KT_ASSERT_OK(rc);
  uint64_t free0 = gpu_device_free_memory(dev);
  KT_CHECK(free0 <= limit); /* the limit caps the budget */
  KT_CHECK(free0 >= limit / 2);

  pthread_barrier_t start;
  KT_ASSERT_OK(pthread_barrier_init(&start, NULL, LOADERS + CHURNERS));
  struct load_thread lt[LOADERS];
  struct churn_thread ct[CHURNERS];
  pthread_t tid[LOADERS + CHURNERS];
  for (int i = 0; i < LOADERS; i++) {
    lt[i] = (struct load_thread){.dev = dev, .start = &start};
    KT_ASSERT_OK(pthread_create(&tid[i], NULL, load_main, &lt[i]));
  }
  for (int i = 0; i < CHURNERS; i++) {
    ct[i] = (struct churn_thread){.dev = dev, .start = &start, .seed = 7u + (uint32_t)i};
    KT_ASSERT_OK(pthread_create(&tid[LOADERS + i], NULL, churn_main, &ct[i]));
  }
  for (int i = 0; i < LOADERS + CHURNERS; i++)
    pthread_join(tid[i], NULL);
  pthread_barrier_destroy(&start);

  uint64_t taken = 0;
  uint32_t n_bufs = 0;
  for (int i = 0; i < LOADERS; i++) {
    KT_CHECK_MSG(lt[i].rc == 0, "load %d: %s after measuring %llu free", i, kvd_strerror(lt[i].rc),
                 (unsigned long long)lt[i].free_seen);
    /* Each measured after the others took theirs: nobody saw the whole device again. */
    taken += lt[i].taken;
    for (int b = 0; b < 4; b++)
      n_bufs += lt[i].bufs[b] != NULL;
  }
  for (int i = 0; i < CHURNERS; i++) {
    KT_CHECK_EQ(ct[i].rc, 0);
    KT_CHECK(ct[i].snapshots > 0);
  }
  struct gpu_mem_stats st;
  gpu_memory_stats(dev, &st);
  KT_CHECK_EQ(st.n_buffers, n_bufs);
  KT_CHECK(st.allocated >= taken); /* spans round sizes up */
  KT_CHECK(st.reserved <= limit);
  KT_CHECK(taken <= free0);
  /* The snapshot agrees with the allocator: what kvd reserved is counted as used. */
  struct gpu_heap heaps[GPU_MAX_HEAPS];
  uint32_t nh = gpu_device_heaps(dev, heaps);
  uint64_t usage = 0;
  for (uint32_t h = 0; h < nh; h++)
    if (heaps[h].device_local) usage += heaps[h].usage;
  KT_CHECK(usage >= st.device_local);
  KT_CHECK(gpu_device_free_memory(dev) <= limit - st.reserved);
  kt_log("%llu of %llu bytes free at the start taken by %d loads, %llu reserved",
         (unsigned long long)taken, (unsigned long long)free0, LOADERS,
         (unsigned long long)st.reserved);

  for (int i = 0; i < LOADERS; i++)
    for (int b = 0; b < 4; b++)
      gpu_buffer_free(lt[i].bufs[b]);
  gpu_memory_stats(dev, &st);
  KT_CHECK_EQ(st.n_buffers, 0);
  KT_CHECK_EQ(st.allocated, 0);
  uint32_t verr = gpu_instance_validation_errors(inst);
  gpu_device_free(dev);
  gpu_instance_free(inst);
  KT_ASSERT_EQ(verr, 0);
}

/* Proves the validation layer is live and wired to the counter the other tests assert on: an
 * invalid Vulkan call (a zero-size buffer) made on a private instance must be counted. */
#include "gpu_internal.h"

KT_TEST(validation_errors_are_counted) {
  FIXTURE_DEVICE(unused);
  (void)unused;
  struct gpu_instance *inst;
  KT_ASSERT_OK(gpu_instance_new(&(struct gpu_instance_opts){.validate = true}, &inst));
  struct gpu_device *dev;
  int rc = gpu_device_new(inst, NULL, &dev);
  if (rc < 0) gpu_instance_free(inst);
  KT_ASSERT_OK(rc);
  KT_CHECK_EQ(gpu_instance_validation_errors(inst), 0);
  VkBufferCreateInfo bad = {
      .sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO,
      .size = 0, /* VUID-VkBufferCreateInfo-size-00912 */
      .usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT,
  };
  VkBuffer buf = VK_NULL_HANDLE;
  fprintf(stderr, "# the next validation error is expected:\n");
  if (vkCreateBuffer(dev->device, &bad, NULL, &buf) == VK_SUCCESS && buf)
    vkDestroyBuffer(dev->device, buf, NULL);
  KT_CHECK(gpu_instance_validation_errors(inst) >= 1);
  gpu_device_free(dev);
  gpu_instance_free(inst);
}
