/* The disk tier (tier.h): an index of keys over one folder of block files. */
#include "tier.h"
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

#define TIER_HDR 24u
static const char tier_magic[8] = {'K', 'V', 'D', 'B', 'L', 'K', '1', 0};

struct tier_disk {
  char dir[4096];
  uint64_t block_bytes, budget, file_bytes;
  /* Keys present, oldest first: a ring of n entries from head, and an open-addressing set over
   * the same keys (0 is never a key here: a real key of 0 is simply not kept). */
  uint64_t *ring;
  uint32_t cap, head, n;
  uint64_t *set;
  size_t set_mask;
  uint32_t max_files;
  struct tier_disk_stats st;
};

/* ---- the key set ---- */

static size_t set_find(const struct tier_disk *t, uint64_t key) {
  size_t i = (size_t)(key ^ (key >> 29)) & t->set_mask;
  while (t->set[i] && t->set[i] != key)
    i = (i + 1) & t->set_mask;
  return i;
}

static void set_remove(struct tier_disk *t, uint64_t key) {
  size_t i = set_find(t, key);
  if (!t->set[i]) return;
  t->set[i] = 0;
  /* Re-insert the rest of the run (no tombstones). */
  for (size_t j = (i + 1) & t->set_mask; t->set[j]; j = (j + 1) & t->set_mask) {
    uint64_t k = t->set[j];
    t->set[j] = 0;
    t->set[set_find(t, k)] = k;
  }
}

static void path_of(const struct tier_disk *t, uint64_t key, char *buf, size_t n) {
  snprintf(buf, n, "%s/%016llx.kvb", t->dir, (unsigned long long)key);
}

/* Drops the oldest key's file. */
static void tier_drop_oldest(struct tier_disk *t) {
  uint64_t key = t->ring[t->head];
  t->head = (t->head + 1) % t->cap;
  t->n--;
  if (!key || t->set[set_find(t, key)] != key) return; /* already forgotten (corrupt) */
  set_remove(t, key);
  char p[4200];
  path_of(t, key, p, sizeof p);
  unlink(p);
  t->st.blocks--;
  t->st.bytes -= t->file_bytes;
  t->st.evicted++;
}

static void tier_add(struct tier_disk *t, uint64_t key) {
  while (t->n >= t->max_files)
    tier_drop_oldest(t);
  t->ring[(t->head + t->n) % t->cap] = key;
  t->n++;
  t->set[set_find(t, key)] = key;
  t->st.blocks++;
  t->st.bytes += t->file_bytes;
}

/* ---- open: the index from the folder, oldest first ---- */

struct found {
  uint64_t key;
  int64_t mtime;
};

static int cmp_found(const void *a, const void *b) {
  const struct found *x = a, *y = b;
  return x->mtime < y->mtime ? -1 : x->mtime > y->mtime;
}

int tier_disk_open(const char *root, const char *identity, uint64_t block_bytes, uint64_t budget,
                   struct tier_disk **ret) {
  if (!root || !identity || !*identity || block_bytes == 0 || block_bytes > (1ull << 40))
    return KVD_EINVAL;
  for (const char *p = identity; *p; p++)
    if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
          *p == '.' || *p == '_' || *p == '-'))
      return KVD_EINVAL;
  struct tier_disk *t = calloc(1, sizeof *t);
  if (!t) return KVD_ENOMEM;
  int n = snprintf(t->dir, sizeof t->dir, "%s/%s", root, identity);
  if (n <= 0 || (size_t)n >= sizeof t->dir) {
    free(t);
    return KVD_E2BIG;
  }
  t->block_bytes = block_bytes;
  t->file_bytes = TIER_HDR + block_bytes + 8;
  t->budget = budget;
  uint64_t files = budget / t->file_bytes;
  t->max_files = files > (1u << 20) ? 1u << 20 : (uint32_t)files; /* index memory: 24 MiB at most */
  int rc = t->max_files ? tier_io_mkdirs(t->dir) : KVD_EINVAL;
  if (rc == 0) {
    t->cap = t->max_files;
    size_t slots = 2;
    while (slots < 2 * (size_t)t->cap)
      slots *= 2;
    t->ring = calloc(t->cap, sizeof *t->ring);
    t->set = calloc(slots, sizeof *t->set);
    t->set_mask = slots - 1;
    if (!t->ring || !t->set) rc = KVD_ENOMEM;
  }
  if (rc < 0) {
    tier_disk_close(t);
    return rc;
  }
  t->st.budget = budget;
  DIR *d = opendir(t->dir);
  struct found *fs = NULL;
  size_t nf = 0, capf = 0;
  for (struct dirent *de; d && (de = readdir(d));) {
    char *end;
    size_t len = strlen(de->d_name);
    if (de->d_name[0] == '.') {
      /* A temporary file a crash left behind. */
      if (len > 4 && !strcmp(de->d_name + len - 4, ".tmp")) unlinkat(dirfd(d), de->d_name, 0);
      continue;
    }
    if (len != 20 || strcmp(de->d_name + 16, ".kvb") != 0) continue;
    uint64_t key = strtoull(de->d_name, &end, 16);
    struct stat st;
    if (end != de->d_name + 16 || !key || fstatat(dirfd(d), de->d_name, &st, 0) < 0) continue;
    if ((uint64_t)st.st_size != t->file_bytes) { /* another block size or a torn write */
      unlinkat(dirfd(d), de->d_name, 0);
      continue;
    }
    if (nf == capf) {
      capf = capf ? capf * 2 : 256;
      struct found *nfs = realloc(fs, capf * sizeof *nfs);
      if (!nfs) break;
      fs = nfs;
    }
    fs[nf++] = (struct found){key, (int64_t)st.st_mtime};
  }
  if (d) closedir(d);
  if (nf) qsort(fs, nf, sizeof *fs, cmp_found);
  for (size_t i = 0; i < nf; i++)
    if (t->set[set_find(t, fs[i].key)] != fs[i].key) tier_add(t, fs[i].key);
  free(fs);
  *ret = t;
  return 0;
}

