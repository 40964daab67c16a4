/* kvd error codes: the one table.
 *
 * Every fallible function in kvd returns 0 (or a count) on success and a negative code on failure.
 * Codes are errno values where one fits and kvd's own codes (below -1000) otherwise. This X-macro
 * table is the single definition: it yields the enum, kvd_strerror() and the wire code that
 * PROTOCOL.md documents, so the three can never drift apart. Add rows, never renumber. */
#ifndef KVD_ERROR_H
#define KVD_ERROR_H

#include <errno.h>

/* X(enum name, value, wire code, message) */
#define KVD_ERROR_TABLE(X)                                                                         \
  X(KVD_OK, 0, 0, "success")                                                                       \
  X(KVD_ENOMEM, -ENOMEM, 1, "out of host memory")                                                  \
  X(KVD_EINVAL, -EINVAL, 2, "invalid argument")                                                    \
  X(KVD_EPROTO, -EPROTO, 3, "protocol error")                                                      \
  X(KVD_EAGAIN, -EAGAIN, 4, "resource temporarily unavailable")                                    \
  X(KVD_EIO, -EIO, 5, "input/output error")                                                        \
  X(KVD_ENOENT, -ENOENT, 6, "no such file or object")                                              \
  X(KVD_ERANGE, -ERANGE, 7, "value out of range")                                                  \
  X(KVD_EOVERFLOW, -EOVERFLOW, 8, "size overflow")                                                 \
  X(KVD_ENOTSUP, -ENOTSUP, 9, "operation not supported")                                           \
  X(KVD_ECANCELED, -ECANCELED, 10, "operation canceled")                                           \
  X(KVD_EBUSY, -EBUSY, 11, "busy: too many requests")                                              \
  X(KVD_E2BIG, -E2BIG, 12, "input too large")                                                      \
  X(KVD_EEXIST, -EEXIST, 13, "already exists")                                                     \
  X(KVD_EBADMSG, -EBADMSG, 14, "malformed message")                                                \
  X(KVD_EACCES, -EACCES, 15, "permission denied")                                                  \
  X(KVD_ECONNREFUSED, -ECONNREFUSED, 16, "connection refused (is kvd running?)")                   \
  X(KVD_ENOSPC, -ENOSPC, 17, "no space left")                                                      \
  X(KVD_E_NO_DEVICE, -1001, 101, "no usable Vulkan device")                                        \
  X(KVD_E_DEVICE_LOST, -1002, 102, "Vulkan device lost")                                           \
  X(KVD_E_DEVICE_OOM, -1003, 103, "out of device memory")                                          \
  X(KVD_E_VULKAN, -1004, 104, "Vulkan call failed")                                                \
  X(KVD_E_SHADER, -1005, 105, "shader or pipeline creation failed")                                \
  X(KVD_E_LIMIT, -1006, 106, "exceeds a device limit")                                             \
  X(KVD_E_KV_EXHAUSTED, -1007, 107, "KV cache memory exhausted")                                   \
  X(KVD_E_FORMAT, -1008, 108, "corrupt or truncated model file")                                   \
  X(KVD_E_UNSUPPORTED, -1009, 109, "unsupported model or tensor type")                             \
  X(KVD_E_TOKENIZER, -1010, 110, "tokenizer error")                                                \
  X(KVD_E_NO_METHOD, -1011, 111, "unknown method")                                                 \
  X(KVD_E_NO_MODEL, -1012, 112, "no such model loaded")                                            \
  X(KVD_E_CONTEXT, -1013, 113, "prompt exceeds the context length")                                \
  X(KVD_E_VALIDATION, -1014, 114, "Vulkan validation error")                                     \
  X(KVD_E_MISMATCH, -1015, 115, "saved for another model or KV type")                              \
  X(KVD_E_CORRUPT, -1016, 116, "corrupt or truncated saved state")

enum kvd_error {
#define KVD__ERR_ENUM(name, value, wire, msg) name = (value),
  KVD_ERROR_TABLE(KVD__ERR_ENUM)
#undef KVD__ERR_ENUM
};

/* These three are part of libkvd's public API as well as the daemon's: declared with default
 * visibility (the project builds with -fvisibility=hidden) so the shared library exports the one
 * definition in ipc/error.c rather than a second copy of the table. */
#define KVD__ERROR_API __attribute__((visibility("default")))

/* Human-readable text for a code; unknown codes get a generic string (never NULL). */
KVD__ERROR_API const char *kvd_strerror(int code);
/* The stable code sent on the wire for an internal code; 999 for anything unknown. */
KVD__ERROR_API int kvd_error_to_wire(int code);
/* The internal code for a wire code; KVD_EPROTO for anything unknown. */
KVD__ERROR_API int kvd_error_from_wire(int wire);

#endif
