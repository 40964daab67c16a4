/* The CPU reference forward pass (ref.h) and its operators (ref_ops.h).
 *
 * One token at a time through a Llama-shaped decoder:
 *   x = embedding[token] (* embd_scale)
 *   per layer:  x += (post-norm) Wo · attention(rope(Wq·rmsnorm(x) + bq), rope(Wk·… + bk) → cache,
 *                                               Wv·… + bv)   (window, scale, soft-cap)
 *               x += (post-norm) Wdown · (act(Wgate·rmsnorm(x)) * Wup·rmsnorm(x))
 *   logits = Wout · rmsnorm(x) (soft-capped)
 * with the family's switches (arch.h) in parentheses.
 * Activations are float32 like the GPU path; sums are float64 so that this side of a comparison
 * carries almost none of the error. */
#include "ref.h"
#include "ref_ops.h"

#include "kvd_error.h"

#include <inttypes.h>
#include <math.h>
#include <stdalign.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ---- operators ---------------------------------------------------------------------------- */

void ref_rmsnorm(float *out, const float *x, const float *w, size_t n, float eps) {
  double ss = 0.0;
  for (size_t i = 0; i < n; i++)
    ss += (double)x[i] * x[i];
  double scale = 1.0 / sqrt(ss / (double)n + (double)eps);
  for (size_t i = 0; i < n; i++)
    out[i] = (float)(x[i] * scale * w[i]);
}

static double dot_f32(const float *a, const float *b, size_t n) {
  double s = 0.0;
  for (size_t i = 0; i < n; i++)
    s += (double)a[i] * b[i];
  return s;
}

void ref_matvec_f32(float *out, const float *w, const float *x, size_t n_out, size_t n_in) {
  for (size_t r = 0; r < n_out; r++)
    out[r] = (float)dot_f32(w + r * n_in, x, n_in);
}

int ref_matvec(float *out, enum dtype type, const void *w, const float *x, size_t n_out,
               size_t n_in, float *row) {
  /* Aligned f32 rows are read in place; everything else goes through the dequantizer, which is
   * the one definition of every block format. */
  if (type == DTYPE_F32 && (uintptr_t)w % alignof(float) == 0) {
    ref_matvec_f32(out, w, x, n_out, n_in);
    return 0;
  }
  uint64_t row_bytes;
  int rc = dtype_row_bytes(type, n_in, &row_bytes);
  if (rc < 0) return rc;
  const uint8_t *src = w;
  for (size_t r = 0; r < n_out; r++) {
    if ((rc = dtype_dequant_row(type, src + r * row_bytes, row, n_in)) < 0) return rc;
    out[r] = (float)dot_f32(row, x, n_in);
  }
  return 0;
}

void ref_rope_ext(float *x, size_t n_tokens, size_t n_heads, size_t head_dim, const uint32_t *pos,
                  const struct model_rope *r) {
  size_t half = r->n_rot / 2;
  double mscale = model_rope_mscale(r);
  for (size_t t = 0; t < n_tokens; t++) {
    for (size_t i = 0; i < half; i++) {
      double theta = (double)pos[t] * model_rope_freq(r, (uint32_t)i);
      double c = cos(theta) * mscale, s = sin(theta) * mscale;
      /* NORMAL rotates adjacent dimensions (2i, 2i+1); NEOX pairs dimension i with i + n_rot/2. */
      size_t i0 = r->mode == MODEL_ROPE_NEOX ? i : 2 * i;
      size_t i1 = r->mode == MODEL_ROPE_NEOX ? i + half : 2 * i + 1;
      for (size_t h = 0; h < n_heads; h++) {
        float *v = x + (t * n_heads + h) * head_dim;
        double a = v[i0], b = v[i1];
        v[i0] = (float)(a * c - b * s);
        v[i1] = (float)(a * s + b * c);
      }
    }
  }
}

