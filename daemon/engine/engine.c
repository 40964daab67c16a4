/* The engine's lifetime: the model's weights in device memory, the KV pool and its buffers,
 * the activations, sequences. A step is assembled in engine_step.c and recorded in
 * engine_forward.c (engine_internal.h has the structs they share). */
#include "engine_internal.h"

#include "kvd_error.h"

#include <stdlib.h>
#include <string.h>

#define DEFAULT_STEP_TOKENS 512
#define DEFAULT_MAX_LOGITS 64
#define DEFAULT_KV_FRACTION 0.5
/* Without a byte budget, no more KV than this many full-context sequences is worth holding. */
#define KV_MAX_FULL_SEQS 32

static int eng_fail(struct model_error *err, int rc, const char *what) {
  if (err)
    snprintf(err->msg, sizeof err->msg, "%s: %s (%s)", what, kvd_strerror(rc), gpu_error_detail());
  return rc;
}

/* An f32 copy of a vector tensor (norm weights and biases are tiny; any stored type works). */
static int eng_upload_vector(struct engine *e, const struct gguf_tensor *t, const char *name,
                             struct gpu_buffer **ret) {
  uint64_t n = t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3];
  float *tmp = malloc(n * sizeof(float));
  if (!tmp) return KVD_ENOMEM;
  int rc = dtype_dequant_row(t->type, t->data, tmp, n);
  if (rc == 0) rc = gpu_buffer_new(e->dev, n * sizeof(float), GPU_MEM_DEVICE, name, ret);
  if (rc == 0) rc = gpu_buffer_upload(e->dev, *ret, 0, tmp, n * sizeof(float));
  free(tmp);
  return rc;
}

static int eng_wkern(struct engine *e, enum dtype t) {
  if (e->wk[t]) return 0;
  if (!wkern_supported(t)) return KVD_E_UNSUPPORTED;
  struct wkern *k = calloc(1, sizeof *k);
  if (!k) return KVD_ENOMEM;
  int rc = wkern_init(k, e->dev, t, NULL);
  if (rc < 0) {
    free(k);
    return rc;
  }
  e->wk[t] = k;
  return 0;
}

/* Uploads a matrix once: tied embeddings and classifiers share one buffer. */
static int eng_matrix(struct engine *e, const struct gguf_tensor *t, uint64_t *done, uint64_t total,
                      const struct engine_opts *o, struct eng_matrix **ret) {
  for (uint32_t i = 0; i < e->n_mats; i++)
    if (e->mats[i].t == t) {
      *ret = &e->mats[i];
      return 0;
    }
  struct eng_matrix *m = &e->mats[e->n_mats];
  uint64_t bytes;
  int rc = eng_wkern(e, t->type);
  if (rc == 0) rc = wkern_weight_bytes(t->type, t->ne[1], t->ne[0], &bytes);
  if (rc < 0) return rc;
  char name[96];
  snprintf(name, sizeof name, "%.*s", (int)t->name.len, t->name.ptr);
  rc = gpu_buffer_new(e->dev, bytes, GPU_MEM_DEVICE, name, &m->buf);
  if (rc < 0) return rc;
  /* The padding up to a word boundary is read by the shaders but never used: zero it. */
  rc = gpu_buffer_upload(e->dev, m->buf, 0, t->data, t->nbytes);
  if (rc == 0 && bytes > t->nbytes) {
    static const uint8_t zero[4];
    rc = gpu_buffer_upload(e->dev, m->buf, t->nbytes, zero, bytes - t->nbytes);
  }
  if (rc < 0) {
    gpu_buffer_free(m->buf);
    m->buf = NULL;
    return rc;
  }
  m->t = t;
  m->type = t->type;
  m->m = (struct wkern_matrix){
      .buf = m->buf, .offset = 0, .rows = (uint32_t)t->ne[1], .cols = (uint32_t)t->ne[0]};
  e->n_mats++;
  *done += t->nbytes;
  if (o->progress) o->progress(o->progress_ud, *done, total);
  *ret = m;
  return 0;
}

