/* Driving a scheduler from a test or benchmark the way the daemon's loop does: submit requests,
 * wait for the engine thread's notification, drain events into per-request outputs. */
#ifndef KVD_TESTS_SCHED_DRIVER_H
#define KVD_TESTS_SCHED_DRIVER_H

#include "scheduler.h"

#include <stdbool.h>
#include <stdint.h>

#define DRV_MAX_IDS 2048

struct drv_out {
  int32_t ids[DRV_MAX_IDS];
  float logprob[DRV_MAX_IDS];
  float gap[DRV_MAX_IDS]; /* top-1 minus top-2 log-prob (with logprobs >= 2), else 0 */
  uint32_t n;
  uint32_t cancel_at; /* > 0: sched_cancel once this many tokens arrived */
  bool done;
  enum sched_finish finish;
  int error;
};

/* The notify callback to pass in sched_opts (notify_ud unused). */
void drv_notify(void *ud);
/* Drains events until every request in reqs[0, n) is done; outs[i] belongs to reqs[i]. */
void drv_run(struct sched *s, struct sched_req **reqs, struct drv_out *outs, uint32_t n);

#endif