void ref_rope(float *x, size_t n_tokens, size_t n_heads, size_t head_dim, size_t n_rot,
              const uint32_t *pos, enum model_rope_mode mode, float freq_base, float freq_scale,
              const float *factors) {
  struct model_rope r = {.n_rot = (uint32_t)n_rot,
                         .mode = mode,
                         .freq_base = freq_base,
                         .freq_scale = freq_scale,
                         .freq_factors = factors};
  ref_rope_ext(x, n_tokens, n_heads, head_dim, pos, &r);
}

void ref_softmax(float *x, size_t n) {
  float max = x[0];
  for (size_t i = 1; i < n; i++)
    if (x[i] > max) max = x[i];
  double sum = 0.0;
  for (size_t i = 0; i < n; i++)
    sum += exp((double)x[i] - max);
  for (size_t i = 0; i < n; i++)
    x[i] = (float)(exp((double)x[i] - max) / sum);
}

void ref_swiglu(float *out, const float *gate, const float *up, size_t n) {
  for (size_t i = 0; i < n; i++) {
    double g = gate[i];
    out[i] = (float)(g / (1.0 + exp(-g)) * up[i]);
  }
}

void ref_geglu(float *out, const float *gate, const float *up, size_t n) {
  const double k = 0.7978845608028654; /* sqrt(2 / pi) */
  for (size_t i = 0; i < n; i++) {
    double g = gate[i];
    out[i] = (float)(0.5 * g * (1.0 + tanh(k * (g + 0.044715 * g * g * g))) * up[i]);
  }
}

void ref_softcap(float *x, size_t n, float c) {
  for (size_t i = 0; i < n; i++)
    x[i] = (float)(c * tanh((double)x[i] / c));
}

void ref_add(float *x, const float *y, size_t n) {
  for (size_t i = 0; i < n; i++)
    x[i] += y[i];
}

void ref_attention_ext(float *out, const float *q, const float *k, const float *v, size_t n_kv,
                       size_t n_head, size_t n_head_kv, size_t head_dim, float *scores,
                       const struct ref_attn_opts *opts) {
  size_t group = n_head / n_head_kv, kv_dim = n_head_kv * head_dim;
  double scale = opts && opts->scale > 0.0f ? opts->scale : 1.0 / sqrt((double)head_dim);
  double cap = opts ? opts->softcap : 0.0;
  size_t t0 = opts && opts->window && n_kv > opts->window ? n_kv - opts->window : 0;
  size_t n = n_kv - t0;
  for (size_t h = 0; h < n_head; h++) {
    const float *qh = q + h * head_dim;
    size_t kv_off = (h / group) * head_dim;
    for (size_t t = 0; t < n; t++) {
      double sc = dot_f32(qh, k + (t0 + t) * kv_dim + kv_off, head_dim) * scale;
      if (cap > 0.0) sc = cap * tanh(sc / cap);
      scores[t] = (float)sc;
    }
    ref_softmax(scores, n);
    for (size_t d = 0; d < head_dim; d++) {
      double acc = 0.0;
      for (size_t t = 0; t < n; t++)
        acc += (double)scores[t] * v[(t0 + t) * kv_dim + kv_off + d];
      out[h * head_dim + d] = (float)acc;
    }
  }
}

void ref_attention_one(float *out, const float *q, const float *k, const float *v, size_t n_kv,
                       size_t n_head, size_t n_head_kv, size_t head_dim, float *scores) {
  ref_attention_ext(out, q, k, v, n_kv, n_head, n_head_kv, head_dim, scores, NULL);
}

/* ---- the model ---------------------------------------------------------------------------- */

/* A weight matrix as the forward pass reads it: n_out rows of n_in values in type. Either the
 * file's own bytes (dequantized a row per use) or an f32 copy made at load (owned). */
struct ref_mat {
  enum dtype type;
  const void *data; /* (n_out, n_in) [out][in], rows of dtype_row_bytes(type, n_in) bytes */
  size_t n_out, n_in;
  float *owned; /* (n_out, n_in) f32 when dequantized at load, else NULL */
};