static int eng_upload_weights(struct engine *e, const struct engine_opts *o) {
  const struct model_weights *w = e->w;
  uint32_t n_l = e->hp.n_layer;
  e->mats = calloc((size_t)n_l * 7 + 2, sizeof *e->mats);
  if (!e->mats) return KVD_ENOMEM;
  uint64_t total = w->token_embd->nbytes + (w->tied ? 0 : w->output->nbytes), done = 0;
  for (uint32_t l = 0; l < n_l; l++) {
    const struct model_layer *ml = &w->layers[l];
    total += ml->attn_q->nbytes + ml->attn_k->nbytes + ml->attn_v->nbytes +
             ml->attn_output->nbytes + ml->ffn_gate->nbytes + ml->ffn_up->nbytes +
             ml->ffn_down->nbytes;
  }
  int rc = eng_matrix(e, w->token_embd, &done, total, o, &e->embd);
  if (rc == 0) rc = eng_matrix(e, w->output, &done, total, o, &e->output);
  if (rc == 0) rc = eng_upload_vector(e, w->output_norm, "output_norm", &e->output_norm);
  for (uint32_t l = 0; l < n_l && rc == 0; l++) {
    const struct model_layer *ml = &w->layers[l];
    struct eng_layer *el = &e->layers[l];
    rc = eng_upload_vector(e, ml->attn_norm, "attn_norm", &el->attn_norm);
    if (rc == 0) rc = eng_upload_vector(e, ml->ffn_norm, "ffn_norm", &el->ffn_norm);
    if (rc == 0 && ml->attn_q_bias)
      rc = eng_upload_vector(e, ml->attn_q_bias, "q_bias", &el->q_bias);
    if (rc == 0 && ml->attn_k_bias)
      rc = eng_upload_vector(e, ml->attn_k_bias, "k_bias", &el->k_bias);
    if (rc == 0 && ml->attn_v_bias)
      rc = eng_upload_vector(e, ml->attn_v_bias, "v_bias", &el->v_bias);
    if (rc == 0 && ml->attn_q_norm)
      rc = eng_upload_vector(e, ml->attn_q_norm, "q_norm", &el->q_norm);
    if (rc == 0 && ml->attn_k_norm)
      rc = eng_upload_vector(e, ml->attn_k_norm, "k_norm", &el->k_norm);
    if (rc == 0 && ml->attn_post_norm)
      rc = eng_upload_vector(e, ml->attn_post_norm, "attn_post_norm", &el->attn_post);
    if (rc == 0 && ml->ffn_post_norm)
      rc = eng_upload_vector(e, ml->ffn_post_norm, "ffn_post_norm", &el->ffn_post);
    if (rc == 0) rc = eng_matrix(e, ml->attn_q, &done, total, o, &el->q);
    if (rc == 0) rc = eng_matrix(e, ml->attn_k, &done, total, o, &el->k);
    if (rc == 0) rc = eng_matrix(e, ml->attn_v, &done, total, o, &el->v);
    if (rc == 0) rc = eng_matrix(e, ml->attn_output, &done, total, o, &el->o);
    if (rc == 0) rc = eng_matrix(e, ml->ffn_gate, &done, total, o, &el->gate);
    if (rc == 0) rc = eng_matrix(e, ml->ffn_up, &done, total, o, &el->up);
    if (rc == 0) rc = eng_matrix(e, ml->ffn_down, &done, total, o, &el->down);
  }
  return rc;
}

static int eng_alloc_kv_locked(struct engine *e, const struct engine_opts *o,
                               struct model_error *err) {
  const struct gpu_caps *c = gpu_device_caps(e->dev);
  struct kv_geometry geom = {
      .n_layer = e->hp.n_layer,
      .block_size = o->block_size ? o->block_size : KV_BLOCK_SIZE_DEFAULT,
      .token_bytes = e->kv_token_bytes,
  };
  uint64_t budget = o->kv_bytes;
  if (o->n_blocks) {
    budget = (uint64_t)o->n_blocks * geom.block_size * geom.token_bytes * 2 * geom.n_layer +
             2 * geom.n_layer * c->min_storage_align;
  } else if (!budget) {
    double frac = o->kv_fraction > 0 ? o->kv_fraction : DEFAULT_KV_FRACTION;
    budget = kv_budget_fraction(gpu_device_free_memory(e->dev), frac);
    uint64_t useful =
        (uint64_t)KV_MAX_FULL_SEQS * e->hp.n_ctx_train * geom.token_bytes * 2 * geom.n_layer;
    if (budget > useful) budget = useful;
  }
  int rc = kv_plan_pool(&geom, budget, c->max_storage_range, c->min_storage_align, &e->plan);
  if (rc < 0) {
    if (err)
      snprintf(err->msg, sizeof err->msg, "KV cache: a budget of %llu bytes: %s",
               (unsigned long long)budget, kvd_strerror(rc));
    return rc;
  }
  if (o->n_blocks && e->plan.n_blocks > o->n_blocks) {
    e->plan.n_blocks = o->n_blocks;
    e->plan.buffer_bytes = (uint64_t)o->n_blocks * e->plan.block_bytes;
  }
  rc = kv_pool_init(&e->pool, e->plan.n_blocks, geom.block_size);
  /* The prefix cache's keys name content computed in this KV type (kv.h key_seed). */
  e->pool.key_seed = 0x9e3779b97f4a7c15ull * (uint64_t)e->attn.kv_type;
  for (uint32_t l = 0; l < e->hp.n_layer && rc == 0; l++) {
    rc =
        gpu_buffer_new(e->dev, e->plan.buffer_bytes, GPU_MEM_DEVICE, "kv K", &e->layers[l].k_cache);
    if (rc == 0)
      rc = gpu_buffer_new(e->dev, e->plan.buffer_bytes, GPU_MEM_DEVICE, "kv V",
                          &e->layers[l].v_cache);
  }
  return rc < 0 ? eng_fail(err, rc, "allocating the KV cache") : 0;
}

