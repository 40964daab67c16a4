/* Session files (store.h): write atomically, read back only what checks out. */
#include "store.h"
#include "tier_io.h"

#include "kvd_error.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

static const char store_magic[8] = {'K', 'V', 'D', 'S', 'E', 'S', 'S', 0};
#define STORE_VERSION 1u
#define STORE_MAX_TOKENS (64u << 20) /* far past any context: a bound on what a file may claim */

int store_name_check(const char *name, size_t len) {
  if (len == 0 || len > STORE_NAME_MAX || name[0] == '.') return KVD_EINVAL;
  for (size_t i = 0; i < len; i++) {
    char c = name[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
          c == '_' || c == '-'))
      return KVD_EINVAL;
  }
  return 0;
}

void store_model_hash(const void *data, size_t size, uint64_t ret[2]) {
  XXH128_hash_t h = XXH3_128bits(data, size);
  ret[0] = h.low64;
  ret[1] = h.high64;
}

static int store_path(char *buf, size_t cap, const char *dir, const char *name, const char *ext) {
  if (store_name_check(name, strlen(name)) < 0) return KVD_EINVAL;
  int n = snprintf(buf, cap, "%s/%s%s", dir, name, ext);
  return n > 0 && (size_t)n < cap ? 0 : KVD_E2BIG;
}

static void store_header_pack(const struct store_session *ss, uint8_t h[STORE_HEADER_BYTES]) {
  memset(h, 0, STORE_HEADER_BYTES);
  const struct sched_snapshot *sn = &ss->snap;
  memcpy(h, store_magic, 8);
  tier_io_put32(h + 8, STORE_VERSION);
  tier_io_put32(h + 12, STORE_HEADER_BYTES);
  tier_io_put64(h + 16, ss->id.model_hash[0]);
  tier_io_put64(h + 24, ss->id.model_hash[1]);
  tier_io_put32(h + 32, ss->id.kv_type);
  tier_io_put32(h + 36, ss->id.block_size);
  tier_io_put64(h + 40, ss->id.block_bytes);
  tier_io_put32(h + 48, sn->n_hist);
  tier_io_put32(h + 52, (uint32_t)sn->pending);
  tier_io_put32(h + 56, ss->keep);
  tier_io_put32(h + 60, (ss->keep_set ? STORE_F_KEEP_SET : 0) |
                            (ss->started ? STORE_F_STARTED : 0) |
                            (sn->kv.shifted ? STORE_F_SHIFTED : 0));
  tier_io_put32(h + 64, sn->kv.len);
  tier_io_put32(h + 68, sn->kv.first);
  tier_io_put32(h + 72, sn->kv.n_blocks);
  size_t nl = strnlen(ss->model_name, STORE_MODEL_NAME_MAX);
  tier_io_put32(h + 76, (uint32_t)nl);
  tier_io_put64(h + 80, ss->saved);
  memcpy(h + 88, ss->model_name, nl);
}

/* The header's fields into ret, checked for consistency on their own and with file_size (the
 * whole file, or 0 when only the header was read). */