void tier_disk_close(struct tier_disk *t) {
  if (!t) return;
  free(t->ring);
  free(t->set);
  free(t);
}

bool tier_disk_has(const struct tier_disk *t, uint64_t key) {
  return t && key && t->set[set_find(t, key)] == key;
}

/* A file that does not check out: gone from disk and index. */
static int tier_drop_corrupt(struct tier_disk *t, uint64_t key) {
  char p[4200];
  path_of(t, key, p, sizeof p);
  unlink(p);
  set_remove(t, key); /* its ring entry is skipped when it comes up */
  t->st.blocks--;
  t->st.bytes -= t->file_bytes;
  t->st.dropped_corrupt++;
  return KVD_E_CORRUPT;
}

int tier_disk_get(struct tier_disk *t, uint64_t key, void *dst) {
  if (!tier_disk_has(t, key)) return KVD_ENOENT;
  char p[4200];
  path_of(t, key, p, sizeof p);
  int fd = open(p, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return tier_drop_corrupt(t, key);
  uint8_t hdr[TIER_HDR], tr[8];
  struct stat st;
  bool ok = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && (uint64_t)st.st_size == t->file_bytes &&
            read(fd, hdr, TIER_HDR) == TIER_HDR &&
            read(fd, dst, (size_t)t->block_bytes) == (ssize_t)t->block_bytes &&
            read(fd, tr, 8) == 8;
  close(fd);
  if (ok)
    ok = memcmp(hdr, tier_magic, 8) == 0 && tier_io_get64(hdr + 8) == key &&
         tier_io_get64(hdr + 16) == t->block_bytes;
  if (ok) {
    XXH3_state_t *h = XXH3_createState();
    if (!h) return KVD_ENOMEM;
    XXH3_64bits_reset(h);
    XXH3_64bits_update(h, hdr, TIER_HDR);
    XXH3_64bits_update(h, dst, (size_t)t->block_bytes);
    ok = XXH3_64bits_digest(h) == tier_io_get64(tr);
    XXH3_freeState(h);
  }
  if (!ok) return tier_drop_corrupt(t, key);
  t->st.hits++;
  return 0;
}

int tier_disk_put(struct tier_disk *t, uint64_t key, const void *src) {
  if (!key || tier_disk_has(t, key)) return 0;
  char p[4200], tmp[4300];
  path_of(t, key, p, sizeof p);
  snprintf(tmp, sizeof tmp, "%s/.%016llx.tmp", t->dir, (unsigned long long)key);
  uint8_t hdr[TIER_HDR], tr[8];
  memcpy(hdr, tier_magic, 8);
  tier_io_put64(hdr + 8, key);
  tier_io_put64(hdr + 16, t->block_bytes);
  XXH3_state_t *h = XXH3_createState();
  if (!h) return KVD_ENOMEM;
  XXH3_64bits_reset(h);
  XXH3_64bits_update(h, hdr, TIER_HDR);
  XXH3_64bits_update(h, src, (size_t)t->block_bytes);
  tier_io_put64(tr, XXH3_64bits_digest(h));
  XXH3_freeState(h);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return tier_io_errno(errno);
  bool ok = write(fd, hdr, TIER_HDR) == TIER_HDR &&
            write(fd, src, (size_t)t->block_bytes) == (ssize_t)t->block_bytes &&
            write(fd, tr, 8) == 8;
  int e = errno;
  if (close(fd) < 0) ok = false;
  if (!ok || rename(tmp, p) < 0) {
    int rc = ok ? tier_io_errno(errno) : tier_io_errno(e);
    unlink(tmp);
    return rc;
  }
  tier_add(t, key);
  t->st.writes++;
  return 0;
}

void tier_disk_stats(const struct tier_disk *t, struct tier_disk_stats *ret) {
  if (!t) {
    memset(ret, 0, sizeof *ret);
    return;
  }
  *ret = t->st;
}
