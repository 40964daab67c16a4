/* KV-type accuracy measurement (kvacc.h). */
#include "kvacc.h"

#include "kvd_error.h"
#include "sample.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int new_engine(struct gpu_device *dev, const struct gguf_file *f, enum kv_type t,
                      uint32_t n_tokens, struct engine **ret) {
  struct model_error err;
  return engine_new(
      dev, f, &(struct engine_opts){.n_blocks = n_tokens / 16 + 4, .kv_type = t, .block_size = 16},
      ret, &err);
}

static uint32_t argmax(const float *x, uint32_t n) {
  uint32_t b = 0;
  for (uint32_t i = 1; i < n; i++)
    if (x[i] > x[b]) b = i;
  return b;
}

int kvacc_text(struct gpu_device *dev, const struct gguf_file *f, const int32_t *prompt,
               uint32_t n_prompt, int32_t *text, uint32_t n_text) {
  if (n_prompt == 0 || n_prompt > n_text) return KVD_EINVAL;
  struct engine *e;
  int rc = new_engine(dev, f, KV_F32, n_text, &e);
  if (rc < 0) return rc;
  uint32_t nv = engine_hparams(e)->n_vocab;
  int32_t eos = engine_hparams(e)->eos_id;
  float *lg = malloc(nv * sizeof *lg);
  struct engine_seq *s = NULL;
  rc = lg ? engine_seq_new(e, &s) : KVD_ENOMEM;
  memcpy(text, prompt, n_prompt * sizeof *text);
  uint32_t n = n_prompt;
  if (rc == 0) {
    struct engine_item it = {s, text, n_prompt, lg, 1};
    rc = engine_forward(e, &it, 1);
  }
  while (rc == 0 && n < n_text) {
    int32_t next = (int32_t)argmax(lg, nv);
    if (next == eos) break;
    text[n++] = next;
    struct engine_item it = {s, &text[n - 1], 1, lg, 1};
    rc = engine_forward(e, &it, 1);
  }
  if (s) engine_seq_free(e, s);
  engine_free(e);
  free(lg);
  return rc < 0 ? rc : (int)n;
}

int kvacc_measure(struct gpu_device *dev, const struct gguf_file *f, enum kv_type kv_type,
                  const int32_t *text, uint32_t n_text, struct kvacc_result *ret) {
  struct engine *ea = NULL, *eb = NULL;
  int rc = new_engine(dev, f, KV_F32, n_text, &ea);
  if (rc == 0) rc = new_engine(dev, f, kv_type, n_text, &eb);
  uint32_t nv = ea ? engine_hparams(ea)->n_vocab : 0;
  float *la = malloc((size_t)nv * 4), *lb = malloc((size_t)nv * 4);
  float *pa = malloc((size_t)nv * 4), *pb = malloc((size_t)nv * 4);
  struct engine_seq *sa = NULL, *sb = NULL;
  if (rc == 0 && (!la || !lb || !pa || !pb)) rc = KVD_ENOMEM;
  if (rc == 0) rc = engine_seq_new(ea, &sa);
  if (rc == 0) rc = engine_seq_new(eb, &sb);
  struct kvacc_result r = {0};
  double nll_a = 0, nll_b = 0, agree = 0;
  /* Every position's logits predict the next token: the first position alone, then one token
   * per step (the decode path, reading what earlier steps stored). */
  for (uint32_t i = 0; rc == 0 && i + 1 < n_text; i++) {
    struct engine_item ia = {sa, &text[i], 1, la, 1}, ib = {sb, &text[i], 1, lb, 1};
    if ((rc = engine_forward(ea, &ia, 1)) < 0 || (rc = engine_forward(eb, &ib, 1)) < 0) break;
    sample_log_softmax(la, pa, nv);
    sample_log_softmax(lb, pb, nv);
    double kl = 0;
    for (uint32_t v = 0; v < nv; v++)
      kl += exp((double)pa[v]) * ((double)pa[v] - pb[v]);
    r.mean_kl += kl;
    if (kl > r.max_kl) r.max_kl = kl;
    agree += argmax(la, nv) == argmax(lb, nv);
    nll_a -= pa[text[i + 1]];
    nll_b -= pb[text[i + 1]];
    r.n++;
  }
  if (rc == 0 && r.n) {
    r.mean_kl /= r.n;
    r.top1 = agree / r.n;
    r.ppl_f32 = exp(nll_a / r.n);
    r.ppl_type = exp(nll_b / r.n);
    *ret = r;
  }
  if (sa) engine_seq_free(ea, sa);
  if (sb) engine_seq_free(eb, sb);
  engine_free(ea);
  engine_free(eb);
  free(la), free(lb), free(pa), free(pb);
  return rc;
}