/* The KV cache takes a share of the free device memory: measured and allocated under the
 * device's budget lock, so a model loading at the same time measures what this one left. */
static int eng_alloc_kv(struct engine *e, const struct engine_opts *o, struct model_error *err) {
  gpu_device_budget_lock(e->dev);
  int rc = eng_alloc_kv_locked(e, o, err);
  gpu_device_budget_unlock(e->dev);
  return rc;
}

static int eng_alloc_activations(struct engine *e) {
  const struct model_hparams *hp = &e->hp;
  uint64_t t = e->max_tokens, f = sizeof(float);
  struct {
    struct gpu_buffer **buf;
    uint64_t bytes;
    const char *name;
    enum gpu_mem_kind kind;
  } a[] = {
      {&e->x, t * hp->n_embd * f, "x", GPU_MEM_DEVICE},
      {&e->xn, t * hp->n_embd * f, "xn", GPU_MEM_DEVICE},
      {&e->q, t * e->q_dim * f, "q", GPU_MEM_DEVICE},
      {&e->k, t * e->kv_dim * f, "k", GPU_MEM_DEVICE},
      {&e->v, t * e->kv_dim * f, "v", GPU_MEM_DEVICE},
      {&e->att, t * e->q_dim * f, "att", GPU_MEM_DEVICE},
      {&e->gate, t * hp->n_ff * f, "gate", GPU_MEM_DEVICE},
      {&e->up, t * hp->n_ff * f, "up", GPU_MEM_DEVICE},
      {&e->xl, (uint64_t)e->max_logits * hp->n_embd * f, "xl", GPU_MEM_DEVICE},
      {&e->logits, (uint64_t)e->max_logits * hp->n_vocab * f, "logits", GPU_MEM_HOST},
  };
  for (size_t i = 0; i < sizeof a / sizeof a[0]; i++) {
    int rc = gpu_buffer_new(e->dev, a[i].bytes, a[i].kind, a[i].name, a[i].buf);
    if (rc < 0) return rc;
  }
  e->logit_rows = malloc(e->max_logits * sizeof *e->logit_rows);
  if (!e->logit_rows) return KVD_ENOMEM;
  /* Tables: every sequence in a full step could span the whole context. */
  uint64_t per_seq = e->hp.n_ctx_train / e->pool.block_size + 2;
  return engine__layout_step(e, per_seq * 8);
}

