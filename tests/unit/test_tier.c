/* The prefix cache's disk tier (daemon/tier): blocks read back exactly, the index survives a
 * reopen (oldest first), the budget drops the oldest files, another identity is another folder,
 * a damaged or torn file is deleted and never returned, leftovers of a crash are cleaned. */
#include "kt.h"
#include "kvd_error.h"
#include "tier.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BB 96u /* bytes per block here */

static void fill(uint8_t *b, uint64_t key) {
  for (uint32_t i = 0; i < BB; i++)
    b[i] = (uint8_t)(key * 31 + i);
}

static char *file_of(const char *root, const char *id, uint64_t key) {
  static char p[8400];
  snprintf(p, sizeof p, "%s/%s/%016llx.kvb", root, id, (unsigned long long)key);
  return p;
}

KT_TEST(blocks_round_trip_and_survive_a_reopen) {
  char root[2048];
  snprintf(root, sizeof root, "%s/tier1", kt_tmp_dir());
  struct tier_disk *t;
  KT_ASSERT_OK(tier_disk_open(root, "model-a-f16-b16", BB, 100 * (BB + 32), &t));
  uint8_t b[BB], got[BB];
  for (uint64_t k = 1; k <= 10; k++) {
    fill(b, k);
    KT_ASSERT_OK(tier_disk_put(t, k * 0x9e3779b97f4a7c15ull, b));
  }
  KT_CHECK(tier_disk_has(t, 3 * 0x9e3779b97f4a7c15ull) && !tier_disk_has(t, 12345));
  KT_CHECK_EQ(tier_disk_get(t, 12345, got), KVD_ENOENT);
  tier_disk_close(t);
  KT_ASSERT_OK(tier_disk_open(root, "model-a-f16-b16", BB, 100 * (BB + 32), &t));
  struct tier_disk_stats st;
  tier_disk_stats(t, &st);
  KT_CHECK_EQ(st.blocks, 10);
  for (uint64_t k = 1; k <= 10; k++) {
    fill(b, k);
    KT_ASSERT_OK(tier_disk_get(t, k * 0x9e3779b97f4a7c15ull, got));
    KT_CHECK(memcmp(b, got, BB) == 0);
  }
  tier_disk_close(t);
  /* Another identity: another folder, nothing in it. */
  KT_ASSERT_OK(tier_disk_open(root, "model-a-q8_0-b16", BB, 100 * (BB + 32), &t));
  tier_disk_stats(t, &st);
  KT_CHECK_EQ(st.blocks, 0);
  KT_CHECK(!tier_disk_has(t, 0x9e3779b97f4a7c15ull));
  tier_disk_close(t);
  KT_CHECK_EQ(tier_disk_open(root, "../up", BB, 1 << 20, &t), KVD_EINVAL);
  KT_CHECK_EQ(tier_disk_open(root, "a/b", BB, 1 << 20, &t), KVD_EINVAL);
}

KT_TEST(the_budget_drops_the_oldest) {
  char root[2048];
  snprintf(root, sizeof root, "%s/tier2", kt_tmp_dir());
  struct tier_disk *t;
  uint64_t file = 24 + BB + 8;
  KT_ASSERT_OK(tier_disk_open(root, "m", BB, 4 * file, &t));
  uint8_t b[BB];
  for (uint64_t k = 1; k <= 6; k++) {
    fill(b, k);
    KT_ASSERT_OK(tier_disk_put(t, k, b));
  }
  KT_CHECK(!tier_disk_has(t, 1) && !tier_disk_has(t, 2) && tier_disk_has(t, 3) &&
           tier_disk_has(t, 6));
  KT_CHECK(access(file_of(root, "m", 1), F_OK) != 0 && access(file_of(root, "m", 6), F_OK) == 0);
  struct tier_disk_stats st;
  tier_disk_stats(t, &st);
  KT_CHECK(st.blocks == 4 && st.bytes == 4 * file && st.evicted == 2);
  tier_disk_close(t);
}

KT_TEST(damaged_files_are_deleted_never_returned) {
  char root[2048];
  snprintf(root, sizeof root, "%s/tier3", kt_tmp_dir());
  struct tier_disk *t;
  KT_ASSERT_OK(tier_disk_open(root, "m", BB, 1 << 20, &t));
  uint8_t b[BB], got[BB];
  for (uint64_t k = 1; k <= 4; k++) {
    fill(b, k);
    KT_ASSERT_OK(tier_disk_put(t, k, b));
  }
  /* A flipped byte in the data, a header naming another key, a file cut short. */
  FILE *f = fopen(file_of(root, "m", 1), "r+b");
  fseek(f, 40, SEEK_SET);
  fputc(0x55, f);
  fclose(f);
  char from[8400];
  snprintf(from, sizeof from, "%s", file_of(root, "m", 3));
  KT_CHECK_EQ(rename(from, file_of(root, "m", 2)), 0); /* key 2's name, key 3's header */
  KT_CHECK_EQ(truncate(file_of(root, "m", 4), 50), 0);
  memset(got, 0, sizeof got);
  KT_CHECK_EQ(tier_disk_get(t, 1, got), KVD_E_CORRUPT);
  KT_CHECK_EQ(tier_disk_get(t, 2, got), KVD_E_CORRUPT);
  KT_CHECK_EQ(tier_disk_get(t, 4, got), KVD_E_CORRUPT);
  KT_CHECK(!tier_disk_has(t, 1) && !tier_disk_has(t, 2) && !tier_disk_has(t, 4));
  KT_CHECK(access(file_of(root, "m", 1), F_OK) != 0);
  tier_disk_close(t);
  /* A torn file and a crash's temporary are cleaned at open. */
  fill(b, 9);
  KT_ASSERT_OK(tier_disk_open(root, "m", BB, 1 << 20, &t));
  KT_ASSERT_OK(tier_disk_put(t, 9, b));
  tier_disk_close(t);
  KT_CHECK_EQ(truncate(file_of(root, "m", 9), 10), 0);
  char tmp[4400];
  snprintf(tmp, sizeof tmp, "%s/m/.0000000000000009.tmp", root);
  FILE *g = fopen(tmp, "wb");
  fclose(g);
  KT_ASSERT_OK(tier_disk_open(root, "m", BB, 1 << 20, &t));
  KT_CHECK(!tier_disk_has(t, 9) && access(tmp, F_OK) != 0);
  tier_disk_close(t);
}