struct ref_layer {
  float *attn_norm;      /* (n_embd) f32 */
  float *ffn_norm;       /* (n_embd) f32 */
  float *bq;             /* (n_head * head_dim) f32, or NULL without biases */
  float *bk;             /* (n_head_kv * head_dim) f32, or NULL */
  float *bv;             /* (n_head_kv * head_dim) f32, or NULL */
  float *qn, *kn;        /* (head_dim) f32 per-head q/k RMSNorm weights (qwen3), or NULL */
  float *attn_post, *ffn_post; /* (n_embd) f32 post-norms (gemma2/3), or NULL */
  struct model_rope rope;      /* this layer's RoPE (gemma3's local layers differ) */
  uint32_t window;             /* sliding window, 0 = none */
  struct ref_mat wq;     /* (n_head * head_dim, n_embd) */
  struct ref_mat wk;     /* (n_head_kv * head_dim, n_embd) */
  struct ref_mat wv;     /* (n_head_kv * head_dim, n_embd) */
  struct ref_mat wo;     /* (n_embd, n_head * head_dim) */
  struct ref_mat w_gate; /* (n_ff, n_embd) */
  struct ref_mat w_up;   /* (n_ff, n_embd) */
  struct ref_mat w_down; /* (n_embd, n_ff) */
};

struct model_ref {
  struct model_weights *w;
  enum kv_type kv_type; /* what cached K/V rows are rounded through */
  uint32_t *kv_row;     /* one encoded row, scratch */
  struct model_hparams hp;
  uint32_t n_ctx;           /* positions the cache holds */
  uint32_t n_past;          /* positions filled so far */
  struct ref_mat tok_embd;  /* (n_vocab, n_embd) */
  struct ref_mat output;    /* (n_vocab, n_embd); shares tok_embd's data when tied */
  float *output_norm;       /* (n_embd) f32 */
  struct ref_layer *layers; /* (n_layer) */

  /* Activations of the current token, f32. */
  float *x;      /* (n_embd) the residual stream */
  float *xb;     /* (n_embd) normed input of a block, then its output */
  float *xb2;    /* (n_embd) attention output projected back */
  float *q;      /* (n_head, head_dim) */
  float *att;    /* (n_head, head_dim) attention result before Wo */
  float *hb;     /* (n_ff) gate, then silu(gate) * up */
  float *hb2;    /* (n_ff) up */
  float *scores; /* (n_ctx) attention weights of one head */
  float *row;    /* (max(n_embd, n_ff)) one dequantized weight row */
  float *logits; /* (n_vocab) for greedy decoding */
  /* The KV cache: contiguous, (n_layer, n_ctx, n_head_kv * head_dim) f32 each, so a layer's keys
   * are exactly the position-major layout ref_attention_one reads. */
  float *k_cache;
  float *v_cache;
};

__attribute__((format(printf, 3, 4))) static int fail(struct model_error *err, int rc,
                                                      const char *fmt, ...) {
  if (err) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
  }
  return rc;
}

/* A 1-D weight (norm or bias) of n values, dequantized to f32 whatever its type. */
static int load_vec(const struct gguf_tensor *t, size_t n, float **ret) {
  *ret = NULL;
  if (!t) return 0;
  float *v = malloc(n * sizeof *v);
  if (!v) return KVD_ENOMEM;
  int rc = dtype_dequant_row(t->type, t->data, v, n);
  if (rc < 0) {
    free(v);
    return rc;
  }
  *ret = v;
  return 0;
}