static int store_header_parse(const uint8_t h[STORE_HEADER_BYTES], uint64_t file_size,
                              struct store_session *ret) {
  if (memcmp(h, store_magic, 8) != 0 || tier_io_get32(h + 8) != STORE_VERSION ||
      tier_io_get32(h + 12) != STORE_HEADER_BYTES)
    return KVD_E_CORRUPT;
  memset(ret, 0, sizeof *ret);
  ret->id.model_hash[0] = tier_io_get64(h + 16);
  ret->id.model_hash[1] = tier_io_get64(h + 24);
  ret->id.kv_type = tier_io_get32(h + 32);
  ret->id.block_size = tier_io_get32(h + 36);
  ret->id.block_bytes = tier_io_get64(h + 40);
  struct sched_snapshot *sn = &ret->snap;
  sn->n_hist = tier_io_get32(h + 48);
  sn->pending = (int32_t)tier_io_get32(h + 52);
  ret->keep = tier_io_get32(h + 56);
  uint32_t flags = tier_io_get32(h + 60);
  ret->keep_set = flags & STORE_F_KEEP_SET;
  ret->started = flags & STORE_F_STARTED;
  sn->kv.shifted = flags & STORE_F_SHIFTED;
  sn->kv.len = tier_io_get32(h + 64);
  sn->kv.first = tier_io_get32(h + 68);
  sn->kv.n_blocks = tier_io_get32(h + 72);
  sn->kv.block_bytes = ret->id.block_bytes;
  uint32_t nl = tier_io_get32(h + 76);
  ret->saved = tier_io_get64(h + 80);
  if (flags & ~(STORE_F_KEEP_SET | STORE_F_STARTED | STORE_F_SHIFTED)) return KVD_E_CORRUPT;
  if (nl > STORE_MODEL_NAME_MAX) return KVD_E_CORRUPT;
  for (uint32_t i = 0; i < nl; i++)
    if (h[88 + i] < 0x20 || h[88 + i] == 0x7f) return KVD_E_CORRUPT;
  for (uint32_t i = 88 + nl; i < STORE_HEADER_BYTES; i++)
    if (h[i]) return KVD_E_CORRUPT; /* reserved */
  memcpy(ret->model_name, h + 88, nl);
  ret->model_name[nl] = 0;
  uint32_t bs = ret->id.block_size;
  if (bs == 0 || sn->n_hist > STORE_MAX_TOKENS || sn->pending < -1) return KVD_E_CORRUPT;
  if (sn->kv.n_blocks) {
    /* The blocks hold kv_len tokens after `first` given-back blocks. */
    uint64_t held = (uint64_t)sn->kv.len - (uint64_t)sn->kv.first * bs;
    if ((uint64_t)sn->kv.first * bs >= sn->kv.len || held > (uint64_t)sn->kv.n_blocks * bs ||
        held <= (uint64_t)(sn->kv.n_blocks - 1) * bs || ret->id.block_bytes == 0)
      return KVD_E_CORRUPT;
    if (!sn->kv.shifted && sn->kv.len != sn->n_hist) return KVD_E_CORRUPT;
  } else if (sn->kv.len || sn->kv.first || sn->kv.shifted) {
    return KVD_E_CORRUPT; /* no KV: only the ids, which must give it back */
  }
  if (file_size) {
    /* Sizes in 64 bits; a block count times a block size past 2^64 is corrupt, not a wrap. */
    if (sn->kv.n_blocks && ret->id.block_bytes > UINT64_MAX / sn->kv.n_blocks) return KVD_E_CORRUPT;
    uint64_t kv = (uint64_t)sn->kv.n_blocks * ret->id.block_bytes;
    uint64_t want = STORE_HEADER_BYTES + (uint64_t)sn->n_hist * 4;
    if (kv > UINT64_MAX - want - 8 || want + kv + 8 != file_size) return KVD_E_CORRUPT;
  }
  return 0;
}

static int write_all(int fd, const void *p, size_t n, XXH3_state_t *h) {
  const uint8_t *b = p;
  if (h) XXH3_64bits_update(h, p, n);
  while (n) {
    ssize_t w = write(fd, b, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return tier_io_errno(errno);
    }
    b += w;
    n -= (size_t)w;
  }
  return 0;
}

