/* Recording one step's forward pass: the GPU twin of daemon/model/ref_forward.c, block for block.
 *
 *   x = embedding[ids] (* embd_scale)                         eng_embed          (embed)
 *   per layer:  x += (post-norm) Wo · attention(rope(Wq·rmsnorm(x) + bq), rope(Wk·… + bk) → cache,
 *                                               Wv·… + bv)   (window, scale, soft-cap)
 *                                                             eng_attention_block (attention_block)
 *               x += (post-norm) Wdown · (act(Wgate·rmsnorm(x)) * Wup·rmsnorm(x))
 *                                                             eng_ffn_block      (ffn_block)
 *   logits = Wout · rmsnorm(x) (soft-capped), for the rows that want them
 *                                                             eng_logits    (model_ref_forward)
 * with the family's switches (arch.h) in parentheses; on the plain llama path each costs one
 * branch on the host and nothing on the device.
 *
 * Where the reference runs one token, every op here runs all n_tokens rows of the step at once
 * (a mix of prefill chunks and decode tokens from many sequences); attention finds each token's
 * own sequence through the paged KV cache's block tables. The reference's x += y steps are fused
 * into the projection that produces y (wkern's accumulate).
 *
 * Errors are sticky in the command buffer (gpu.h): nothing here checks a record call; the submit
 * at the end returns the first error and runs nothing. */
#include "engine_internal.h"

#include "kvd_error.h"

static struct gpu_binding bind(struct gpu_buffer *b) {
  return (struct gpu_binding){b, 0, 0};
}

static struct gpu_binding bind_at(struct gpu_buffer *b, uint64_t off, uint64_t range) {
  return (struct gpu_binding){b, off, range};
}

static struct wkern_act act(struct gpu_buffer *b, uint32_t stride) {
  return (struct wkern_act){.buf = b, .offset = 0, .stride = stride};
}

/* y (n_tokens, m->rows) = x (n_tokens, m->cols) · m^T, or y += with accumulate. */
static void eng_mul(struct engine *e, const struct eng_matrix *m, struct gpu_buffer *x,
                    struct gpu_buffer *y, uint32_t n_tokens, bool accumulate) {
  struct wkern_act xa = act(x, m->m.cols), ya = act(y, m->m.rows);
  wkern_mul(e->wk[m->type], e->cmd, &m->m, &xa, &ya, n_tokens, accumulate);
}

/* Copy-on-write (no counterpart in the reference, which has no shared blocks): a shared partial
 * block is copied, in every layer, before anything writes it. */
static void eng_kv_copies(struct engine *e, const struct eng_step *s) {
  uint64_t bb = e->plan.block_bytes;
  for (uint32_t c = 0; c < s->n_copies; c++)
    for (uint32_t l = 0; l < e->hp.n_layer; l++) {
      const struct kv_copy *cp = &s->copies[c];
      gpu_cmd_copy(e->cmd, e->layers[l].k_cache, cp->src_block * bb, e->layers[l].k_cache,
                   cp->dst_block * bb, bb);
      gpu_cmd_copy(e->cmd, e->layers[l].v_cache, cp->src_block * bb, e->layers[l].v_cache,
                   cp->dst_block * bb, bb);
    }
}

/* ref_forward.c embed(): x = the embedding rows of the step's token ids. */
static void eng_embed(struct engine *e, const struct eng_step *s) {
  /* ids: (n_tokens) u32, step buffer;  x: (n_tokens, n_embd) f32 */
  struct wkern_act xa = act(e->x, e->hp.n_embd);
  wkern_embed(e->wk[e->embd->type], e->cmd, &e->embd->m, e->step, e->lay.ids, s->n_tokens, &xa);
  gpu_cmd_barrier(e->cmd);
  if (e->hp.embd_scale != 1.0f) { /* gemma */
    ops_scale(&e->ops, e->cmd, bind(e->x), (uint64_t)s->n_tokens * e->hp.n_embd, e->hp.embd_scale);
    gpu_cmd_barrier(e->cmd);
  }
}

/* x += W · in, the residual connection at the end of a block. Without a post-norm the add is
 * fused into the projection (wkern's accumulate); gemma2/3 normalise W · in first, in xn (free
 * once the block's projections have read it). */
