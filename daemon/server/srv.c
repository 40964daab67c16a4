/* The server's lifetime: socket, signals, and the drain on SIGTERM (the device and the startup
 * model come from daemon.c). */
#include "srv.h"

#include "kvd_error.h"
#include "log.h"
#include "sd.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

double srv_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void srv_on_signal(uv_signal_t *h, int signum) {
  struct srv *s = h->data;
  if (s->draining) {
    log_warn("second %s: exiting without waiting", strsignal(signum));
    for (struct srv_conn *c = s->conns; c; c = c->next)
      srv_conn_close(c);
    return;
  }
  log_info("%s: draining in-flight requests, then exiting", strsignal(signum));
  srv_drain(s);
}

static void srv_on_hup(uv_signal_t *h, int signum) {
  (void)h;
  (void)signum;
  log_info("SIGHUP: ignored (kvd reads its configuration once, at start: restart it to apply "
           "a change)");
}

void srv_init(struct srv *s, uv_loop_t *loop, const struct kvd_config *cfg,
              const struct srv_device *device) {
  memset(s, 0, sizeof *s);
  s->loop = loop;
  s->cfg = cfg;
  s->device = *device;
  s->started = srv_now();
}

int srv_start(struct srv *s) {
  uv_loop_t *loop = s->loop;
  const struct kvd_config *cfg = s->cfg;
  int rc;
  uv_signal_init(loop, &s->sig_term);
  uv_signal_init(loop, &s->sig_int);
  uv_signal_init(loop, &s->sig_hup);
  s->signals = true;
  rc = srv_listen(s);
  if (rc < 0) return rc;
  s->sig_term.data = s->sig_int.data = s->sig_hup.data = s;
  uv_signal_start(&s->sig_term, srv_on_signal, SIGTERM);
  uv_signal_start(&s->sig_int, srv_on_signal, SIGINT);
  /* SIGHUP (a closed terminal, `systemctl reload`, a habit) must not kill the daemon and leave
   * its socket behind: it is logged and otherwise ignored. */
  uv_signal_start(&s->sig_hup, srv_on_hup, SIGHUP);
  /* A client that vanishes mid-write must not kill the daemon. */
  signal(SIGPIPE, SIG_IGN);
  char status[160];
  snprintf(status, sizeof status, "serving %s on %s", s->models ? s->models->name : "no model",
           cfg->socket);
  sdn_ready(status);
  return 0;
}

/* Idle when no generation is live, attached or not: a client that left mid-drain leaves its
 * requests detached (in no connection's list) but still running on the engine thread, holding
 * their model (n_active). What n_active may still count is idle sessions of open connections,
 * which closing the connections releases. */
static bool srv_idle(const struct srv *s) {
  for (const struct srv_conn *c = s->conns; c; c = c->next)
    if (c->gens) return false;
  for (const struct srv_model *m = s->models; m; m = m->next) {
    uint32_t idle_sessions = 0;
    for (const struct srv_conn *c = s->conns; c; c = c->next)
      for (const struct srv_session *ss = c->sessions; ss; ss = ss->next)
        idle_sessions += ss->m == m && !ss->busy;
    if (m->n_active > idle_sessions) return false;
  }
  return true;
}

/* How long the drain waits for slow readers to take what was written for them. */
#define SRV_DRAIN_WRITE_MS 10000

static void srv_on_drain_timer(uv_timer_t *t) {
  struct srv *s = t->data;
  log_warn("drain: clients still not reading after %d s; closing them", SRV_DRAIN_WRITE_MS / 1000);
  for (struct srv_conn *c = s->conns, *next; c; c = next) {
    next = c->next;
    srv_conn_close(c);
  }
}

void srv_maybe_finish(struct srv *s) {
  if (!s->draining || !srv_idle(s)) return;
  /* Everything in flight is answered: each connection closes once what is queued for it is
   * written (a slow reader still gets its last answers), within SRV_DRAIN_WRITE_MS. */
  for (struct srv_conn *c = s->conns, *next; c; c = next) {
    next = c->next;
    srv_conn_finish(c);
  }
  if (s->conns && !s->drain_timer_open && uv_timer_init(s->loop, &s->drain_timer) == 0) {
    s->drain_timer_open = true;
    s->drain_timer.data = s;
    uv_timer_start(&s->drain_timer, srv_on_drain_timer, SRV_DRAIN_WRITE_MS, 0);
  }
  if (!s->conns && s->drain_timer_open) {
    uv_close((uv_handle_t *)&s->drain_timer, NULL);
    s->drain_timer_open = false;
  }
  if (s->listening) {
    uv_close((uv_handle_t *)&s->listener, NULL);
    s->listening = false;
  }
  if (s->signals) {
    uv_close((uv_handle_t *)&s->sig_term, NULL);
    uv_close((uv_handle_t *)&s->sig_int, NULL);
    uv_close((uv_handle_t *)&s->sig_hup, NULL);
    s->signals = false;
  }
  if (s->models) srv_models_free(s);
}

void srv_abort(struct srv *s) {
  s->draining = true;
  srv_listen_unlink(s);
  srv_maybe_finish(s);
}

void srv_drain(struct srv *s) {
  if (s->draining) return;
  s->draining = true;
  sdn_stopping();
  if (s->listening) {
    uv_close((uv_handle_t *)&s->listener, NULL);
    s->listening = false;
    srv_listen_unlink(s);
  }
  srv_maybe_finish(s);
}

void srv_destroy(struct srv *s) {
  (void)s; /* everything it holds went with the loop; the device is the daemon's */
}
