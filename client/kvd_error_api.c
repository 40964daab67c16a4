/* The error table's functions, exported from libkvd.
 *
 * ipc/error.c defines them too, but it is compiled hidden into the ipc codec (the whole project
 * builds with -fvisibility=hidden), and a hidden symbol cannot be exported again. So libkvd
 * generates its own from the same X-macro table; the linker then takes these and never pulls
 * ipc's error.o into the shared library.
 *
 * This file must define exactly the functions ipc/error.c defines, no more: libkvd.a holds both
 * objects, and a static link pulls whichever comes first for a symbol. With the same set in each,
 * one of them satisfies every reference and the other is never pulled (tests/client/test_static
 * links that way). */
#include "kvd.h"

#include <string.h>

const char *kvd_strerror(int code) {
  switch (code) {
#define KVD__ERR_STR(name, value, wire, msg)                                                       \
  case value:                                                                                      \
    return msg;
    KVD_ERROR_TABLE(KVD__ERR_STR)
#undef KVD__ERR_STR
  default:
    /* Same fallback as ipc/error.c: an errno we did not list still has a libc message. */
    if (code < 0 && code > -1000) return strerror(-code);
    return "unknown error";
  }
}

int kvd_error_to_wire(int code) {
  switch (code) {
#define KVD__ERR_WIRE(name, value, wire, msg)                                                      \
  case value:                                                                                      \
    return wire;
    KVD_ERROR_TABLE(KVD__ERR_WIRE)
#undef KVD__ERR_WIRE
  default:
    return 999;
  }
}

int kvd_error_from_wire(int wire) {
  switch (wire) {
#define KVD__ERR_FROM(name, value, wire, msg)                                                      \
  case wire:                                                                                       \
    return value;
    KVD_ERROR_TABLE(KVD__ERR_FROM)
#undef KVD__ERR_FROM
  default:
    return KVD_EPROTO;
  }
}
