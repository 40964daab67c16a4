/* systemd integration: socket activation and readiness notification (Type=notify).
 * With libsystemd (optional at build time) it uses sd_listen_fds()/sd_notify(); without it,
 * activation still works (LISTEN_PID/LISTEN_FDS are read directly) and notification is skipped. */
#ifndef KVD_SD_H
#define KVD_SD_H

/* The listening socket systemd passed (LISTEN_FDS), or -1 when not socket-activated. */
int sdn_listen_fd(void);
/* READY=1 with a STATUS= line. */
void sdn_ready(const char *status);
/* STATUS=... for `systemctl status`. */
void sdn_status(const char *status);
/* STOPPING=1: a drain has begun. */
void sdn_stopping(void);

#endif
