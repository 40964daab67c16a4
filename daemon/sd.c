#include "sd.h"

#include "kvd_config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef KVD_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

/* The first passed descriptor is always 3 (SD_LISTEN_FDS_START). */
#define LISTEN_FDS_START 3

int sdn_listen_fd(void) {
#ifdef KVD_HAVE_SYSTEMD
  int n = sd_listen_fds(1);
  return n >= 1 ? LISTEN_FDS_START : -1;
#else
  const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
  if (!pid || !fds || strtol(pid, NULL, 10) != (long)getpid() || strtol(fds, NULL, 10) < 1)
    return -1;
  /* As sd_listen_fds(1) does: the variables are for this process only, not its children. */
  unsetenv("LISTEN_PID");
  unsetenv("LISTEN_FDS");
  unsetenv("LISTEN_FDNAMES");
  return LISTEN_FDS_START;
#endif
}

void sdn_ready(const char *status) {
#ifdef KVD_HAVE_SYSTEMD
  sd_notifyf(0, "READY=1\nSTATUS=%s", status);
#else
  (void)status;
#endif
}

void sdn_status(const char *status) {
#ifdef KVD_HAVE_SYSTEMD
  sd_notifyf(0, "STATUS=%s", status);
#else
  (void)status;
#endif
}

void sdn_stopping(void) {
#ifdef KVD_HAVE_SYSTEMD
  sd_notify(0, "STOPPING=1\nSTATUS=draining requests");
#endif
}
