#include "engine.h"

#include "attn.h"
#include "kvd_error.h"
#include "ops.h"
#include "wkern.h"

#include <stdlib.h>
#include <string.h>

#define DEFAULT_STEP_TOKENS 512
#define DEFAULT_MAX_LOGITS 64
#define DEFAULT_KV_FRACTION 0.5
/* Without a byte budget, no more KV than this many full-context sequences is worth holding. */
#define KV_MAX_FULL_SEQS 32

/* A weight matrix in device memory, exactly as stored in the file. */
struct eng_matrix {
  struct gpu_buffer *buf;
  const struct gguf_tensor *t;
  struct wkern_matrix m;
  enum dtype type;
};

struct eng_layer {
  struct gpu_buffer *attn_norm, *ffn_norm;     /* (n_embd) f32 */
  struct gpu_buffer *q_bias, *k_bias, *v_bias; /* f32 or NULL */
  struct eng_matrix *q, *k, *v, *o, *gate, *up, *down;
  struct gpu_buffer *k_cache, *v_cache; /* (n_blocks, n_head_kv, block_size, head_dim) f32 */
};

/* Offsets of the per-step arrays inside the step buffer (bytes, storage-aligned). */
struct eng_step_layout {
  uint64_t ids, pos, slots, tok_info, tables, size;
  uint64_t tables_cap; /* entries */
};

struct engine_seq {
  struct kv_seq *kv;
  struct engine_seq *prev, *next; /* every open sequence, freed with the engine */
};

struct engine {
  struct gpu_device *dev;
  const struct gguf_file *f;
  struct model_weights *w;
  struct model_hparams hp;
  uint32_t q_dim, kv_dim;
  uint32_t max_tokens, max_logits;

  struct ops ops;
  struct ops_rope_cfg rope;
  struct attn_kernels attn;
  struct wkern *wk[DTYPE_MAX]; /* one per weight type the model uses */

  struct eng_matrix *mats; /* every distinct matrix tensor, uploaded once */
  uint32_t n_mats;
  struct eng_matrix *embd, *output;
  struct gpu_buffer *output_norm;
  struct eng_layer *layers;

  struct kv_pool pool;
  struct kv_plan plan;
  struct engine_seq *seqs;

  /* activations, (max_tokens, width) f32 */
  struct gpu_buffer *x, *xn, *q, *k, *v, *att, *gate, *up;
  struct gpu_buffer *xl;     /* (max_logits, n_embd): the rows logits are computed for */
  struct gpu_buffer *logits; /* (max_logits, n_vocab), host-visible */
  struct gpu_buffer *partial;
  uint64_t partial_bytes;
  struct gpu_buffer *step; /* host-visible per-step arrays */
  struct eng_step_layout lay;
  uint32_t *tables_host;
  uint32_t *offsets_host;
  uint32_t *logit_rows; /* (max_logits) token rows whose logits a step returns */
  const struct kv_seq **seq_ptrs;
  uint32_t cap_items;

  struct gpu_cmd *cmd;
};

static uint64_t align_up(uint64_t v, uint64_t a) {
  return a > 1 ? (v + a - 1) / a * a : v;
}

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
  e->layers = calloc(n_l, sizeof *e->layers);
  if (!e->mats || !e->layers) return KVD_ENOMEM;
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
      .token_bytes = (uint64_t)e->kv_dim * sizeof(float),
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

