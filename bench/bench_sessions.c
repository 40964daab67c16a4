/* Sessions that last: time to first token of the next turn of a session holding an H-token
 * history (default 1000) when its KV is cold (recomputed), in the device pool, in the host-RAM
 * tier (swapped out), in a saved session file (read, restored, swapped in); the time to save and
 * to restore; and a pool too small for three generating sessions, preempted by swap against by
 * recomputation. A benchmark, not a test: it prints numbers for BENCHMARKS.md.
 * Usage: bench_sessions MODEL.gguf [history_tokens] */
#include "bench_util.h"
#include "engine.h"
#include "gpu.h"
#include "kvd_error.h"
#include "scheduler.h"
#include "store.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int notified;

static void on_notify(void *ud) {
  (void)ud;
  pthread_mutex_lock(&mu);
  notified = 1;
  pthread_cond_signal(&cv);
  pthread_mutex_unlock(&mu);
}

/* Runs reqs to their ends; returns the seconds it took. */
static double run_all(struct sched *s, struct sched_req **reqs, int n) {
  double t0 = bench_now();
  for (int i = 0; i < n; i++)
    sched_submit(s, reqs[i]);
  int left = n;
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
        left -= ev[i].done;
  }
  return bench_now() - t0;
}

static struct sched_req *req(const int32_t *t, uint32_t n, uint32_t gen, struct sched_session *ss) {
  struct sched_req *r;
  if (sched_req_new(t, n, &r) < 0) exit(1);
  r->sp = (struct sample_params){.temperature = 0, .top_p = 1, .repeat_penalty = 1};
  r->max_tokens = gen;
  r->session = ss;
  return r;
}

/* One turn; its time to first token in ms. */
static double turn(struct sched *s, struct sched_session *ss, const int32_t *t, uint32_t n,
                   uint32_t gen) {
  struct sched_req *r = req(t, n, gen, ss);
  run_all(s, &r, 1);
  double ttft = (r->t_first - r->t_submit) * 1e3;
  sched_req_free(r);
  return ttft;
}

