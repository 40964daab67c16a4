/* The disk tier of the prefix cache (prefix tier_): full KV blocks kept in files so that a prompt
 * seen before, even before a restart, starts from them instead of being recomputed.
 *
 * A tier is one folder per identity (the model file's content hash, KV type, block size and
 * bytes per block: blocks of another model or KV type are never even looked at), one file per
 * block named by its chained prefix key (kv.h), each
 *
 *   "KVDBLK1\0", u64 key, u64 block_bytes, the block's bytes, u64 XXH3-64 of all before
 *
 * written to a temporary name and renamed (atomic; no fsync per block: a file torn by a crash
 * fails its checksum and is dropped, never used). The index (which keys are present, oldest
 * first) is rebuilt from the folder at open. Past its budget the oldest files go. Single-threaded:
 * the engine thread owns its tier. */
#ifndef KVD_TIER_H
#define KVD_TIER_H

#include <stdbool.h>
#include <stdint.h>

struct tier_disk;

struct tier_disk_stats {
  uint64_t blocks, bytes, budget;
  uint64_t hits, writes, dropped_corrupt, evicted;
};

/* Opens (creating) root/identity for blocks of block_bytes, at most budget bytes of files.
 * identity: [A-Za-z0-9._-]+. KVD_EINVAL, KVD_ENOMEM, file-system errors. */
int tier_disk_open(const char *root, const char *identity, uint64_t block_bytes, uint64_t budget,
                   struct tier_disk **ret);
void tier_disk_close(struct tier_disk *t);
bool tier_disk_has(const struct tier_disk *t, uint64_t key);
/* Reads key's block into dst (block_bytes). KVD_ENOENT when absent; KVD_E_CORRUPT when its file
 * does not check out (it is deleted and forgotten). */
int tier_disk_get(struct tier_disk *t, uint64_t key, void *dst);
/* Writes key's block (replacing nothing: a key present stays as it is), dropping the oldest
 * files past the budget. */
int tier_disk_put(struct tier_disk *t, uint64_t key, const void *src);
void tier_disk_stats(const struct tier_disk *t, struct tier_disk_stats *ret);

#endif