static void eng_residual(struct engine *e, const struct eng_matrix *w, struct gpu_buffer *in,
                         struct gpu_buffer *post_norm, uint32_t n) {
  struct gpu_cmd *cmd = e->cmd;
  if (!post_norm) {
    eng_mul(e, w, in, e->x, n, true);
    gpu_cmd_barrier(cmd);
    return;
  }
  eng_mul(e, w, in, e->xn, n, false);
  gpu_cmd_barrier(cmd);
  ops_rmsnorm(&e->ops, cmd, bind(e->xn), bind(post_norm), bind(e->xn), n, e->hp.n_embd,
              e->hp.rms_eps);
  gpu_cmd_barrier(cmd);
  ops_add(&e->ops, cmd, bind(e->x), bind(e->xn), n, e->hp.n_embd);
  gpu_cmd_barrier(cmd);
}

/* ref_forward.c attention_block(): the attention half of layer il, x += Wo · attention(...),
 * writing every token's k and v into its KV slot first. */
static void eng_attention_block(struct engine *e, const struct eng_step *s, uint32_t il) {
  const struct model_hparams *hp = &e->hp;
  const struct eng_layer *l = &e->layers[il];
  const struct eng_step_layout *L = &e->lay;
  struct gpu_cmd *cmd = e->cmd;
  uint32_t n = s->n_tokens;
  /* x, xn: (n, n_embd);  q, att: (n, n_head, head_dim);  k, v: (n, n_head_kv, head_dim), all f32.
   * pos, slots: (n) u32;  tok_info: (n, 2) u32;  tables: every item's block table, u32. */
  struct gpu_binding pos = bind_at(e->step, L->pos, (uint64_t)n * 4);
  struct gpu_binding slots = bind_at(e->step, L->slots, (uint64_t)n * 4);
  struct gpu_binding tok_info = bind_at(e->step, L->tok_info, (uint64_t)n * 8);
  struct gpu_binding tables = bind_at(e->step, L->tables, 0);
  struct gpu_binding tiles = bind_at(e->step, L->tiles, (uint64_t)n * 8);

  ops_rmsnorm(&e->ops, cmd, bind(e->x), bind(l->attn_norm), bind(e->xn), n, hp->n_embd,
              hp->rms_eps);
  gpu_cmd_barrier(cmd);
  eng_mul(e, l->q, e->xn, e->q, n, false);
  eng_mul(e, l->k, e->xn, e->k, n, false);
  eng_mul(e, l->v, e->xn, e->v, n, false);
  gpu_cmd_barrier(cmd);
  if (l->q_bias) ops_add_bias(&e->ops, cmd, bind(e->q), bind(l->q_bias), n, e->q_dim);
  if (l->k_bias) ops_add_bias(&e->ops, cmd, bind(e->k), bind(l->k_bias), n, e->kv_dim);
  if (l->v_bias) ops_add_bias(&e->ops, cmd, bind(e->v), bind(l->v_bias), n, e->kv_dim);
  if (l->q_bias || l->k_bias || l->v_bias) gpu_cmd_barrier(cmd);
  /* qwen3 (ref: attention_block's per-head norms): each head of q and k RMS-normalised on its
   * own, in place: q as (n * n_head, head_dim) rows, k as (n * n_head_kv, head_dim). */
  if (l->q_norm)
    ops_rmsnorm(&e->ops, cmd, bind(e->q), bind(l->q_norm), bind(e->q), n * hp->n_head, hp->head_dim,
                hp->rms_eps);
  if (l->k_norm)
    ops_rmsnorm(&e->ops, cmd, bind(e->k), bind(l->k_norm), bind(e->k), n * hp->n_head_kv,
                hp->head_dim, hp->rms_eps);
  if (l->q_norm || l->k_norm) gpu_cmd_barrier(cmd);
  ops_rope(&e->ops, cmd, bind(e->q), pos, n, hp->n_head, hp->head_dim, 0, &l->rope);
  ops_rope(&e->ops, cmd, bind(e->k), pos, n, hp->n_head_kv, hp->head_dim, 0, &l->rope);
  gpu_cmd_barrier(cmd);
  /* k and v go to their cache slots before attention reads the cache (the reference writes them
   * straight into the slot). */
  attn_record_write(&e->attn, cmd, bind(e->k), bind(e->v), bind(l->k_cache), bind(l->v_cache),
                    slots, n, hp->n_head_kv, hp->head_dim, e->pool.block_size, e->kv_dim);
  gpu_cmd_barrier(cmd);
  struct attn_shape ash = {.n_tokens = n,
                           .n_head = hp->n_head,
                           .n_head_kv = hp->n_head_kv,
                           .head_dim = hp->head_dim,
                           .block_size = e->pool.block_size,
                           .q_stride = e->q_dim,
                           .n_splits = s->n_splits,
                           .max_kv = s->max_kv,
                           .scale = hp->attn_scale,
                           .window = l->window,
                           .softcap = hp->attn_softcap,
                           .n_tiles = s->n_tiles};
  attn_record(&e->attn, cmd, &ash, bind(e->q), bind(l->k_cache), bind(l->v_cache), tok_info, tables,
              bind(e->att), e->partial ? bind(e->partial) : bind(e->att), tiles);
  gpu_cmd_barrier(cmd);
  eng_residual(e, l->o, e->att, l->attn_post, n);
}

