/* Session files (daemon/store): a written file reads back exactly; every truncation, every
 * single flipped byte (the header's all, the body's sampled), a longer file and a reserved byte
 * set are KVD_E_CORRUPT; another model, KV type or block size is KVD_E_MISMATCH; ids outside the
 * vocabulary are refused; names are checked; list and delete. */
#include "kt.h"
#include "kvd_error.h"
#include "store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void make_session(struct store_session *ss, uint32_t n_hist, uint32_t n_blocks) {
  memset(ss, 0, sizeof *ss);
  ss->id = (struct store_identity){{0x1234, 0x5678}, 1, 16, 640};
  snprintf(ss->model_name, sizeof ss->model_name, "stories 260K");
  ss->keep = 7;
  ss->keep_set = true;
  ss->started = true;
  ss->saved = 1700000000;
  struct sched_snapshot *sn = &ss->snap;
  sn->n_hist = n_hist;
  sn->hist = malloc(n_hist * sizeof *sn->hist + 4);
  for (uint32_t i = 0; i < n_hist; i++)
    sn->hist[i] = (int32_t)kt_rand_range(0, 511);
  sn->pending = 42;
  sn->kv = (struct sched_kv_copy){.len = n_hist, .n_blocks = n_blocks, .block_bytes = 640};
  sn->kv.data = malloc((size_t)n_blocks * 640 + 1);
  for (size_t i = 0; i < (size_t)n_blocks * 640; i++)
    sn->kv.data[i] = (uint8_t)kt_rand_range(0, 255);
}

static char *read_file(const char *path, size_t *n) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  *n = (size_t)ftell(f);
  fseek(f, 0, SEEK_SET);
  char *b = malloc(*n + 1);
  if (fread(b, 1, *n, f) != *n) *n = 0;
  fclose(f);
  return b;
}

static void write_file(const char *path, const void *b, size_t n) {
  FILE *f = fopen(path, "wb");
  fwrite(b, 1, n, f);
  fclose(f);
}

KT_TEST(a_written_session_reads_back_exactly) {
  const char *dir = kt_tmp_dir();
  struct store_session ss, got;
  make_session(&ss, 70, 5);
  uint64_t bytes = 0;
  KT_ASSERT_OK(store_session_write(dir, "chat-1", &ss, &bytes));
  KT_CHECK_EQ(bytes, STORE_HEADER_BYTES + 70 * 4 + 5 * 640 + 8);
  char err[160];
  KT_ASSERT_OK(store_session_read(dir, "chat-1", &ss.id, 512, &got, err, sizeof err));
  KT_CHECK_EQ(got.snap.n_hist, 70);
  KT_CHECK(memcmp(got.snap.hist, ss.snap.hist, 70 * 4) == 0);
  KT_CHECK(memcmp(got.snap.kv.data, ss.snap.kv.data, 5 * 640) == 0);
  KT_CHECK_EQ(got.snap.pending, 42);
  KT_CHECK(got.keep == 7 && got.keep_set && got.started && got.saved == 1700000000);
  KT_CHECK(got.snap.kv.len == 70 && got.snap.kv.n_blocks == 5 && !got.snap.kv.shifted);
  KT_ASSERT_STREQ(got.model_name, "stories 260K");
  struct store_session st;
  KT_ASSERT_OK(store_session_stat(dir, "chat-1", &st, &bytes));
  KT_CHECK(st.snap.n_hist == 70 && st.snap.hist == NULL);
  /* Written over: the new content, whole. */
  sched_snapshot_clear(&got.snap);
  ss.snap.pending = -1;
  KT_ASSERT_OK(store_session_write(dir, "chat-1", &ss, NULL));
  KT_ASSERT_OK(store_session_read(dir, "chat-1", NULL, 512, &got, err, sizeof err));
  KT_CHECK_EQ(got.snap.pending, -1);
  sched_snapshot_clear(&got.snap);
  sched_snapshot_clear(&ss.snap);
  KT_ASSERT_OK(store_session_delete(dir, "chat-1"));
  KT_CHECK_EQ(store_session_delete(dir, "chat-1"), KVD_ENOENT);
  KT_CHECK_EQ(store_session_read(dir, "chat-1", NULL, 512, &got, err, sizeof err), KVD_ENOENT);
}

