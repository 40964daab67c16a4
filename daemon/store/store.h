/* Saved state on disk (prefix store_): session files that outlive connections and restarts.
 *
 * A session file holds a session's tokens, its sampler state (the pending token), the server's
 * per-session settings, and its KV blocks exactly as the engine stored them, with the identity
 * they are only valid under: the model's content hash, the KV type, the block size and the bytes
 * per block. Layout (little-endian):
 *
 *   header  "KVDSESS\0", u32 version (1), u32 header bytes (STORE_HEADER_BYTES)
 *           u64 model hash (2 words), u32 kv_type, u32 block_size, u64 block_bytes,
 *           u32 n_hist, i32 pending, u32 keep, u32 flags (STORE_F_*),
 *           u32 kv_len, u32 kv_first, u32 kv_blocks, u32 name_len, u64 saved (unix seconds),
 *           char model_name[128] (name_len bytes used; no control characters)
 *   body    i32 hist[n_hist], then kv_blocks * block_bytes bytes of KV
 *   trailer u64 XXH3-64 of everything before it
 *
 * Every field is checked before use (sizes in 64 bits against the file's size, which must match
 * exactly, and the checksum before anything is handed out), so a truncated, torn or tampered file
 * is KVD_E_CORRUPT and a file of another model or KV type KVD_E_MISMATCH; nothing of either is
 * echoed in messages. Writes go to a temporary file in the same folder, are synced, then renamed
 * over the name: a file is there whole or not at all. */
#ifndef KVD_STORE_H
#define KVD_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "scheduler.h"

#define STORE_NAME_MAX 64 /* bytes of a session name: [A-Za-z0-9._-], not starting with '.' */
#define STORE_MODEL_NAME_MAX 128 /* bytes of the model name a file records (IPC_MAX_NAME_BYTES) */
#define STORE_HEADER_BYTES 224u
#define STORE_F_KEEP_SET 1u
#define STORE_F_STARTED 2u
#define STORE_F_SHIFTED 4u

/* What the KV blocks of a file are valid under; a file is used only where all of it matches. */
struct store_identity {
  uint64_t model_hash[2]; /* store_model_hash() of the GGUF */
  uint32_t kv_type;       /* enum kv_type */
  uint32_t block_size;
  uint64_t block_bytes; /* engine_kv_block_bytes() */
};

struct store_session {
  struct store_identity id;
  char model_name[STORE_MODEL_NAME_MAX + 1];
  uint32_t keep;
  bool keep_set, started;
  uint64_t saved; /* unix seconds */
  struct sched_snapshot snap;
};

/* 0 if name is a valid session name, else KVD_EINVAL. */
int store_name_check(const char *name, size_t len);
/* The content hash that names a model: XXH3-128 of the whole file (metadata and tensors). */
void store_model_hash(const void *data, size_t size, uint64_t ret[2]);

/* Writes dir/name.kvs atomically; *ret_bytes = the file's size. Errors: KVD_EINVAL (name),
 * KVD_EIO / KVD_ENOSPC / KVD_EACCES from the file system (nothing is left behind). */
int store_session_write(const char *dir, const char *name, const struct store_session *ss,
                        uint64_t *ret_bytes);
/* Reads and checks dir/name.kvs into *ret (the caller frees ret->snap with
 * sched_snapshot_clear). expect, if not NULL, must match the file's identity (KVD_E_MISMATCH,
 * with which part in err). n_vocab bounds the token ids. KVD_ENOENT if there is no such file,
 * KVD_E_CORRUPT for any inconsistency, KVD_ENOMEM. On error *ret holds nothing. */
int store_session_read(const char *dir, const char *name, const struct store_identity *expect,
                       uint32_t n_vocab, struct store_session *ret, char *err, size_t errlen);
/* The header only (for session.list): KVD_E_CORRUPT if it is not a session file's. */
int store_session_stat(const char *dir, const char *name, struct store_session *ret,
                       uint64_t *ret_bytes);
int store_session_delete(const char *dir, const char *name);
/* Calls fn for each valid session name in dir (sorted); stops at a nonzero return. */
int store_session_list(const char *dir, int (*fn)(void *ud, const char *name), void *ud);

#endif
