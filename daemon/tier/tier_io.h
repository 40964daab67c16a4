/* File helpers the KV tiers' on-disk formats share (the disk tier here, session files in
 * daemon/store): errno to kvd codes, creating folders, little-endian fields. */
#ifndef KVD_TIER_IO_H
#define KVD_TIER_IO_H

#include <stdint.h>

/* A file-system errno as a kvd code: ENOENT, ENOSPC (and EDQUOT), EACCES (and EPERM, EROFS),
 * ENOMEM as themselves, anything else KVD_EIO. */
int tier_io_errno(int e);
/* Creates dir and its parents (mode 0700) where missing. KVD_EINVAL for an empty or too long
 * path, else tier_io_errno's codes. */
int tier_io_mkdirs(const char *dir);

static inline void tier_io_put32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++)
    p[i] = (uint8_t)(v >> (8 * i));
}
static inline void tier_io_put64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++)
    p[i] = (uint8_t)(v >> (8 * i));
}
static inline uint32_t tier_io_get32(const uint8_t *p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; i++)
    v |= (uint32_t)p[i] << (8 * i);
  return v;
}
static inline uint64_t tier_io_get64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++)
    v |= (uint64_t)p[i] << (8 * i);
  return v;
}

#endif