KT_TEST(damaged_files_are_corrupt_and_hold_nothing) {
  const char *dir = kt_tmp_dir();
  struct store_session ss, got;
  make_session(&ss, 33, 3);
  KT_ASSERT_OK(store_session_write(dir, "orig", &ss, NULL));
  char path[4096], bad[4096];
  snprintf(path, sizeof path, "%s/orig.kvs", dir);
  snprintf(bad, sizeof bad, "%s/bad.kvs", dir);
  size_t n;
  char *b = read_file(path, &n);
  KT_ASSERT(b && n > STORE_HEADER_BYTES);
  char err[160];
  for (size_t cut = 0; cut < n; cut += cut < STORE_HEADER_BYTES + 8 ? 1 : 97) {
    write_file(bad, b, cut);
    int rc = store_session_read(dir, "bad", NULL, 512, &got, err, sizeof err);
    KT_CHECK_MSG(rc == KVD_E_CORRUPT, "cut at %zu: %d", cut, rc);
    KT_CHECK(got.snap.hist == NULL && got.snap.kv.data == NULL);
  }
  for (size_t at = 0; at < n; at += at < STORE_HEADER_BYTES ? 1 : 53) {
    b[at] ^= 0x10;
    write_file(bad, b, n);
    b[at] ^= 0x10;
    int rc = store_session_read(dir, "bad", NULL, 512, &got, err, sizeof err);
    /* The saved time and keep are not checked by meaning, only by the checksum. */
    KT_CHECK_MSG(rc == KVD_E_CORRUPT, "byte %zu flipped: %d", at, rc);
  }
  char *longer = malloc(n + 1);
  memcpy(longer, b, n);
  longer[n] = 0;
  write_file(bad, longer, n + 1);
  KT_CHECK_EQ(store_session_read(dir, "bad", NULL, 512, &got, err, sizeof err), KVD_E_CORRUPT);
  /* A smaller vocabulary than the ids: refused, not handed on. */
  KT_CHECK_EQ(store_session_read(dir, "orig", NULL, 8, &got, err, sizeof err), KVD_E_CORRUPT);
  free(longer);
  free(b);
  sched_snapshot_clear(&ss.snap);
}

KT_TEST(another_identity_is_a_mismatch) {
  const char *dir = kt_tmp_dir();
  struct store_session ss, got;
  make_session(&ss, 20, 2);
  KT_ASSERT_OK(store_session_write(dir, "id", &ss, NULL));
  char err[160];
  struct store_identity other = ss.id;
  other.model_hash[1] ^= 1;
  KT_CHECK_EQ(store_session_read(dir, "id", &other, 512, &got, err, sizeof err), KVD_E_MISMATCH);
  KT_CHECK(strstr(err, "another model") != NULL);
  other = ss.id;
  other.kv_type = 2;
  KT_CHECK_EQ(store_session_read(dir, "id", &other, 512, &got, err, sizeof err), KVD_E_MISMATCH);
  KT_CHECK(strstr(err, "KV type") != NULL);
  other = ss.id;
  other.block_size = 32;
  KT_CHECK_EQ(store_session_read(dir, "id", &other, 512, &got, err, sizeof err), KVD_E_MISMATCH);
  KT_CHECK(got.snap.hist == NULL);
  sched_snapshot_clear(&ss.snap);
}

static int collect(void *ud, const char *name) {
  char *out = ud;
  strcat(out, name);
  strcat(out, ",");
  return 0;
}

KT_TEST(names_are_checked_and_listed_in_order) {
  static const char *bad[] = {"", ".x", "../x", "a/b", "a b", "é", "a\n"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    KT_CHECK_EQ(store_name_check(bad[i], strlen(bad[i])), KVD_EINVAL);
  char longname[STORE_NAME_MAX + 2];
  memset(longname, 'a', sizeof longname - 1);
  longname[sizeof longname - 1] = 0;
  KT_CHECK_EQ(store_name_check(longname, STORE_NAME_MAX + 1), KVD_EINVAL);
  KT_CHECK_EQ(store_name_check(longname, STORE_NAME_MAX), 0);
  KT_CHECK_EQ(store_name_check("My.chat_2-b", 11), 0);
  char dir[4096];
  snprintf(dir, sizeof dir, "%s/list/deeper", kt_tmp_dir());
  struct store_session ss;
  make_session(&ss, 4, 1);
  KT_ASSERT_OK(store_session_write(dir, "b", &ss, NULL)); /* the folders are made */
  KT_ASSERT_OK(store_session_write(dir, "a", &ss, NULL));
  char junk[4200];
  snprintf(junk, sizeof junk, "%s/.hidden.kvs", dir);
  write_file(junk, "x", 1);
  snprintf(junk, sizeof junk, "%s/other.txt", dir);
  write_file(junk, "x", 1);
  char out[256] = "";
  KT_ASSERT_OK(store_session_list(dir, collect, out));
  KT_ASSERT_STREQ(out, "a,b,");
  KT_CHECK_EQ(store_session_write(dir, "../escape", &ss, NULL), KVD_EINVAL);
  sched_snapshot_clear(&ss.snap);
}