static struct sched *make(struct gpu_device *dev, struct gguf_file *f, uint32_t n_blocks,
                          uint64_t host) {
  struct engine *e = NULL;
  struct model_error merr = {{0}};
  struct sched *s = NULL;
  if (engine_new(
          dev, f,
          &(struct engine_opts){
              .n_blocks = n_blocks, .max_step_tokens = 256, .max_logits = 8, .kv_type = KV_F16},
          &e, &merr) < 0 ||
      sched_new(e,
                &(struct sched_opts){.step_tokens = 256, .notify = on_notify, .host_bytes = host},
                &s) < 0) {
    fprintf(stderr, "setup: %s\n", merr.msg);
    exit(1);
  }
  return s;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: bench_sessions MODEL.gguf [history_tokens]\n");
    return 2;
  }
  uint32_t H = argc > 2 ? (uint32_t)atoi(argv[2]) : 1000;
  struct gguf_file *f;
  struct gguf_error gerr;
  if (gguf_open(argv[1], &f, &gerr) < 0) {
    fprintf(stderr, "%s: %s\n", argv[1], gerr.msg);
    return 1;
  }
  struct gpu_instance *inst;
  struct gpu_device *dev;
  if (bench_device_open(NULL, &inst, &dev) < 0) return 1;
  uint32_t nv = 0;
  int32_t *hist = malloc((H + 64) * sizeof *hist), next[16];
  char dir[] = "/tmp/kvd-bench-sessions-XXXXXX";
  if (!hist || !mkdtemp(dir)) return 1;
  /* History blocks + the interloper that pushes the session out: a pool of about 1.5 histories. */
  uint32_t hb = (H + 16 + 15) / 16, pool = hb + hb / 2 + 4;
  struct sched *s = make(dev, f, pool, 1ull << 30);
  nv = engine_hparams(sched_engine(s))->n_vocab;
  for (int i = 0; i < 16; i++)
    next[i] = 3 + (int32_t)((i * 31u + 5) % (nv - 3));
  printf("%s on %s, KV f16, %u-token history, next turn 16 tokens, best of 3\n", argv[1],
         gpu_device_caps(dev)->name, H);
  double best[6] = {1e9, 1e9, 1e9, 1e9, 1e9, 1e9}, save_ms = 1e9, read_ms = 1e9;
  uint64_t file_bytes = 0;
  for (int round = 0; round < 3; round++) {
    /* A new history each round: the prefix cache must not serve the cold turn. */
    hist[0] = 1;
    for (uint32_t i = 1; i < H + 64; i++)
      hist[i] = 3 + (int32_t)((i * 7919u + (uint32_t)round * 104729u) % (nv - 3));
    struct sched_session *a;
    sched_session_new(s, &a);
    double cold = turn(s, a, hist, H, 1); /* the history computed: what a cold turn costs */
    double vram = turn(s, a, next, 16, 1);
    /* Out to the host tier: a one-shot prompt that needs most of the pool. */
    turn(s, NULL, hist + 7, (pool - hb / 2) * 16 - 40, 1);
    double ram = turn(s, a, next, 16, 1);
    /* Saved and read back (the file is in the page cache, as right after a restart's read). */
    struct sched_req *r = req(NULL, 0, 0, a);
    struct store_session st;
    memset(&st, 0, sizeof st);
    st.id = (struct store_identity){{1, 2}, KV_F16, 16, engine_kv_block_bytes(sched_engine(s))};
    r->snapshot = &st.snap;
    double t0 = bench_now();
    run_all(s, &r, 1);
    sched_req_free(r);
    store_session_write(dir, "bench", &st, &file_bytes);
    double t1 = bench_now();
    sched_snapshot_clear(&st.snap);
    struct store_session back;
    char err[160];
    double t2 = bench_now();
    if (store_session_read(dir, "bench", &st.id, nv, &back, err, sizeof err) < 0) return 1;
    struct sched_session *b;
    sched_session_restore(s, &back.snap, &b);
    double t3 = bench_now();
    double disk = turn(s, b, next, 16, 1) + (t3 - t2) * 1e3;
    sched_session_free(s, a);
    sched_session_free(s, b);
    /* Recomputed: no host tier, and the prefix cache overwritten. */
    struct sched *s0 = make(dev, f, pool, 0);
    struct sched_session *c;
    sched_session_new(s0, &c);
    turn(s0, c, hist, H, 1);
    turn(s0, NULL, hist + 7, (pool - hb / 2) * 16 - 40, 1);
    double recompute = turn(s0, c, next, 16, 1);
    sched_session_free(s0, c);
    sched_free(s0);
    double v[6] = {cold, vram, ram, disk, recompute, 0};
    for (int i = 0; i < 5; i++)
      if (v[i] < best[i]) best[i] = v[i];
    if ((t1 - t0) * 1e3 < save_ms) save_ms = (t1 - t0) * 1e3;
    if ((t3 - t2) * 1e3 < read_ms) read_ms = (t3 - t2) * 1e3;
  }
  printf("time to first token of the next turn:\n");
  printf("  cold (the whole history prefilled)       %8.1f ms\n", best[0]);
  printf("  session in the device pool               %8.1f ms\n", best[1]);
  printf("  swapped to the host tier, swapped back   %8.1f ms\n", best[2]);
  printf("  pushed out with no tier (recomputed)     %8.1f ms\n", best[4]);
  printf("  from a session file (read + restore + swap-in) %8.1f ms\n", best[3]);
  printf("save (snapshot + atomic write of %llu bytes): %.1f ms; read and check: %.1f ms\n",
         (unsigned long long)file_bytes, save_ms, read_ms);
  sched_free(s);

  /* The prefix cache's disk tier across a restart: the same H-token prompt cold, then in a new
   * scheduler over the tier the first one wrote at exit. */
  double disk_ttft[2] = {0, 0};
  uint64_t disk_hits = 0;
  for (int pass = 0; pass < 2; pass++) {
    struct engine *e = NULL;
    struct model_error merr = {{0}};
    struct tier_disk *t = NULL;
    struct sched *d = NULL;
    if (engine_new(dev, f, &(struct engine_opts){.n_blocks = pool, .kv_type = KV_F16}, &e, &merr) <
            0 ||
        tier_disk_open(dir, "bench", engine_kv_block_bytes(e), 1ull << 30, &t) < 0 ||
        sched_new(e, &(struct sched_opts){.step_tokens = 256, .notify = on_notify, .disk = t}, &d) <
            0)
      return 1;
    disk_ttft[pass] = turn(d, NULL, hist, H, 1);
    struct sched_stats st;
    sched_get_stats(d, &st);
    disk_hits = st.disk_hits;
    sched_free(d); /* writes the prefix cache to the tier */
  }
  printf("one-shot %u-token prompt: cold %.1f ms, after a restart from the disk tier %.1f ms "
         "(%llu blocks read)\n",
         H, disk_ttft[0], disk_ttft[1], (unsigned long long)disk_hits);

  /* Three sessions generating 200 tokens each on a pool that holds two of them. */
  uint32_t G = 200, P = 64, need = (P + G + 15) / 16;
  for (int tier = 1; tier >= 0; tier--) {
    struct sched *t = make(dev, f, 2 * need + need / 2, tier ? 1ull << 30 : 0);
    struct sched_session *ss[3];
    struct sched_req *rs[3];
    for (int i = 0; i < 3; i++) {
      sched_session_new(t, &ss[i]);
      rs[i] = req(hist + 100 * i, P, G, ss[i]);
    }
    double sec = run_all(t, rs, 3);
    struct sched_stats st;
    sched_get_stats(t, &st);
    printf("3 sessions x %u tokens on a pool of %u blocks, preempted by %s: %.2f s (%.1f tok/s), "
           "%llu preemptions, %llu swapped out, %llu recomputed\n",
           G, 2 * need + need / 2, tier ? "swap" : "recomputation", sec, 3 * G / sec,
           (unsigned long long)st.preemptions, (unsigned long long)st.swap_out,
           (unsigned long long)st.swap_recomputed);
    for (int i = 0; i < 3; i++) {
      sched_req_free(rs[i]);
      sched_session_free(t, ss[i]);
    }
    sched_free(t);
  }
  store_session_delete(dir, "bench");
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir); /* the tier's block files */
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
  free(hist);
  gpu_device_free(dev);
  gpu_instance_free(inst);
  gguf_close(f);
  return 0;
}