static int load_mat(const struct gguf_tensor *t, bool stream, struct ref_mat *m) {
  m->type = t->type;
  m->data = t->data;
  m->n_in = (size_t)t->ne[0];
  m->n_out = (size_t)t->ne[1];
  m->owned = NULL;
  if (stream) return 0;
  uint64_t row_bytes;
  int rc = dtype_row_bytes(t->type, m->n_in, &row_bytes);
  if (rc < 0) return rc;
  float *f = malloc(m->n_out * m->n_in * sizeof *f);
  if (!f) return KVD_ENOMEM;
  const uint8_t *src = t->data;
  for (size_t r = 0; r < m->n_out; r++) {
    if ((rc = dtype_dequant_row(t->type, src + r * row_bytes, f + r * m->n_in, m->n_in)) < 0) {
      free(f);
      return rc;
    }
  }
  m->type = DTYPE_F32;
  m->data = f;
  m->owned = f;
  return 0;
}

static int load_layer(const struct model_layer *l, const struct model_hparams *hp, bool stream,
                      struct ref_layer *rl) {
  size_t d = hp->n_embd, q_dim = (size_t)hp->n_head * hp->head_dim;
  size_t kv_dim = (size_t)hp->n_head_kv * hp->head_dim;
  int rc;
  if ((rc = load_vec(l->attn_norm, d, &rl->attn_norm)) < 0 ||
      (rc = load_vec(l->ffn_norm, d, &rl->ffn_norm)) < 0 ||
      (rc = load_vec(l->attn_q_bias, q_dim, &rl->bq)) < 0 ||
      (rc = load_vec(l->attn_k_bias, kv_dim, &rl->bk)) < 0 ||
      (rc = load_vec(l->attn_v_bias, kv_dim, &rl->bv)) < 0 ||
      (rc = load_vec(l->attn_q_norm, hp->head_dim, &rl->qn)) < 0 ||
      (rc = load_vec(l->attn_k_norm, hp->head_dim, &rl->kn)) < 0 ||
      (rc = load_vec(l->attn_post_norm, d, &rl->attn_post)) < 0 ||
      (rc = load_vec(l->ffn_post_norm, d, &rl->ffn_post)) < 0 ||
      (rc = load_mat(l->attn_q, stream, &rl->wq)) < 0 ||
      (rc = load_mat(l->attn_k, stream, &rl->wk)) < 0 ||
      (rc = load_mat(l->attn_v, stream, &rl->wv)) < 0 ||
      (rc = load_mat(l->attn_output, stream, &rl->wo)) < 0 ||
      (rc = load_mat(l->ffn_gate, stream, &rl->w_gate)) < 0 ||
      (rc = load_mat(l->ffn_up, stream, &rl->w_up)) < 0 ||
      (rc = load_mat(l->ffn_down, stream, &rl->w_down)) < 0)
    return rc;
  return 0;
}

/* n_layer * n_ctx * kv_dim floats, or 0 if that does not fit in memory's address space. */
static size_t cache_floats(const struct model_hparams *hp, uint32_t n_ctx) {
  uint64_t kv_dim = (uint64_t)hp->n_head_kv * hp->head_dim;
  uint64_t n = (uint64_t)hp->n_layer * n_ctx; /* < 2^36 by arch.c's limits */
  if (kv_dim && n > UINT64_MAX / kv_dim) return 0;
  n *= kv_dim;
  if (n > SIZE_MAX / sizeof(float)) return 0;
  return (size_t)n;
}

