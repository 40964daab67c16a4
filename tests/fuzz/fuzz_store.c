/* libFuzzer target for session files (daemon/store). The input is a file's bytes; its last 8 are
 * replaced by the right checksum half of the time (the first byte's low bit), so mutations reach
 * the header and size checks behind it instead of all dying at the checksum. Oracles beyond
 * ASan/UBSan:
 *   - a read either fails holding nothing or succeeds with sizes that match the file exactly;
 *   - what succeeds writes back and reads again to the same ids, KV bytes and fields;
 *   - stat agrees with read on every header field it reports.
 * LLVMFuzzerInitialize writes a valid seed into each corpus folder given on the command line. */
#include "kvd_error.h"
#include "store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#define FAIL() (fprintf(stderr, "fuzz_store: check at line %d failed\n", __LINE__), abort())

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[256];

static void seed_into(const char *corpus) {
  struct store_session ss;
  memset(&ss, 0, sizeof ss);
  ss.id = (struct store_identity){{1, 2}, 1, 4, 24};
  snprintf(ss.model_name, sizeof ss.model_name, "m");
  ss.snap.n_hist = 9;
  int32_t hist[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  ss.snap.hist = hist;
  ss.snap.pending = 3;
  uint8_t kv[3 * 24] = {0};
  ss.snap.kv = (struct sched_kv_copy){.len = 9, .n_blocks = 3, .block_bytes = 24, .data = kv};
  if (store_session_write(corpus, "seed", &ss, NULL) == 0) {
    char from[4096], to[4096];
    snprintf(from, sizeof from, "%s/seed.kvs", corpus);
    snprintf(to, sizeof to, "%s/seed", corpus);
    rename(from, to);
  }
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  snprintf(dir, sizeof dir, "%s/kvd-fuzz-store-%ld", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp",
           (long)getpid());
  mkdir(dir, 0700);
  for (int i = 1; i < *argc; i++) {
    struct stat st;
    if ((*argv)[i][0] != '-' && stat((*argv)[i], &st) == 0 && S_ISDIR(st.st_mode))
      seed_into((*argv)[i]);
  }
  return 0;
}

static void write_input(const char *name, const uint8_t *data, size_t size) {
  char path[512];
  snprintf(path, sizeof path, "%s/%s.kvs", dir, name);
  FILE *f = fopen(path, "wb");
  if (!f) FAIL();
  if (size && fwrite(data, 1, size, f) != size) FAIL();
  fclose(f);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  uint8_t *buf = malloc(size ? size : 1);
  if (!buf) return 0;
  memcpy(buf, data, size);
  if (size > 8 && (data[0] & 1)) {
    uint64_t h = XXH3_64bits(buf, size - 8);
    for (int i = 0; i < 8; i++)
      buf[size - 8 + i] = (uint8_t)(h >> (8 * i));
  }
  write_input("in", buf, size);
  free(buf);
  struct store_session got, again, st;
  char err[160];
  int rc = store_session_read(dir, "in", NULL, 1u << 20, &got, err, sizeof err);
  uint64_t bytes = 0;
  int src = store_session_stat(dir, "in", &st, &bytes);
  if (rc < 0) {
    if (got.snap.hist || got.snap.kv.data) FAIL();
    if (rc != KVD_E_CORRUPT && rc != KVD_ENOMEM && rc != KVD_E2BIG) FAIL();
    return 0;
  }
  if (src < 0 || bytes != size || st.snap.n_hist != got.snap.n_hist ||
      st.snap.kv.n_blocks != got.snap.kv.n_blocks || st.id.kv_type != got.id.kv_type)
    FAIL();
  uint64_t kv = (uint64_t)got.snap.kv.n_blocks * got.snap.kv.block_bytes;
  if (STORE_HEADER_BYTES + (uint64_t)got.snap.n_hist * 4 + kv + 8 != size) FAIL();
  uint64_t wrote = 0;
  if (store_session_write(dir, "out", &got, &wrote) < 0 || wrote != size) FAIL();
  if (store_session_read(dir, "out", &got.id, 1u << 20, &again, err, sizeof err) < 0) FAIL();
  if (again.snap.n_hist != got.snap.n_hist || again.snap.pending != got.snap.pending ||
      again.keep != got.keep || strcmp(again.model_name, got.model_name) != 0 ||
      (got.snap.n_hist && memcmp(again.snap.hist, got.snap.hist, got.snap.n_hist * 4) != 0) ||
      (kv && memcmp(again.snap.kv.data, got.snap.kv.data, (size_t)kv) != 0))
    FAIL();
  sched_snapshot_clear(&got.snap);
  sched_snapshot_clear(&again.snap);
  return 0;
}
