/* The free-list range allocator under the device-memory allocator: alignment, exhaustion,
 * coalescing and reuse, with a shadow bitmap proving no two live ranges overlap. */
#include "gpu_range.h"
#include "kt.h"
#include "kvd_error.h"

#include <stdlib.h>
#include <string.h>

KT_TEST(alignment_is_honoured) {
  struct gpu_range r;
  KT_ASSERT_OK(gpu_range_init(&r, 1 << 20));
  uint64_t off;
  KT_ASSERT_OK(gpu_range_alloc(&r, 3, 1, &off));
  KT_ASSERT_EQ(off, 0);
  for (uint64_t align = 2; align <= 65536; align <<= 1) {
    KT_ASSERT_OK(gpu_range_alloc(&r, 7, align, &off));
    KT_ASSERT_EQ(off % align, 0);
  }
  KT_CHECK_EQ(gpu_range_alloc(&r, 8, 3, &off), KVD_EINVAL); /* not a power of two */
  KT_CHECK_EQ(gpu_range_alloc(&r, 0, 4, &off), KVD_EINVAL);
  gpu_range_destroy(&r);
}

KT_TEST(exhaustion_is_an_error_not_a_crash) {
  struct gpu_range r;
  KT_ASSERT_OK(gpu_range_init(&r, 1000));
  uint64_t off;
  KT_ASSERT_OK(gpu_range_alloc(&r, 600, 1, &off));
  KT_ASSERT_EQ(gpu_range_alloc(&r, 401, 1, &off), KVD_ENOSPC);
  KT_ASSERT_OK(gpu_range_alloc(&r, 400, 1, &off));
  KT_ASSERT_EQ(r.used, 1000);
  KT_ASSERT_EQ(gpu_range_alloc(&r, 1, 1, &off), KVD_ENOSPC);
  gpu_range_destroy(&r);
}

KT_TEST(free_coalesces_and_space_is_reused) {
  struct gpu_range r;
  KT_ASSERT_OK(gpu_range_init(&r, 4096));
  uint64_t a, b, c;
  KT_ASSERT_OK(gpu_range_alloc(&r, 1024, 256, &a));
  KT_ASSERT_OK(gpu_range_alloc(&r, 1024, 256, &b));
  KT_ASSERT_OK(gpu_range_alloc(&r, 1024, 256, &c));
  /* Free out of order: the three must merge back into one span covering everything. */
  KT_ASSERT_OK(gpu_range_free(&r, b, 1024));
  KT_ASSERT_OK(gpu_range_free(&r, a, 1024));
  KT_ASSERT_OK(gpu_range_free(&r, c, 1024));
  KT_ASSERT_EQ(r.n_free, 1);
  KT_ASSERT_EQ(gpu_range_largest(&r), 4096);
  uint64_t big;
  KT_ASSERT_OK(gpu_range_alloc(&r, 4096, 4096, &big));
  KT_ASSERT_EQ(big, 0);
  KT_ASSERT_OK(gpu_range_free(&r, big, 4096));
  gpu_range_destroy(&r);
}

KT_TEST(double_free_and_overlap_are_refused) {
  struct gpu_range r;
  KT_ASSERT_OK(gpu_range_init(&r, 4096));
  uint64_t a;
  KT_ASSERT_OK(gpu_range_alloc(&r, 512, 1, &a));
  KT_ASSERT_OK(gpu_range_free(&r, a, 512));
  KT_ASSERT_EQ(gpu_range_free(&r, a, 512), KVD_EINVAL);
  KT_ASSERT_EQ(gpu_range_free(&r, 4000, 200), KVD_EINVAL); /* past the end */
  gpu_range_destroy(&r);
}

/* Random alloc/free churn against a byte-map shadow: no overlap, alignment always right, and
 * everything coalesces back to one span at the end. */
KT_TEST(random_churn_never_overlaps) {
  enum { SIZE = 1 << 16, LIVE = 64 };
  struct gpu_range r;
  KT_ASSERT_OK(gpu_range_init(&r, SIZE));
  unsigned char *shadow = calloc(SIZE, 1);
  KT_ASSERT(shadow);
  uint64_t off[LIVE] = {0}, len[LIVE] = {0};
  for (int step = 0; step < 20000 && !kt__failed(); step++) {
    int i = (int)kt_rand_range(0, LIVE - 1);
    if (len[i]) {
      KT_CHECK_EQ(gpu_range_free(&r, off[i], len[i]), 0);
      memset(shadow + off[i], 0, len[i]);
      len[i] = 0;
    } else {
      uint64_t n = kt_rand_range(1, 3000);
      uint64_t align = 1ull << kt_rand_range(0, 8);
      uint64_t o;
      int rc = gpu_range_alloc(&r, n, align, &o);
      if (rc == KVD_ENOSPC) continue;
      KT_CHECK_EQ(rc, 0);
      KT_CHECK_EQ(o % align, 0);
      KT_CHECK(o + n <= SIZE);
      for (uint64_t k = 0; k < n; k++)
        KT_CHECK(shadow[o + k] == 0);
      memset(shadow + o, 1, n);
      off[i] = o;
      len[i] = n;
    }
  }
  for (int i = 0; i < LIVE; i++)
    if (len[i]) gpu_range_free(&r, off[i], len[i]);
  KT_CHECK_EQ(r.used, 0);
  KT_CHECK_EQ(r.n_free, 1);
  free(shadow);
  gpu_range_destroy(&r);
}
