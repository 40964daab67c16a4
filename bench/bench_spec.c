/* Speculative decoding: decode tokens/s, acceptance and tokens per step of one greedy request
 * (and of 8 at once) with speculation off, prompt lookup, the draft model and auto, in
 * alternating rounds of one run, on two prompts:
 *   story    BOS alone (stories260K tells a story; on a random-weight model, a fixed random prompt)
 *   rewrite  the story the model told (its first 200 tokens), then BOS and its first 8 tokens
 *            again: a rewrite-this-text task, where the answer repeats the prompt
 * A benchmark, not a test: it prints numbers for BENCHMARKS.md and asserts nothing about speed.
 * Usage: bench_spec TARGET.gguf [DRAFT.gguf] [tokens] [rounds] */
#include "bench_util.h"
#include "engine.h"
#include "gpu.h"
#include "kvd_error.h"
#include "sched_driver.h"
#include "scheduler.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PAR 8

struct result {
  double tok_s, accept, per_step;
  uint32_t drafted, accepted;
};

static struct engine *open_engine(struct gpu_device *dev, const char *path, struct gguf_file **f) {
  struct gguf_error gerr;
  if (gguf_open(path, f, &gerr) < 0) {
    fprintf(stderr, "bench_spec: %s: %s\n", path, gerr.msg);
    return NULL;
  }
  struct engine *e = NULL;
  struct model_error err = {{0}};
  int rc = engine_new(dev, *f, &(struct engine_opts){.kv_type = KV_F16, .max_logits = 96}, &e, &err);
  if (rc < 0) fprintf(stderr, "bench_spec: %s: %s %s\n", path, kvd_strerror(rc), err.msg);
  return rc < 0 ? NULL : e;
}

/* n_par greedy requests of prompt in mode m, `gen` tokens each; out (may be NULL) gets the
 * first one's tokens. */