int model_ref_new(const struct gguf_file *f, const struct model_ref_opts *opts,
                  struct model_ref **ret, struct model_error *err) {
  struct model_ref_opts o = opts ? *opts : (struct model_ref_opts){0};
  struct model_weights *w;
  int rc = model_weights_new(f, &w, err);
  if (rc < 0) return rc;
  struct model_ref *r = calloc(1, sizeof *r);
  if (!r) {
    model_weights_free(w);
    return fail(err, KVD_ENOMEM, "out of memory");
  }
  r->w = w;
  r->hp = w->hp;
  r->kv_type = o.kv_type;
  const struct model_hparams *hp = &r->hp;
  r->n_ctx = o.n_ctx ? o.n_ctx : hp->n_ctx_train;
  if (r->n_ctx > hp->n_ctx_train) {
    rc = fail(err, KVD_E_CONTEXT, "a context of %" PRIu32 " exceeds the model's %" PRIu32, r->n_ctx,
              hp->n_ctx_train);
    goto fail;
  }

  size_t d = hp->n_embd, q_dim = (size_t)hp->n_head * hp->head_dim, ff = hp->n_ff;
  size_t cache_n = cache_floats(hp, r->n_ctx);
  r->layers = calloc(hp->n_layer, sizeof *r->layers);
  r->x = malloc(d * sizeof(float));
  r->xb = malloc(d * sizeof(float));
  r->xb2 = malloc(d * sizeof(float));
  r->q = malloc(q_dim * sizeof(float));
  r->att = malloc(q_dim * sizeof(float));
  r->hb = malloc(ff * sizeof(float));
  r->hb2 = malloc(ff * sizeof(float));
  r->scores = malloc(r->n_ctx * sizeof(float));
  r->row = malloc((d > ff ? d : ff) * sizeof(float));
  r->logits = malloc(hp->n_vocab * sizeof(float));
  r->k_cache = cache_n ? malloc(cache_n * sizeof(float)) : NULL;
  uint32_t row_words = 0;
  if (kv_row_words(o.kv_type, hp->head_dim, &row_words) < 0) {
    rc = fail(err, KVD_E_UNSUPPORTED, "KV type %s cannot store heads of %" PRIu32 " values",
              kv_type_name(o.kv_type), hp->head_dim);
    goto fail;
  }
  r->kv_row = malloc((size_t)row_words * 4);
  r->v_cache = cache_n ? malloc(cache_n * sizeof(float)) : NULL;
  if (!r->layers || !r->x || !r->xb || !r->xb2 || !r->q || !r->att || !r->hb || !r->hb2 ||
      !r->scores || !r->row || !r->logits || !r->k_cache || !r->v_cache || !r->kv_row) {
    rc = fail(err, KVD_ENOMEM, "out of memory for a %" PRIu32 "-position KV cache", r->n_ctx);
    goto fail;
  }

  rc = load_mat(w->token_embd, o.stream_weights, &r->tok_embd);
  if (rc == 0) {
    if (w->tied) {
      r->output = r->tok_embd;
      r->output.owned = NULL; /* tok_embd frees it */
    } else {
      rc = load_mat(w->output, o.stream_weights, &r->output);
    }
  }
  if (rc == 0) rc = load_vec(w->output_norm, d, &r->output_norm);
  for (uint32_t il = 0; rc == 0 && il < hp->n_layer; il++) {
    rc = load_layer(&w->layers[il], hp, o.stream_weights, &r->layers[il]);
    model_layer_rope(hp, il, r->n_ctx, &r->layers[il].rope);
    r->layers[il].window = model_layer_window(hp, il);
  }
  if (rc < 0) {
    fail(err, rc, "cannot load the weights: %s", kvd_strerror(rc));
    goto fail;
  }
  *ret = r;
  return 0;
fail:
  model_ref_free(r);
  return rc;
}

void model_ref_free(struct model_ref *r) {
  if (!r) return;
  if (r->layers) {
    for (uint32_t il = 0; il < r->hp.n_layer; il++) {
      struct ref_layer *l = &r->layers[il];
      free(l->attn_norm);
      free(l->ffn_norm);
      free(l->bq);
      free(l->bk);
      free(l->bv);
      free(l->qn);
      free(l->kn);
      free(l->attn_post);
      free(l->ffn_post);
      free(l->wq.owned);
      free(l->wk.owned);
      free(l->wv.owned);
      free(l->wo.owned);
      free(l->w_gate.owned);
      free(l->w_up.owned);
      free(l->w_down.owned);
    }
    free(r->layers);
  }
  free(r->tok_embd.owned);
  free(r->output.owned);
  free(r->output_norm);
  free(r->x);
  free(r->xb);
  free(r->xb2);
  free(r->q);
  free(r->att);
  free(r->hb);
  free(r->hb2);
  free(r->scores);
  free(r->row);
  free(r->logits);
  free(r->k_cache);
  free(r->v_cache);
  free(r->kv_row);
  model_weights_free(r->w);
  free(r);
}