int engine_new(struct gpu_device *dev, const struct gguf_file *f, const struct engine_opts *opts,
               struct engine **ret, struct model_error *err) {
  struct engine_opts defaults = {0};
  if (!opts) opts = &defaults;
  struct engine *e = calloc(1, sizeof *e);
  if (!e) return KVD_ENOMEM;
  e->dev = dev;
  e->f = f;
  int rc = model_weights_new(f, &e->w, err);
  if (rc < 0) goto fail;
  e->hp = e->w->hp;
  e->q_dim = e->hp.n_head * e->hp.head_dim;
  e->kv_dim = e->hp.n_head_kv * e->hp.head_dim;
  e->drop_window = model_all_windowed(&e->hp) ? e->hp.n_swa : 0;
  e->max_tokens = opts->max_step_tokens ? opts->max_step_tokens : DEFAULT_STEP_TOKENS;
  e->max_logits = opts->max_logits ? opts->max_logits : DEFAULT_MAX_LOGITS;
  if (e->max_logits > e->max_tokens) e->max_logits = e->max_tokens;

  rc = ops_init(&e->ops, dev, NULL);
  if (rc < 0) {
    eng_fail(err, rc, "creating the element-wise kernels");
    goto fail;
  }
  /* Each layer's RoPE, its frequency table uploaded now rather than mid-recording (layers
   * sharing settings share a table). The context run is the model's (n_ctx_train). */
  e->layers = calloc(e->hp.n_layer, sizeof *e->layers);
  if (!e->layers) rc = KVD_ENOMEM;
  for (uint32_t l = 0; rc == 0 && l < e->hp.n_layer; l++) {
    model_layer_rope(&e->hp, l, e->hp.n_ctx_train, &e->layers[l].rope);
    e->layers[l].window = model_layer_window(&e->hp, l);
    rc = ops_rope_prepare(&e->ops, &e->layers[l].rope);
  }
  /* One token's K (or V) in one layer, in the chosen KV type. */
  uint32_t row_words = 0;
  if (rc == 0 && (rc = kv_row_words(opts->kv_type, e->hp.head_dim, &row_words)) < 0) {
    if (err)
      snprintf(err->msg, sizeof err->msg, "KV type %s cannot store heads of %u values",
               kv_type_name(opts->kv_type), e->hp.head_dim);
    goto fail;
  }
  e->kv_token_bytes = (uint64_t)e->hp.n_head_kv * row_words * 4;
  if (rc == 0) rc = attn_init(&e->attn, dev, opts->kv_type, e->hp.head_dim);
  if (rc < 0) {
    eng_fail(err, rc, "creating the attention kernels");
    goto fail;
  }
  if (e->hp.head_dim > e->attn.max_hd) {
    rc = KVD_E_UNSUPPORTED;
    if (err)
      snprintf(err->msg, sizeof err->msg, "head_dim %u is above the attention kernel's %u",
               e->hp.head_dim, e->attn.max_hd);
    goto fail;
  }
  rc = eng_upload_weights(e, opts);
  if (rc < 0) {
    eng_fail(err, rc, "uploading weights");
    goto fail;
  }
  rc = eng_alloc_kv(e, opts, err);
  if (rc < 0) goto fail;
  rc = eng_alloc_activations(e);
  if (rc == 0) rc = gpu_cmd_new(dev, &e->cmd);
  if (rc < 0) {
    eng_fail(err, rc, "allocating activations");
    goto fail;
  }
  *ret = e;
  return 0;
fail:
  engine_free(e);
  return rc;
}

void engine_free(struct engine *e) {
  if (!e) return;
  while (e->seqs)
    engine_seq_free(e, e->seqs);
  gpu_cmd_free(e->cmd);
  struct gpu_buffer *bufs[] = {e->x,  e->xn, e->q,      e->k,       e->v,    e->att,        e->gate,
                               e->up, e->xl, e->logits, e->partial, e->step, e->output_norm, e->shift_moves, e->swap_staging};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    gpu_buffer_free(bufs[i]);
  if (e->layers) {
    for (uint32_t l = 0; l < e->hp.n_layer; l++) {
      struct eng_layer *el = &e->layers[l];
      struct gpu_buffer *lb[] = {el->attn_norm, el->ffn_norm, el->q_bias,  el->k_bias, el->v_bias,
                                 el->q_norm,    el->k_norm,   el->k_cache, el->v_cache,
                                 el->attn_post, el->ffn_post};
      for (size_t i = 0; i < sizeof lb / sizeof lb[0]; i++)
        gpu_buffer_free(lb[i]);
    }
  }
  for (uint32_t i = 0; i < e->n_mats; i++)
    gpu_buffer_free(e->mats[i].buf);
  for (int t = 0; t < DTYPE_MAX; t++)
    if (e->wk[t]) {
      wkern_destroy(e->wk[t]);
      free(e->wk[t]);
    }
  attn_destroy(&e->attn);
  ops_destroy(&e->ops);
  kv_pool_destroy(&e->pool);
  free(e->mats);
  free(e->layers);
  free(e->tables_host);
  free(e->offsets_host);
  free(e->logit_rows);
  free(e->seq_ptrs);
  model_weights_free(e->w);
  free(e);
}

const struct model_hparams *engine_hparams(const struct engine *e) {
  return &e->hp;
}

void engine_kv_stats(const struct engine *e, struct kv_pool_stats *ret) {
  kv_pool_stats(&e->pool, ret);
}

uint64_t engine_kv_bytes_per_token(const struct engine *e) {
  return e->kv_token_bytes * 2 * e->hp.n_layer;
}

enum kv_type engine_kv_type(const struct engine *e) {
  return e->attn.kv_type;
}