static int eng_layout_step(struct engine *e, uint64_t tables_cap) {
  uint64_t a = gpu_device_caps(e->dev)->min_storage_align, t = e->max_tokens, off = 0;
  struct eng_step_layout *L = &e->lay;
  L->ids = off;
  off = align_up(off + t * 4, a);
  L->pos = off;
  off = align_up(off + t * 4, a);
  L->slots = off;
  off = align_up(off + t * 4, a);
  L->tok_info = off;
  off = align_up(off + t * 8, a);
  L->tables = off;
  off += tables_cap * 4;
  L->size = off;
  L->tables_cap = tables_cap;
  gpu_buffer_free(e->step);
  e->step = NULL;
  free(e->tables_host);
  e->tables_host = malloc(tables_cap * 4);
  if (!e->tables_host) return KVD_ENOMEM;
  return gpu_buffer_new(e->dev, L->size, GPU_MEM_MAPPABLE, "step arrays", &e->step);
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
  return eng_layout_step(e, per_seq * 8);
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
  e->max_tokens = opts->max_step_tokens ? opts->max_step_tokens : DEFAULT_STEP_TOKENS;
  e->max_logits = opts->max_logits ? opts->max_logits : DEFAULT_MAX_LOGITS;
  if (e->max_logits > e->max_tokens) e->max_logits = e->max_tokens;

  rc = ops_init(&e->ops, dev, NULL);
  if (rc < 0) {
    eng_fail(err, rc, "creating the element-wise kernels");
    goto fail;
  }
  e->rope = (struct ops_rope_cfg){.n_rot = e->hp.n_rot,
                                  .mode = e->hp.rope_mode,
                                  .freq_base = e->hp.rope_freq_base,
                                  .freq_scale = e->hp.rope_freq_scale};
  rc = ops_rope_prepare(&e->ops, &e->rope);
  if (rc == 0) rc = attn_init(&e->attn, dev);
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
                               e->up, e->xl, e->logits, e->partial, e->step, e->output_norm};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    gpu_buffer_free(bufs[i]);
  if (e->layers) {
    for (uint32_t l = 0; l < e->hp.n_layer; l++) {
      struct eng_layer *el = &e->layers[l];
      struct gpu_buffer *lb[] = {el->attn_norm, el->ffn_norm, el->q_bias, el->k_bias,
                                 el->v_bias,    el->k_cache,  el->v_cache};
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
  return (uint64_t)e->kv_dim * sizeof(float) * 2 * e->hp.n_layer;
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

static struct gpu_binding bind(struct gpu_buffer *b) {
  return (struct gpu_binding){b, 0, 0};
}

static struct gpu_binding bind_at(struct gpu_buffer *b, uint64_t off, uint64_t range) {
  return (struct gpu_binding){b, off, range};
}

static struct wkern_act act(struct gpu_buffer *b, uint32_t stride) {
  return (struct wkern_act){.buf = b, .offset = 0, .stride = stride};
}

static int eng_mul(struct engine *e, const struct eng_matrix *m, struct gpu_buffer *x,
                   struct gpu_buffer *y, uint32_t n_tokens, bool accumulate) {
  struct wkern_act xa = act(x, m->m.cols), ya = act(y, m->m.rows);
  return wkern_mul(e->wk[m->type], e->cmd, &m->m, &xa, &ya, n_tokens, accumulate);
}

/* Attention's per-split partial results grow to the largest step seen. */
static int eng_reserve_partials(struct engine *e, uint32_t n_tok, uint32_t splits) {
  uint64_t pbytes = attn_partial_bytes(n_tok, e->hp.n_head, e->hp.head_dim, splits);
  if (pbytes <= e->partial_bytes) return 0;
  gpu_buffer_free(e->partial);
  e->partial = NULL;
  e->partial_bytes = 0;
  int rc = gpu_buffer_new(e->dev, pbytes, GPU_MEM_DEVICE, "attention partials", &e->partial);
  if (rc == 0) e->partial_bytes = pbytes;
  return rc;
}

/* Records the whole forward pass of one step (see engine.h). Recording errors stick in the
 * command buffer (gpu.h): no call below is checked, the submit returns the first error. */
static int eng_record(struct engine *e, uint32_t n_tok, uint32_t n_logits,
                      const uint32_t *logit_rows, uint32_t max_kv, const struct kv_copy *copies,
                      uint32_t n_copies) {
  const struct model_hparams *hp = &e->hp;
  struct gpu_cmd *cmd = e->cmd;
  struct gpu_buffer *st = e->step;
  const struct eng_step_layout *L = &e->lay;

  /* gpu_cmd_begin refuses while an earlier submission may still run; only after it may the
   * attention partials buffer be replaced. */
  int rc = gpu_cmd_begin(cmd);
  if (rc < 0) return rc;
  uint32_t splits = attn_pick_splits(&e->attn, max_kv, n_tok * hp->n_head);
  gpu_cmd_fail(cmd, eng_reserve_partials(e, n_tok, splits));

  /* Copy-on-write: a shared partial block is copied in every layer before anything writes it. */
  for (uint32_t c = 0; c < n_copies; c++)
    for (uint32_t l = 0; l < hp->n_layer; l++) {
      uint64_t bb = e->plan.block_bytes;
      gpu_cmd_copy(cmd, e->layers[l].k_cache, copies[c].src_block * bb, e->layers[l].k_cache,
                   copies[c].dst_block * bb, bb);
      gpu_cmd_copy(cmd, e->layers[l].v_cache, copies[c].src_block * bb, e->layers[l].v_cache,
                   copies[c].dst_block * bb, bb);
    }

  struct wkern_act xa = act(e->x, hp->n_embd);
  wkern_embed(e->wk[e->embd->type], cmd, &e->embd->m, st, L->ids, n_tok, &xa);
  gpu_cmd_barrier(cmd);

  struct attn_shape ash = {.n_tokens = n_tok,
                           .n_head = hp->n_head,
                           .n_head_kv = hp->n_head_kv,
                           .head_dim = hp->head_dim,
                           .block_size = e->pool.block_size,
                           .q_stride = e->q_dim,
                           .n_splits = splits,
                           .max_kv = max_kv};
  struct gpu_binding pos = bind_at(st, L->pos, (uint64_t)n_tok * 4);
  for (uint32_t l = 0; l < hp->n_layer; l++) {
    struct eng_layer *el = &e->layers[l];
    ops_rmsnorm(&e->ops, cmd, bind(e->x), bind(el->attn_norm), bind(e->xn), n_tok, hp->n_embd,
                hp->rms_eps);
    gpu_cmd_barrier(cmd);
    eng_mul(e, el->q, e->xn, e->q, n_tok, false);
    eng_mul(e, el->k, e->xn, e->k, n_tok, false);
    eng_mul(e, el->v, e->xn, e->v, n_tok, false);
    gpu_cmd_barrier(cmd);
    if (el->q_bias) ops_add_bias(&e->ops, cmd, bind(e->q), bind(el->q_bias), n_tok, e->q_dim);
    if (el->k_bias) ops_add_bias(&e->ops, cmd, bind(e->k), bind(el->k_bias), n_tok, e->kv_dim);
    if (el->v_bias) ops_add_bias(&e->ops, cmd, bind(e->v), bind(el->v_bias), n_tok, e->kv_dim);
    if (el->q_bias || el->k_bias || el->v_bias) gpu_cmd_barrier(cmd);
    ops_rope(&e->ops, cmd, bind(e->q), pos, n_tok, hp->n_head, hp->head_dim, 0, &e->rope);
    ops_rope(&e->ops, cmd, bind(e->k), pos, n_tok, hp->n_head_kv, hp->head_dim, 0, &e->rope);
    gpu_cmd_barrier(cmd);
    attn_record_write(&e->attn, cmd, bind(e->k), bind(e->v), bind(el->k_cache), bind(el->v_cache),
                      bind_at(st, L->slots, (uint64_t)n_tok * 4), n_tok, hp->n_head_kv,
                      hp->head_dim, e->pool.block_size, e->kv_dim);
    gpu_cmd_barrier(cmd);
    attn_record(&e->attn, cmd, &ash, bind(e->q), bind(el->k_cache), bind(el->v_cache),
                bind_at(st, L->tok_info, (uint64_t)n_tok * 8), bind_at(st, L->tables, 0),
                bind(e->att), e->partial ? bind(e->partial) : bind(e->att));
    gpu_cmd_barrier(cmd);
    /* x += Wo att: the residual add is fused into the projection. */
    eng_mul(e, el->o, e->att, e->x, n_tok, true);
    gpu_cmd_barrier(cmd);
    ops_rmsnorm(&e->ops, cmd, bind(e->x), bind(el->ffn_norm), bind(e->xn), n_tok, hp->n_embd,
                hp->rms_eps);
    gpu_cmd_barrier(cmd);
    eng_mul(e, el->gate, e->xn, e->gate, n_tok, false);
    eng_mul(e, el->up, e->xn, e->up, n_tok, false);
    gpu_cmd_barrier(cmd);
    ops_swiglu(&e->ops, cmd, bind(e->gate), bind(e->up), bind(e->gate), n_tok, hp->n_ff);
    gpu_cmd_barrier(cmd);
    eng_mul(e, el->down, e->gate, e->x, n_tok, true);
    gpu_cmd_barrier(cmd);
  }

  /* Only the rows that want logits go through the final norm and the classifier. */
  uint64_t row = (uint64_t)hp->n_embd * sizeof(float);
  for (uint32_t i = 0; i < n_logits; i++)
    gpu_cmd_copy(cmd, e->x, logit_rows[i] * row, e->xl, i * row, row);
  gpu_cmd_barrier(cmd);
  if (n_logits) {
    ops_rmsnorm(&e->ops, cmd, bind(e->xl), bind(e->output_norm), bind(e->xl), n_logits, hp->n_embd,
                hp->rms_eps);
    gpu_cmd_barrier(cmd);
    eng_mul(e, e->output, e->xl, e->logits, n_logits, false);
  }
  return gpu_cmd_submit(cmd);
}

static int eng_reserve_items(struct engine *e, uint32_t n_items) {
  if (n_items <= e->cap_items) return 0;
  uint32_t cap = n_items * 2;
  uint32_t *off = realloc(e->offsets_host, cap * sizeof *off);
  if (!off) return KVD_ENOMEM;
  e->offsets_host = off;
  const struct kv_seq **sp = realloc(e->seq_ptrs, cap * sizeof *sp);
  if (!sp) return KVD_ENOMEM;
  e->seq_ptrs = sp;
  e->cap_items = cap;
  return 0;
}

int engine_forward(struct engine *e, struct engine_item *items, uint32_t n_items) {
  const struct model_hparams *hp = &e->hp;
  if (n_items == 0) return KVD_EINVAL;
  int rc = eng_reserve_items(e, n_items);
  if (rc < 0) return rc;

  /* Validate everything and count blocks before touching any sequence: all or nothing. */
  uint64_t n_tok = 0, need_blocks = 0;
  uint32_t n_logits = 0;
  for (uint32_t i = 0; i < n_items; i++) {
    const struct engine_item *it = &items[i];
    if (!it->seq || it->n_tokens == 0 || !it->tokens) return KVD_EINVAL;
    for (uint32_t j = 0; j < it->n_tokens; j++)
      if (it->tokens[j] < 0 || (uint32_t)it->tokens[j] >= hp->n_vocab) return KVD_EINVAL;
    if ((uint64_t)it->seq->kv->len + it->n_tokens > hp->n_ctx_train) return KVD_E_CONTEXT;
    n_tok += it->n_tokens;
    n_logits += it->logits != NULL;
    need_blocks += kv_seq_step_blocks(&e->pool, it->seq->kv, it->n_tokens);
  }
  if (n_tok > e->max_tokens || n_logits > e->max_logits) return KVD_E2BIG;
  /* Cached prefix blocks count as available: an allocation evicts them when the free list is
   * empty. */
  if (need_blocks > kv_pool_available(&e->pool)) {
    e->pool.alloc_failures++;
    return KVD_E_KV_EXHAUSTED;
  }

  struct kv_copy copies_small[16], *copies = copies_small;
  if (n_items > 16 && !(copies = malloc(n_items * sizeof *copies))) return KVD_ENOMEM;
  uint32_t n_copies = 0, done = 0;
  for (; done < n_items && rc == 0; done++) {
    struct kv_seq *kv = items[done].seq->kv;
    uint32_t len = kv->len;
    rc = kv_seq_reserve(&e->pool, kv, items[done].n_tokens);
    if (rc == 0) {
      int c = kv_seq_prepare_write(&e->pool, kv, len, &copies[n_copies]);
      if (c == 1)
        n_copies++;
      else if (c < 0)
        rc = c;
    }
    e->seq_ptrs[done] = kv;
  }
  /* The mirror of every table, then the per-token arrays, straight into the mapped step buffer. */
  size_t entries = rc == 0 ? kv_mirror_entries(e->seq_ptrs, n_items) : 0;
  if (rc == 0 && entries > e->lay.tables_cap) rc = eng_layout_step(e, entries * 2);
  uint8_t *map = rc == 0 ? gpu_buffer_map(e->step) : NULL;
  if (rc == 0 && !map) rc = KVD_E_VULKAN;
  if (rc == 0) {
    int n =
        kv_mirror_write(e->seq_ptrs, n_items, e->tables_host, e->lay.tables_cap, e->offsets_host);
    if (n < 0)
      rc = n;
    else
      memcpy(map + e->lay.tables, e->tables_host, (size_t)n * 4);
  }
  uint32_t max_kv = 0;
  uint32_t *lrows = e->logit_rows;
  uint32_t *ids = (uint32_t *)(map ? map + e->lay.ids : NULL);
  uint32_t *pos = (uint32_t *)(map ? map + e->lay.pos : NULL);
  uint32_t *slots = (uint32_t *)(map ? map + e->lay.slots : NULL);
  uint32_t *info = (uint32_t *)(map ? map + e->lay.tok_info : NULL);
  uint32_t t = 0, li = 0;
  for (uint32_t i = 0; i < n_items && rc == 0; i++) {
    const struct engine_item *it = &items[i];
    struct kv_seq *kv = it->seq->kv;
    for (uint32_t j = 0; j < it->n_tokens && rc == 0; j++, t++) {
      uint32_t p = kv->len + j;
      struct kv_slot slot;
      rc = kv_seq_slot(kv, p, &slot);
      ids[t] = (uint32_t)it->tokens[j];
      pos[t] = p;
      slots[t] = kv_slot_index(slot, e->pool.block_size);
      info[2 * t] = p + 1;
      info[2 * t + 1] = e->offsets_host[i];
      if (p + 1 > max_kv) max_kv = p + 1;
    }
    if (it->logits) lrows[li++] = t - 1;
  }
  if (rc == 0) rc = eng_record(e, (uint32_t)n_tok, n_logits, lrows, max_kv, copies, n_copies);
  if (rc == 0) rc = gpu_cmd_wait(e->cmd);
  if (copies != copies_small) free(copies);
  if (rc < 0) {
    /* Give back what this step reserved; committed tokens stay as they were. */
    for (uint32_t i = 0; i < done; i++)
      kv_seq_truncate(&e->pool, items[i].seq->kv, items[i].seq->kv->len);
    return rc;
  }
  const float *lg = gpu_buffer_map(e->logits);
  li = 0;
  for (uint32_t i = 0; i < n_items; i++) {
    kv_seq_commit(items[i].seq->kv, items[i].n_tokens);
    if (items[i].logits)
      memcpy(items[i].logits, lg + (size_t)li++ * hp->n_vocab, hp->n_vocab * sizeof(float));
  }
  return 0;
}

uint32_t engine_last_timings(const struct engine *e, const struct gpu_timing **ret) {
  return gpu_cmd_timings(e->cmd, ret);
}