const struct model_hparams *model_ref_hparams(const struct model_ref *r) {
  return &r->hp;
}

const struct model_weights *model_ref_weights(const struct model_ref *r) {
  return r->w;
}

uint32_t model_ref_n_ctx(const struct model_ref *r) {
  return r->n_ctx;
}

uint32_t model_ref_n_past(const struct model_ref *r) {
  return r->n_past;
}

int model_ref_shift(struct model_ref *r, uint32_t keep, uint32_t n_drop) {
  const struct model_hparams *hp = &r->hp;
  if (keep > r->n_past || n_drop > r->n_past - keep) return KVD_EINVAL;
  if (n_drop == 0) return 0;
  size_t kv_dim = (size_t)hp->n_head_kv * hp->head_dim;
  uint32_t moved = r->n_past - keep - n_drop;
  for (uint32_t il = 0; il < hp->n_layer; il++) {
    const struct model_rope *rope = &r->layers[il].rope;
    float *lk = r->k_cache + (size_t)il * r->n_ctx * kv_dim;
    float *lv = r->v_cache + (size_t)il * r->n_ctx * kv_dim;
    memmove(lk + keep * kv_dim, lk + (size_t)(keep + n_drop) * kv_dim, moved * kv_dim * 4);
    memmove(lv + keep * kv_dim, lv + (size_t)(keep + n_drop) * kv_dim, moved * kv_dim * 4);
    /* The rotation by -n_drop: the stored key already carries mscale, so it is not applied. */
    size_t half = rope->n_rot / 2;
    for (size_t i = 0; i < half; i++) {
      double theta = -(double)n_drop * model_rope_freq(rope, (uint32_t)i);
      double c = cos(theta), sn = sin(theta);
      size_t i0 = rope->mode == MODEL_ROPE_NEOX ? i : 2 * i;
      size_t i1 = rope->mode == MODEL_ROPE_NEOX ? i + half : 2 * i + 1;
      for (uint32_t t = keep; t < keep + moved; t++)
        for (uint32_t h = 0; h < hp->n_head_kv; h++) {
          float *v = lk + (size_t)t * kv_dim + (size_t)h * hp->head_dim;
          double a = v[i0], b = v[i1];
          v[i0] = (float)(a * c - b * sn);
          v[i1] = (float)(a * sn + b * c);
        }
    }
    for (uint32_t t = keep; r->kv_type != KV_F32 && t < keep + moved; t++)
      for (uint32_t h = 0; h < hp->n_head_kv; h++) {
        float *kh = lk + (size_t)t * kv_dim + (size_t)h * hp->head_dim;
        kv_encode_row(r->kv_type, kh, hp->head_dim, r->kv_row);
        kv_decode_row(r->kv_type, r->kv_row, hp->head_dim, kh);
      }
  }
  r->n_past -= n_drop;
  return 0;
}

void model_ref_reset(struct model_ref *r) {
  r->n_past = 0;
}

static int matvec(float *out, const struct ref_mat *m, const float *x, float *row) {
  return ref_matvec(out, m->type, m->data, x, m->n_out, m->n_in, row);
}

/* out (n_embd) = the embedding row of token. */
static int embed(struct model_ref *r, uint32_t token, float *out) {
  const struct ref_mat *m = &r->tok_embd;
  uint64_t row_bytes;
  int rc = dtype_row_bytes(m->type, m->n_in, &row_bytes);
  if (rc < 0) return rc;
  return dtype_dequant_row(m->type, (const uint8_t *)m->data + token * row_bytes, out, m->n_in);
}