/* ref_forward.c ffn_block(): the feed-forward half of layer il,
 * x += Wdown · (silu(Wgate · xn) * (Wup · xn)), xn = rmsnorm(x). */
static void eng_ffn_block(struct engine *e, const struct eng_step *s, uint32_t il) {
  const struct model_hparams *hp = &e->hp;
  const struct eng_layer *l = &e->layers[il];
  struct gpu_cmd *cmd = e->cmd;
  uint32_t n = s->n_tokens;
  /* x, xn: (n, n_embd) f32;  gate, up: (n, n_ff) f32 */
  ops_rmsnorm(&e->ops, cmd, bind(e->x), bind(l->ffn_norm), bind(e->xn), n, hp->n_embd, hp->rms_eps);
  gpu_cmd_barrier(cmd);
  eng_mul(e, l->gate, e->xn, e->gate, n, false);
  eng_mul(e, l->up, e->xn, e->up, n, false);
  gpu_cmd_barrier(cmd);
  if (hp->ffn_act == MODEL_FFN_GELU)
    ops_geglu(&e->ops, cmd, bind(e->gate), bind(e->up), bind(e->gate), n, hp->n_ff);
  else
    ops_swiglu(&e->ops, cmd, bind(e->gate), bind(e->up), bind(e->gate), n, hp->n_ff);
  gpu_cmd_barrier(cmd);
  eng_residual(e, l->down, e->gate, l->ffn_post, n);
}

/* The end of ref_forward.c model_ref_forward(): logits = Wout · rmsnorm(x), only for the rows
 * that want logits (gathered into xl first, so the classifier runs on n_logits rows, not
 * n_tokens). */
static void eng_logits(struct engine *e, const struct eng_step *s) {
  const struct model_hparams *hp = &e->hp;
  struct gpu_cmd *cmd = e->cmd;
  /* x: (n_tokens, n_embd) f32;  xl: (n_logits, n_embd) f32;  logits: (n_logits, n_vocab) f32 */
  uint64_t row = (uint64_t)hp->n_embd * sizeof(float);
  for (uint32_t i = 0; i < s->n_logits; i++)
    gpu_cmd_copy(cmd, e->x, s->logit_rows[i] * row, e->xl, i * row, row);
  gpu_cmd_barrier(cmd);
  if (s->n_logits == 0) return;
  ops_rmsnorm(&e->ops, cmd, bind(e->xl), bind(e->output_norm), bind(e->xl), s->n_logits, hp->n_embd,
              hp->rms_eps);
  gpu_cmd_barrier(cmd);
  eng_mul(e, e->output, e->xl, e->logits, s->n_logits, false);
  if (hp->final_softcap > 0.0f) { /* gemma2 */
    gpu_cmd_barrier(cmd);
    ops_softcap(&e->ops, cmd, bind(e->logits), (uint64_t)s->n_logits * hp->n_vocab,
                hp->final_softcap);
  }
}

/* Attention's per-split partial results: grown to the largest step seen. */
static int eng_reserve_partials(struct engine *e, const struct eng_step *s) {
  uint64_t bytes = attn_partial_bytes(s->n_tokens, e->hp.n_head, e->hp.head_dim, s->n_splits);
  if (bytes <= e->partial_bytes) return 0;
  gpu_buffer_free(e->partial);
  e->partial = NULL;
  e->partial_bytes = 0;
  int rc = gpu_buffer_new(e->dev, bytes, GPU_MEM_DEVICE, "attention partials", &e->partial);
  if (rc == 0) e->partial_bytes = bytes;
  return rc;
}

/* ref_forward.c model_ref_forward(), for a whole step. */
int engine__record_step(struct engine *e, const struct eng_step *s) {
  /* gpu_cmd_begin refuses while an earlier submission may still run; only after it may the
   * partials buffer be replaced. */
  int rc = gpu_cmd_begin(e->cmd);
  if (rc < 0) return rc;
  gpu_cmd_fail(e->cmd, eng_reserve_partials(e, s));

  eng_kv_copies(e, s);
  eng_embed(e, s);
  for (uint32_t il = 0; il < e->hp.n_layer; il++) {
    eng_attention_block(e, s, il);
    eng_ffn_block(e, s, il);
  }
  eng_logits(e, s);
  return gpu_cmd_submit(e->cmd);
}
