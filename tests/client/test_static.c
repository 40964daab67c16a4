/* Links libkvd.a (not the shared library) the way a program that wants no runtime dependency on
 * libkvd would, using the error functions that exist both in libkvd and in the ipc codec bundled
 * into the archive: the link itself is most of the test. Exit status 0 on success. */
#include "kvd.h"

#include <stdio.h>
#include <string.h>

int main(void) {
  struct kvd_client *c;
  int rc = kvd_client_connect("/nonexistent/kvd.sock", &c);
  if (rc != KVD_ECONNREFUSED) {
    fprintf(stderr, "connect: %d, want KVD_ECONNREFUSED\n", rc);
    return 1;
  }
  if (strcmp(kvd_strerror(rc), "connection refused (is kvd running?)") != 0 ||
      kvd_error_to_wire(rc) != 16 || kvd_error_from_wire(16) != rc ||
      strlen(kvd_library_version()) == 0 || !strstr(kvd_client_last_error(NULL), "kvd --model")) {
    fprintf(stderr, "error functions disagree\n");
    return 1;
  }
  printf("static libkvd %s ok\n", kvd_library_version());
  return 0;
}