int store_session_write(const char *dir, const char *name, const struct store_session *ss,
                        uint64_t *ret_bytes) {
  char path[4096], tmp[4096 + 32];
  int rc = store_path(path, sizeof path, dir, name, ".kvs");
  if (rc < 0) return rc;
  rc = tier_io_mkdirs(dir);
  if (rc < 0) return rc;
  snprintf(tmp, sizeof tmp, "%s/.%s.%ld.tmp", dir, name, (long)getpid());
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return tier_io_errno(errno);
  XXH3_state_t *h = XXH3_createState();
  if (!h) {
    close(fd);
    unlink(tmp);
    return KVD_ENOMEM;
  }
  XXH3_64bits_reset(h);
  uint8_t hdr[STORE_HEADER_BYTES];
  store_header_pack(ss, hdr);
  const struct sched_snapshot *sn = &ss->snap;
  rc = write_all(fd, hdr, sizeof hdr, h);
  /* The ids are written as stored: little-endian hosts only (put32 would do it per id). */
  if (rc == 0 && sn->n_hist) rc = write_all(fd, sn->hist, (size_t)sn->n_hist * 4, h);
  uint64_t kv = (uint64_t)sn->kv.n_blocks * sn->kv.block_bytes;
  if (rc == 0 && kv) rc = write_all(fd, sn->kv.data, (size_t)kv, h);
  uint8_t tr[8];
  tier_io_put64(tr, XXH3_64bits_digest(h));
  XXH3_freeState(h);
  if (rc == 0) rc = write_all(fd, tr, 8, NULL);
  if (rc == 0 && fsync(fd) < 0) rc = tier_io_errno(errno);
  if (close(fd) < 0 && rc == 0) rc = tier_io_errno(errno);
  if (rc == 0 && rename(tmp, path) < 0) rc = tier_io_errno(errno);
  if (rc < 0) {
    unlink(tmp);
    return rc;
  }
  /* The rename is durable once the folder is. */
  int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    fsync(dfd);
    close(dfd);
  }
  if (ret_bytes) *ret_bytes = STORE_HEADER_BYTES + (uint64_t)sn->n_hist * 4 + kv + 8;
  return 0;
}

static int read_all(int fd, void *p, size_t n) {
  uint8_t *b = p;
  while (n) {
    ssize_t r = read(fd, b, n);
    if (r < 0) {
      if (errno == EINTR) continue;
      return tier_io_errno(errno);
    }
    if (r == 0) return KVD_E_CORRUPT; /* shorter than its header says */
    b += r;
    n -= (size_t)r;
  }
  return 0;
}

static int store_open(const char *dir, const char *name, int *ret_fd, uint64_t *ret_size) {
  char path[4096];
  int rc = store_path(path, sizeof path, dir, name, ".kvs");
  if (rc < 0) return rc;
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return tier_io_errno(errno);
  struct stat st;
  if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return KVD_E_CORRUPT;
  }
  *ret_fd = fd;
  *ret_size = (uint64_t)st.st_size;
  return 0;
}

int store_session_stat(const char *dir, const char *name, struct store_session *ret,
                       uint64_t *ret_bytes) {
  int fd;
  uint64_t size;
  int rc = store_open(dir, name, &fd, &size);
  if (rc < 0) return rc;
  uint8_t hdr[STORE_HEADER_BYTES];
  rc = size < sizeof hdr ? KVD_E_CORRUPT : read_all(fd, hdr, sizeof hdr);
  close(fd);
  if (rc == 0) rc = store_header_parse(hdr, size, ret);
  if (rc == 0 && ret_bytes) *ret_bytes = size;
  return rc;
}