uint32_t engine_max_logits(const struct engine *e) {
  return e->max_logits;
}

uint32_t engine_max_step_tokens(const struct engine *e) {
  return e->max_tokens;
}

/* Every open sequence is on the engine's list, so engine_free() can give back what clients left. */
static void eng_seq_link(struct engine *e, struct engine_seq *s) {
  s->next = e->seqs;
  if (e->seqs) e->seqs->prev = s;
  e->seqs = s;
}

int engine_seq_new(struct engine *e, struct engine_seq **ret) {
  struct engine_seq *s = calloc(1, sizeof *s);
  if (!s) return KVD_ENOMEM;
  int rc = kv_seq_new(&e->pool, &s->kv);
  if (rc < 0) {
    free(s);
    return rc;
  }
  eng_seq_link(e, s);
  *ret = s;
  return 0;
}

void engine_seq_free(struct engine *e, struct engine_seq *s) {
  if (!s) return;
  if (s->prev)
    s->prev->next = s->next;
  else
    e->seqs = s->next;
  if (s->next) s->next->prev = s->prev;
  kv_seq_free(&e->pool, s->kv);
  free(s);
}

int engine_seq_new_prefix(struct engine *e, const int32_t *tokens, uint32_t n_tokens,
                          struct engine_seq **ret, uint32_t *ret_cached) {
  struct engine_seq *s = calloc(1, sizeof *s);
  if (!s) return KVD_ENOMEM;
  int rc = kv_seq_new_with_prefix(&e->pool, tokens, n_tokens, &s->kv, ret_cached);
  if (rc < 0) {
    free(s);
    return rc;
  }
  eng_seq_link(e, s);
  *ret = s;
  return 0;
}

int engine_seq_register(struct engine *e, struct engine_seq *s, const int32_t *history,
                        uint32_t n) {
  return kv_seq_register_blocks(&e->pool, s->kv, history, n);
}

uint32_t engine_seq_step_blocks(const struct engine *e, const struct engine_seq *s, uint32_t n) {
  return kv_seq_step_blocks(&e->pool, s->kv, n);
}

uint32_t engine_kv_available(const struct engine *e) {
  return kv_pool_available(&e->pool);
}

uint32_t engine_seq_len(const struct engine_seq *s) {
  return s->kv->len;
}

int engine_seq_truncate(struct engine *e, struct engine_seq *s, uint32_t n) {
  return kv_seq_truncate(&e->pool, s->kv, n);
}

int engine_seq_drop_window(struct engine *e, struct engine_seq *s, uint32_t keep_from) {
  /* Only when every layer is windowed: one global layer reads every position. */
  if (!e->drop_window) return 0;
  uint32_t len = s->kv->len, w = e->drop_window;
  if (len + 1 <= w) return 0;
  uint32_t pos = len + 1 - w;
  if (keep_from < pos) pos = keep_from;
  return kv_seq_drop_before(&e->pool, s->kv, pos);
}

uint32_t engine_seq_live_blocks(const struct engine_seq *s) {
  return kv_seq_live_blocks(s->kv);
}

int engine_seq_fork(struct engine *e, const struct engine_seq *src, struct engine_seq **ret) {
  struct engine_seq *s = calloc(1, sizeof *s);
  if (!s) return KVD_ENOMEM;
  int rc = kv_seq_fork(&e->pool, src->kv, &s->kv);
  if (rc < 0) {
    free(s);
    return rc;
  }
  eng_seq_link(e, s);
  *ret = s;
  return 0;
}

int engine_seq_reserve(const struct engine *e, uint32_t n_tokens, struct engine_seq **ret) {
  struct engine_seq *s = calloc(1, sizeof *s);
  if (!s) return KVD_ENOMEM;
  int rc = kv_seq_new_reserved(&e->pool, n_tokens, &s->kv);
  if (rc < 0) {
    free(s);
    return rc;
  }
  *ret = s;
  return 0;
}

int engine_seq_fork_into(struct engine *e, const struct engine_seq *src, struct engine_seq *dst) {
  int rc = kv_seq_fork_into(&e->pool, src->kv, dst->kv);
  if (rc < 0) return rc;
  eng_seq_link(e, dst);
  return 0;
}

void engine_seq_unreserve(struct engine_seq *s) {
  if (!s) return;
  kv_seq_free(NULL, s->kv); /* empty: touches no pool */
  free(s);
}

uint32_t engine_last_timings(const struct engine *e, const struct gpu_timing **ret) {
  return gpu_cmd_timings(e->cmd, ret);
}
