/* The listening socket: socket activation, or a path of our own with stale-socket detection and
 * owner-only (or group) permissions. */
#include "srv.h"

#include "kvd_error.h"
#include "log.h"
#include "sd.h"

#include <errno.h>
#include <grp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static void listen_on_connection(uv_stream_t *server, int status) {
  struct srv *s = server->data;
  if (status < 0) {
    log_warn("accept: %s", uv_strerror(status));
    return;
  }
  srv_conn_accept(s);
}

/* mkdir -p of the socket's folder, private to the user: the folder's mode is the first fence.
 * With a socket group the folder kvd creates is the group's too (0750), or the socket's 0660
 * would be behind a door the group cannot pass. */
static int listen_mkdirs(const char *path, const struct group *grp) {
  char buf[sizeof(((struct sockaddr_un *)0)->sun_path)];
  snprintf(buf, sizeof buf, "%s", path);
  char *slash = strrchr(buf, '/');
  if (!slash || slash == buf) return 0;
  *slash = '\0';
  for (char *p = buf + 1; *p; p++) {
    if (*p != '/') continue;
    *p = '\0';
    if (mkdir(buf, 0755) < 0 && errno != EEXIST) return -errno;
    *p = '/';
  }
  if (mkdir(buf, grp ? 0750 : 0700) == 0) {
    if (grp && (chown(buf, (uid_t)-1, grp->gr_gid) < 0 || chmod(buf, 0750) < 0)) return -errno;
    return 0;
  }
  if (errno != EEXIST) return -errno;
  struct stat st;
  if (grp && stat(buf, &st) == 0 && (st.st_gid != grp->gr_gid || !(st.st_mode & S_IXGRP)))
    log_warn("%s exists and is not open to group %s: its members cannot reach the socket", buf,
             grp->gr_name);
  return 0;
}

/* Removes the socket kvd bound, and only that: whatever now sits at the path (another kvd's
 * socket after a restart, a file someone put there) is left alone. */
void srv_listen_unlink(struct srv *s) {
  if (!s->own_socket) return;
  s->own_socket = false;
  struct stat st;
  if (lstat(s->cfg->socket, &st) < 0) return;
  if (!S_ISSOCK(st.st_mode) || st.st_dev != s->sock_dev || st.st_ino != s->sock_ino) {
    log_info("%s is no longer the socket kvd created; leaving it", s->cfg->socket);
    return;
  }
  unlink(s->cfg->socket);
}

/* A socket file left by a crashed kvd refuses connections: remove it. One that accepts belongs
 * to a running kvd: refuse to start rather than steal it. */
static int listen_check_stale(const char *path) {
  struct stat st;
  if (lstat(path, &st) < 0) return errno == ENOENT ? 0 : -errno;
  if (!S_ISSOCK(st.st_mode)) {
    log_err("%s exists and is not a socket; not touching it", path);
    return KVD_EEXIST;
  }
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
  int rc = connect(fd, (struct sockaddr *)&sa, sizeof sa);
  int err = errno;
  close(fd);
  if (rc == 0) {
    log_err("another kvd is already listening on %s", path);
    return KVD_EEXIST;
  }
  if (err == ECONNREFUSED || err == ENOENT) {
    log_info("removing stale socket %s", path);
    unlink(path);
    return 0;
  }
  return -err;
}

int srv_listen(struct srv *s) {
  const struct kvd_config *cfg = s->cfg;
  int rc = uv_pipe_init(s->loop, &s->listener, 0);
  if (rc < 0) return KVD_EIO;
  s->listener.data = s;
  s->listening = true;
  int fd = sdn_listen_fd();
  if (fd >= 0) {
    rc = uv_pipe_open(&s->listener, fd);
    if (rc < 0) {
      log_err("socket activation: cannot use fd %d: %s", fd, uv_strerror(rc));
      return KVD_EIO;
    }
    log_info("listening on the socket systemd passed (fd %d)", fd);
  } else {
    if (strlen(cfg->socket) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
      log_err("socket path too long: %s", cfg->socket);
      return KVD_E2BIG;
    }
    struct group *grp = NULL;
    if (cfg->socket_group && !(grp = getgrnam(cfg->socket_group))) {
      log_err("socket group %s: no such group", cfg->socket_group);
      return KVD_EACCES;
    }
    rc = listen_mkdirs(cfg->socket, grp);
    if (rc == 0) rc = listen_check_stale(cfg->socket);
    if (rc < 0) {
      if (rc != KVD_EEXIST) log_err("%s: %s", cfg->socket, strerror(-rc));
      return rc;
    }
    /* Bound here and handed to libuv as a descriptor: a pipe libuv bound itself is unlinked by
     * path when it closes, whatever is at that path by then (srv_listen_unlink checks it is
     * still our socket). Created 0600 from the start (no window where others could connect),
     * widened below. */
    int sfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sfd < 0) {
      log_err("socket: %s", strerror(errno));
      return KVD_EIO;
    }
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", cfg->socket);
    mode_t old = umask(0177);
    rc = bind(sfd, (struct sockaddr *)&sa, sizeof sa);
    int bind_errno = errno;
    umask(old);
    if (rc < 0) {
      close(sfd);
      log_err("bind %s: %s", cfg->socket, strerror(bind_errno));
      return KVD_EIO;
    }
    rc = uv_pipe_open(&s->listener, sfd);
    if (rc < 0) {
      close(sfd);
      unlink(cfg->socket);
      log_err("%s: %s", cfg->socket, uv_strerror(rc));
      return KVD_EIO;
    }
    struct stat st;
    if (lstat(cfg->socket, &st) == 0) {
      s->own_socket = true;
      s->sock_dev = st.st_dev;
      s->sock_ino = st.st_ino;
    }
    if (grp && (chown(cfg->socket, (uid_t)-1, grp->gr_gid) < 0 || chmod(cfg->socket, 0660) < 0)) {
      log_err("socket group %s: %s", cfg->socket_group, strerror(errno));
      return KVD_EACCES;
    }
    log_info("listening on %s", cfg->socket);
  }
  rc = uv_listen((uv_stream_t *)&s->listener, 64, listen_on_connection);
  if (rc < 0) {
    log_err("listen: %s", uv_strerror(rc));
    return KVD_EIO;
  }
  return 0;
}