int store_session_read(const char *dir, const char *name, const struct store_identity *expect,
                       uint32_t n_vocab, struct store_session *ret, char *err, size_t errlen) {
  memset(ret, 0, sizeof *ret);
  ret->snap.pending = -1;
  if (err && errlen) err[0] = 0;
  int fd;
  uint64_t size;
  int rc = store_open(dir, name, &fd, &size);
  if (rc < 0) return rc;
  uint8_t hdr[STORE_HEADER_BYTES];
  rc = size < sizeof hdr ? KVD_E_CORRUPT : read_all(fd, hdr, sizeof hdr);
  if (rc == 0) rc = store_header_parse(hdr, size, ret);
  if (rc == 0 && expect) {
    const char *what = NULL;
    if (ret->id.model_hash[0] != expect->model_hash[0] ||
        ret->id.model_hash[1] != expect->model_hash[1])
      what = "it was saved from another model file";
    else if (ret->id.kv_type != expect->kv_type)
      what = "it was saved with another KV type";
    else if (ret->id.block_size != expect->block_size || ret->id.block_bytes != expect->block_bytes)
      what = "it was saved with another KV block size";
    if (what) {
      if (err) snprintf(err, errlen, "%s", what);
      rc = KVD_E_MISMATCH;
    }
  }
  struct sched_snapshot *sn = &ret->snap;
  uint64_t kv = (uint64_t)sn->kv.n_blocks * sn->kv.block_bytes;
  if (rc == 0 && (kv > SIZE_MAX || (uint64_t)sn->n_hist * 4 > SIZE_MAX)) rc = KVD_E2BIG;
  if (rc == 0) {
    sn->hist = malloc(sn->n_hist ? (size_t)sn->n_hist * 4 : 1);
    sn->kv.data = kv ? malloc((size_t)kv) : NULL;
    if (!sn->hist || (kv && !sn->kv.data)) rc = KVD_ENOMEM;
  }
  if (rc == 0 && sn->n_hist) rc = read_all(fd, sn->hist, (size_t)sn->n_hist * 4);
  if (rc == 0 && kv) rc = read_all(fd, sn->kv.data, (size_t)kv);
  uint8_t tr[8];
  if (rc == 0) rc = read_all(fd, tr, 8);
  close(fd);
  if (rc == 0) {
    /* The checksum first: nothing of a torn or tampered file is used. */
    XXH3_state_t *h = XXH3_createState();
    if (!h) rc = KVD_ENOMEM;
    if (h) {
      XXH3_64bits_reset(h);
      XXH3_64bits_update(h, hdr, sizeof hdr);
      if (sn->n_hist) XXH3_64bits_update(h, sn->hist, (size_t)sn->n_hist * 4);
      if (kv) XXH3_64bits_update(h, sn->kv.data, (size_t)kv);
      if (XXH3_64bits_digest(h) != tier_io_get64(tr)) rc = KVD_E_CORRUPT;
      XXH3_freeState(h);
    }
  }
  for (uint32_t i = 0; rc == 0 && i < sn->n_hist; i++)
    if (sn->hist[i] < 0 || (uint32_t)sn->hist[i] >= n_vocab) rc = KVD_E_CORRUPT;
  if (rc == 0 && sn->pending >= 0 && (uint32_t)sn->pending >= n_vocab) rc = KVD_E_CORRUPT;
  if (rc < 0) sched_snapshot_clear(sn);
  return rc;
}

int store_session_delete(const char *dir, const char *name) {
  char path[4096];
  int rc = store_path(path, sizeof path, dir, name, ".kvs");
  if (rc < 0) return rc;
  return unlink(path) < 0 ? tier_io_errno(errno) : 0;
}

static int cmp_names(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

int store_session_list(const char *dir, int (*fn)(void *ud, const char *name), void *ud) {
  DIR *d = opendir(dir);
  if (!d) return errno == ENOENT ? 0 : tier_io_errno(errno);
  char **names = NULL;
  size_t n = 0, cap = 0;
  int rc = 0;
  for (struct dirent *de; (de = readdir(d));) {
    size_t len = strlen(de->d_name);
    if (len <= 4 || strcmp(de->d_name + len - 4, ".kvs") != 0) continue;
    if (store_name_check(de->d_name, len - 4) < 0) continue;
    if (n == cap) {
      cap = cap ? cap * 2 : 16;
      char **nn = realloc(names, cap * sizeof *nn);
      if (!nn) {
        rc = KVD_ENOMEM;
        break;
      }
      names = nn;
    }
    names[n] = strndup(de->d_name, len - 4);
    if (!names[n]) {
      rc = KVD_ENOMEM;
      break;
    }
    n++;
  }
  closedir(d);
  if (n) qsort(names, n, sizeof *names, cmp_names);
  for (size_t i = 0; i < n; i++) {
    if (rc == 0 && fn(ud, names[i]) != 0) rc = 1;
    free(names[i]);
  }
  free(names);
  return rc < 0 ? rc : 0;
}
