#include "sched_driver.h"

#include <pthread.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int notified;

void drv_notify(void *ud) {
  (void)ud;
  pthread_mutex_lock(&mu);
  notified++;
  pthread_cond_signal(&cv);
  pthread_mutex_unlock(&mu);
}

static void drv_take(struct sched_req **reqs, struct drv_out *outs, uint32_t n,
                     const struct sched_event *ev, uint32_t *left) {
  uint32_t j = 0;
  while (j < n && reqs[j] != ev->req)
    j++;
  if (j == n) return;
  struct drv_out *o = &outs[j];
  if (ev->done) {
    o->done = true;
    o->finish = ev->finish;
    o->error = ev->error;
    (*left)--;
    return;
  }
  if (o->n >= DRV_MAX_IDS) return;
  o->ids[o->n] = ev->token;
  o->logprob[o->n] = ev->logprob;
  o->gap[o->n] = ev->n_top >= 2 ? ev->top_logprob[0] - ev->top_logprob[1] : 0;
  o->n++;
  if (o->cancel_at && o->n == o->cancel_at) sched_cancel(reqs[j]);
}

void drv_run(struct sched *s, struct sched_req **reqs, struct drv_out *outs, uint32_t n) {
  uint32_t left = n;
  while (left > 0) {
    pthread_mutex_lock(&mu);
    while (!notified)
      pthread_cond_wait(&cv, &mu);
    notified = 0;
    pthread_mutex_unlock(&mu);
    struct sched_event ev[64];
    uint32_t k;
    while ((k = sched_drain(s, ev, 64)) > 0)
      for (uint32_t i = 0; i < k; i++)
        drv_take(reqs, outs, n, &ev[i], &left);
  }
}