/* The attention half of layer il: x += Wo · attention(...), caching this position's k and v. */
static int attention_block(struct model_ref *r, uint32_t il, uint32_t pos) {
  const struct model_hparams *hp = &r->hp;
  const struct ref_layer *l = &r->layers[il];
  size_t kv_dim = (size_t)hp->n_head_kv * hp->head_dim;
  size_t q_dim = (size_t)hp->n_head * hp->head_dim;
  float *layer_k = r->k_cache + (size_t)il * r->n_ctx * kv_dim;
  float *layer_v = r->v_cache + (size_t)il * r->n_ctx * kv_dim;
  float *k = layer_k + (size_t)pos * kv_dim, *v = layer_v + (size_t)pos * kv_dim;
  int rc;

  ref_rmsnorm(r->xb, r->x, l->attn_norm, hp->n_embd, hp->rms_eps);
  /* k and v are written straight into this position's cache slot. */
  if ((rc = matvec(r->q, &l->wq, r->xb, r->row)) < 0 ||
      (rc = matvec(k, &l->wk, r->xb, r->row)) < 0 || (rc = matvec(v, &l->wv, r->xb, r->row)) < 0)
    return rc;
  if (l->bq) ref_add(r->q, l->bq, q_dim);
  if (l->bk) ref_add(k, l->bk, kv_dim);
  if (l->bv) ref_add(v, l->bv, kv_dim);
  /* qwen3: every head of q and of k is RMS-normalised on its own before RoPE. */
  for (uint32_t h = 0; l->qn && h < hp->n_head; h++)
    ref_rmsnorm(r->q + (size_t)h * hp->head_dim, r->q + (size_t)h * hp->head_dim, l->qn,
                hp->head_dim, hp->rms_eps);
  for (uint32_t h = 0; l->kn && h < hp->n_head_kv; h++)
    ref_rmsnorm(k + (size_t)h * hp->head_dim, k + (size_t)h * hp->head_dim, l->kn, hp->head_dim,
                hp->rms_eps);
  ref_rope_ext(r->q, 1, hp->n_head, hp->head_dim, &pos, &l->rope);
  ref_rope_ext(k, 1, hp->n_head_kv, hp->head_dim, &pos, &l->rope);
  /* The cache holds what the KV type can store: each head's row rounded through it. */
  for (uint32_t h = 0; r->kv_type != KV_F32 && h < hp->n_head_kv; h++) {
    float *kh = k + (size_t)h * hp->head_dim, *vh = v + (size_t)h * hp->head_dim;
    kv_encode_row(r->kv_type, kh, hp->head_dim, r->kv_row);
    kv_decode_row(r->kv_type, r->kv_row, hp->head_dim, kh);
    kv_encode_row(r->kv_type, vh, hp->head_dim, r->kv_row);
    kv_decode_row(r->kv_type, r->kv_row, hp->head_dim, vh);
  }
  struct ref_attn_opts ao = {
      .scale = hp->attn_scale, .softcap = hp->attn_softcap, .window = l->window};
  ref_attention_ext(r->att, r->q, layer_k, layer_v, (size_t)pos + 1, hp->n_head, hp->n_head_kv,
                    hp->head_dim, r->scores, &ao);
  if ((rc = matvec(r->xb2, &l->wo, r->att, r->row)) < 0) return rc;
  /* gemma2/3 normalise the block's output before it joins the residual stream. */
  if (l->attn_post) ref_rmsnorm(r->xb2, r->xb2, l->attn_post, hp->n_embd, hp->rms_eps);
  ref_add(r->x, r->xb2, hp->n_embd);
  return 0;
}