static int run_mode(struct sched *s, const int32_t *prompt, uint32_t n_prompt, uint32_t gen,
                    enum sched_spec m, uint32_t n_par, struct result *res, struct drv_out *out) {
  struct sched_req *reqs[MAX_PAR];
  struct drv_out *outs = calloc(n_par, sizeof *outs);
  if (!outs) return KVD_ENOMEM;
  for (uint32_t i = 0; i < n_par; i++) {
    int rc = sched_req_new(prompt, n_prompt, &reqs[i]);
    if (rc < 0) return rc;
    reqs[i]->sp = (struct sample_params){.temperature = 0, .top_p = 1, .repeat_penalty = 1};
    reqs[i]->max_tokens = gen;
    reqs[i]->spec = m;
  }
  struct sched_stats a, b;
  sched_get_stats(s, &a);
  for (uint32_t i = 0; i < n_par; i++)
    sched_submit(s, reqs[i]);
  drv_run(s, reqs, outs, n_par);
  sched_get_stats(s, &b);
  double first = 1e300, end = 0;
  uint32_t tokens = 0;
  *res = (struct result){0};
  for (uint32_t i = 0; i < n_par; i++) {
    if (reqs[i]->t_first < first) first = reqs[i]->t_first;
    if (reqs[i]->t_end > end) end = reqs[i]->t_end;
    tokens += outs[i].n > 0 ? outs[i].n - 1 : 0;
    res->drafted += reqs[i]->draft_tokens;
    res->accepted += reqs[i]->accepted_tokens;
    sched_req_free(reqs[i]);
  }
  if (out) *out = outs[0];
  free(outs);
  uint64_t steps = b.decode_tokens - a.decode_tokens; /* decode items run */
  res->tok_s = end > first ? tokens / (end - first) : 0;
  res->accept = res->drafted ? (double)res->accepted / res->drafted : 0;
  res->per_step = steps ? (double)tokens / steps : 0;
  return 0;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: bench_spec TARGET.gguf [DRAFT.gguf] [tokens] [rounds]\n");
    return 2;
  }
  const char *draft_path = argc > 2 && strcmp(argv[2], "-") != 0 ? argv[2] : NULL;
  uint32_t gen = argc > 3 ? (uint32_t)atoi(argv[3]) : 200;
  int rounds = argc > 4 ? atoi(argv[4]) : 3;
  if (gen < 16 || gen > 1500 || rounds < 1 || rounds > 20) return 2;
  struct gpu_instance *inst;
  struct gpu_device *dev;
  if (bench_device_open(NULL, &inst, &dev) < 0) {
    fprintf(stderr, "bench_spec: no device: %s\n", gpu_error_detail());
    return 1;
  }
  struct gguf_file *f = NULL, *df = NULL;
  struct engine *e = open_engine(dev, argv[1], &f), *d = NULL;
  if (!e || (draft_path && !(d = open_engine(dev, draft_path, &df)))) return 1;
  uint32_t n_vocab = engine_hparams(e)->n_vocab;
  struct sched *s;
  if (sched_new(e, &(struct sched_opts){.notify = drv_notify, .draft = d}, &s) < 0) return 1;
  printf("device: %s\ntarget: %s\ndraft: %s\n%u tokens, %d rounds, medians\n",
         gpu_device_caps(dev)->name, argv[1], draft_path ? draft_path : "(none)", gen, rounds);

  /* The story: from BOS on a trained model; a random model gets a fixed random prompt. */
  int32_t story_prompt[33] = {1};
  uint32_t n_story_prompt = 1;
  if (n_vocab != 512) {
    for (int i = 1; i < 33; i++)
      story_prompt[i] = 3 + (int32_t)((i * 7919) % (n_vocab - 3));
    n_story_prompt = 33;
  }
  struct drv_out *told = calloc(1, sizeof *told);
  struct result r0;
  if (!told || run_mode(s, story_prompt, n_story_prompt, 200, SCHED_SPEC_OFF, 1, &r0, told) < 0)
    return 1;
  int32_t rewrite[1 + 200 + 1 + 8 + 33];
  uint32_t n_rw = 0;
  memcpy(rewrite, story_prompt, n_story_prompt * sizeof *rewrite);
  n_rw = n_story_prompt;
  memcpy(rewrite + n_rw, told->ids, told->n * sizeof *rewrite);
  n_rw += told->n;
  rewrite[n_rw++] = 1;
  memcpy(rewrite + n_rw, told->ids, 8 * sizeof *rewrite);
  n_rw += 8;

  enum sched_spec modes[] = {SCHED_SPEC_OFF, SCHED_SPEC_LOOKUP, SCHED_SPEC_DRAFT, SCHED_SPEC_AUTO};
  const char *mname[] = {"auto", "off", "lookup", "draft"};
  int n_modes = d ? 4 : 3;
  if (!d) modes[2] = SCHED_SPEC_AUTO;
  const char *pname[] = {"story", "rewrite"};
  for (int p = 0; p < 2; p++)
    for (uint32_t par = 1; par <= MAX_PAR; par *= MAX_PAR) {
      const int32_t *pr = p ? rewrite : story_prompt;
      uint32_t npr = p ? n_rw : n_story_prompt;
      double tps[4][20], acc[4][20], per[4][20];
      for (int k = 0; k < rounds; k++)
        for (int m = 0; m < n_modes; m++) {
          struct result res;
          if (run_mode(s, pr, npr, gen, modes[m], par, &res, NULL) < 0) return 1;
          tps[m][k] = res.tok_s;
          acc[m][k] = res.accept;
          per[m][k] = res.per_step;
        }
      for (int m = 0; m < n_modes; m++) {
        qsort(tps[m], rounds, sizeof(double), cmp_double);
        qsort(acc[m], rounds, sizeof(double), cmp_double);
        qsort(per[m], rounds, sizeof(double), cmp_double);
      }
      for (int m = 0; m < n_modes; m++)
        printf("%-8s x%u  %-7s %8.1f tok/s (%.2fx off, min %.1f max %.1f)  accepted %4.0f%%  "
               "%.2f tokens/step\n",
               pname[p], par, mname[modes[m]], tps[m][rounds / 2],
               tps[0][rounds / 2] > 0 ? tps[m][rounds / 2] / tps[0][rounds / 2] : 0, tps[m][0],
               tps[m][rounds - 1], 100 * acc[m][rounds / 2], per[m][rounds / 2]);
    }
  free(told);
  sched_free(s);
  gguf_close(f);
  gguf_close(df);
  gpu_device_free(dev);
  gpu_instance_free(inst);
  return 0;
}
