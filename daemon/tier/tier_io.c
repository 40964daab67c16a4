/* File helpers of the KV tiers' formats (tier_io.h). */
#include "tier_io.h"

#include "kvd_error.h"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>

int tier_io_errno(int e) {
  switch (e) {
  case ENOENT:
    return KVD_ENOENT;
  case ENOSPC:
  case EDQUOT:
    return KVD_ENOSPC;
  case EACCES:
  case EPERM:
  case EROFS:
    return KVD_EACCES;
  case ENOMEM:
    return KVD_ENOMEM;
  default:
    return KVD_EIO;
  }
}

int tier_io_mkdirs(const char *dir) {
  char buf[4096];
  size_t n = strlen(dir);
  if (n == 0 || n >= sizeof buf) return KVD_EINVAL;
  memcpy(buf, dir, n + 1);
  for (size_t i = 1; i <= n; i++) {
    if (buf[i] != '/' && buf[i] != 0) continue;
    char c = buf[i];
    buf[i] = 0;
    if (mkdir(buf, 0700) < 0 && errno != EEXIST) return tier_io_errno(errno);
    buf[i] = c;
  }
  return 0;
}