/* The feed-forward half: x += Wdown · (silu(Wgate · n) * (Wup · n)), n = rmsnorm(x). */
static int ffn_block(struct model_ref *r, uint32_t il) {
  const struct model_hparams *hp = &r->hp;
  const struct ref_layer *l = &r->layers[il];
  int rc;
  ref_rmsnorm(r->xb, r->x, l->ffn_norm, hp->n_embd, hp->rms_eps);
  if ((rc = matvec(r->hb, &l->w_gate, r->xb, r->row)) < 0 ||
      (rc = matvec(r->hb2, &l->w_up, r->xb, r->row)) < 0)
    return rc;
  if (hp->ffn_act == MODEL_FFN_GELU)
    ref_geglu(r->hb, r->hb, r->hb2, hp->n_ff);
  else
    ref_swiglu(r->hb, r->hb, r->hb2, hp->n_ff);
  if ((rc = matvec(r->xb, &l->w_down, r->hb, r->row)) < 0) return rc;
  if (l->ffn_post) ref_rmsnorm(r->xb, r->xb, l->ffn_post, hp->n_embd, hp->rms_eps);
  ref_add(r->x, r->xb, hp->n_embd);
  return 0;
}

int model_ref_forward(struct model_ref *r, uint32_t token, uint32_t pos, float *logits) {
  const struct model_hparams *hp = &r->hp;
  if (token >= hp->n_vocab) return KVD_EINVAL;
  if (pos >= r->n_ctx) return KVD_E_CONTEXT;
  /* Attention reads positions 0..pos, so all earlier ones must already be cached. */
  if (pos > r->n_past) return KVD_EINVAL;
  r->n_past = pos; /* until this position is complete, a failure leaves the cache before it */

  int rc = embed(r, token, r->x);
  if (rc == 0 && hp->embd_scale != 1.0f)
    for (uint32_t i = 0; i < hp->n_embd; i++)
      r->x[i] *= hp->embd_scale;
  for (uint32_t il = 0; rc == 0 && il < hp->n_layer; il++) {
    rc = attention_block(r, il, pos);
    if (rc == 0) rc = ffn_block(r, il);
  }
  if (rc < 0) return rc;
  ref_rmsnorm(r->x, r->x, r->output_norm, hp->n_embd, hp->rms_eps);
  if ((rc = matvec(logits, &r->output, r->x, r->row)) < 0) return rc;
  if (hp->final_softcap > 0.0f) ref_softcap(logits, hp->n_vocab, hp->final_softcap);
  r->n_past = pos + 1;
  return 0;
}

static uint32_t argmax(const float *x, size_t n) {
  size_t best = 0;
  for (size_t i = 1; i < n; i++)
    if (x[i] > x[best]) best = i;
  return (uint32_t)best;
}

int model_ref_greedy(struct model_ref *r, const uint32_t *prompt, size_t n_prompt, size_t max_new,
                     uint32_t *out_ids, model_ref_logits_fn on_logits, void *ud) {
  const struct model_hparams *hp = &r->hp;
  if (n_prompt == 0) return KVD_EINVAL;
  if (n_prompt > r->n_ctx) return KVD_E_CONTEXT;
  model_ref_reset(r);
  int rc;
  for (size_t i = 0; i < n_prompt; i++)
    if ((rc = model_ref_forward(r, prompt[i], (uint32_t)i, r->logits)) < 0) return rc;

  /* The logits in hand are those of the last position run; each token chosen from them is run at
   * the next position, unless it ends the text or the cache is full. */
  size_t n_out = 0;
  uint32_t pos = (uint32_t)n_prompt - 1;
  while (n_out < max_new) {
    if (on_logits) on_logits(ud, pos, r->logits, hp->n_vocab);
    uint32_t next = argmax(r->logits, hp->n_vocab);
    if ((int64_t)next == hp->eos_id || (int64_t)next == hp->bos_id) break;
    out_ids[n_out++] = next;
    if (n_out == max_new || pos + 1 >= r->n_ctx) break;
    pos++;
    if ((rc = model_ref_forward(r, next, pos, r->logits)) < 0) return rc;
  }
  return (int)n_out; /* at most n_ctx, which arch.c caps at 2^24 */
}
