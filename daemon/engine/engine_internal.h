/* The engine's own structs, shared by its three files and nothing else:
 *   engine.c          weights in device memory, the KV pool and buffers, sequences (engine.h)
 *   engine_step.c     step assembly: checks, KV reservation, block tables, positions and slots
 *                     written into the step buffer, then submit, wait and commit (engine_forward)
 *   engine_forward.c  step recording: the forward pass, one function per block of ref_forward.c
 *   engine_shift.c    context shift; engine_swap.c host copies of a sequence's KV
 * Not an API: engine.h is. */
#ifndef KVD_ENGINE_ENGINE_INTERNAL_H
#define KVD_ENGINE_ENGINE_INTERNAL_H

#include "attn.h"
#include "engine.h"
#include "ops.h"
#include "wkern.h"

/* A weight matrix in device memory, exactly as stored in the file. */
struct eng_matrix {
  struct gpu_buffer *buf;
  const struct gguf_tensor *t;
  struct wkern_matrix m; /* (rows, cols) = (n_out, n_in), row-major [out][in], in `type` */
  enum dtype type;
};

struct eng_layer {
  struct gpu_buffer *attn_norm, *ffn_norm;     /* (n_embd) f32 */
  struct gpu_buffer *q_bias, *k_bias, *v_bias; /* (q_dim), (kv_dim), (kv_dim) f32, or NULL */
  struct gpu_buffer *q_norm, *k_norm;   /* (head_dim) f32 per-head RMSNorm (qwen3), or NULL */
  struct gpu_buffer *attn_post, *ffn_post; /* (n_embd) f32 post-norms (gemma2/3), or NULL */
  struct model_rope rope;               /* this layer's RoPE (gemma3's local layers differ) */
  uint32_t window;                      /* sliding window, 0 = none */
  struct eng_matrix *q, *k, *v;         /* (q_dim, n_embd), (kv_dim, n_embd) x 2 */
  struct eng_matrix *o;                 /* (n_embd, q_dim) */
  struct eng_matrix *gate, *up;         /* (n_ff, n_embd) */
  struct eng_matrix *down;              /* (n_embd, n_ff) */
  struct gpu_buffer *k_cache, *v_cache; /* (n_blocks, n_head_kv, block_size, head_dim) f32 */
};

/* Offsets of the per-step arrays inside the step buffer (bytes, storage-aligned). */
struct eng_step_layout {
  uint64_t ids;      /* (max_tokens) u32 token ids */
  uint64_t pos;      /* (max_tokens) u32 positions */
  uint64_t slots;    /* (max_tokens) u32 KV slots, kv_slot_index() */
  uint64_t tok_info; /* (max_tokens, 2) u32 (n_kv, table offset), shaders/common/pc_attn.h */
  uint64_t tiles;    /* (max_tokens, 2) u32 (first token, count): attn_tile's query tiles */
  uint64_t tables;   /* (tables_cap) u32 every sequence's block table, back to back */
  uint64_t size;
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
  uint32_t q_dim, kv_dim; /* n_head * head_dim, n_head_kv * head_dim */
  uint32_t drop_window;   /* every layer's window when all are windowed, else 0 (no drops) */
  uint64_t kv_token_bytes; /* one token's K (or V) in one layer, in the KV type */
  uint32_t max_tokens, max_logits;

  struct ops ops;
  struct attn_kernels attn;
  struct wkern *wk[DTYPE_MAX]; /* one per weight type the model uses */

  struct eng_matrix *mats; /* every distinct matrix tensor, uploaded once */
  uint32_t n_mats;
  struct eng_matrix *embd;        /* (n_vocab, n_embd) */
  struct eng_matrix *output;      /* (n_vocab, n_embd); the same as embd when tied */
  struct gpu_buffer *output_norm; /* (n_embd) f32 */
  struct eng_layer *layers;       /* (n_layer) */

  struct kv_pool pool;
  struct kv_plan plan;
  struct engine_seq *seqs;

  /* Activations, f32, row-major, one row per token of the step (at most max_tokens rows). */
  struct gpu_buffer *x;      /* (max_tokens, n_embd) the residual stream */
  struct gpu_buffer *xn;     /* (max_tokens, n_embd) rmsnorm(x), the input of a block */
  struct gpu_buffer *q;      /* (max_tokens, n_head, head_dim) */
  struct gpu_buffer *k;      /* (max_tokens, n_head_kv, head_dim), until written to k_cache */
  struct gpu_buffer *v;      /* (max_tokens, n_head_kv, head_dim), until written to v_cache */
  struct gpu_buffer *att;    /* (max_tokens, n_head, head_dim) attention result before Wo */
  struct gpu_buffer *gate;   /* (max_tokens, n_ff) Wgate xn, then silu(gate) * up */
  struct gpu_buffer *up;     /* (max_tokens, n_ff) Wup xn */
  struct gpu_buffer *xl;     /* (max_logits, n_embd) the rows logits are computed for */
  struct gpu_buffer *logits; /* (max_logits, n_vocab), host-visible */
  /* (n_tokens, n_head, n_splits, head_dim + 2) f32 attention partials: per split the output o
   * (head_dim), then its running max m and sum l; grown to the largest step seen
   * (attn_partial_bytes()), NULL until a step splits its KV. */
  struct gpu_buffer *partial;
  uint64_t partial_bytes;
  struct gpu_buffer *step; /* host-visible per-step arrays, layout lay */
  struct eng_step_layout lay;
  uint32_t *tables_host;          /* (lay.tables_cap) the tables, built here, then copied to step */
  uint32_t *offsets_host;         /* (cap_items) each item's table offset in tables */
  uint32_t *logit_rows;           /* (max_logits) token rows whose logits a step returns */
  const struct kv_seq **seq_ptrs; /* (cap_items) */
  uint32_t cap_items;

  struct gpu_cmd *cmd;

  /* Context shift (engine_shift.c): the moves of the largest shift seen, host-visible. */
  struct gpu_buffer *shift_moves;
  uint32_t shift_cap; /* moves it holds */
  uint64_t shifts, shift_rows;

  /* Host copies of KV (engine_swap.c): staging, grown to the largest copy up to a cap. */
  struct gpu_buffer *swap_staging;
};

/* One assembled step, what engine_step.c hands to the recorder. The per-token arrays (ids, pos,
 * slots, tok_info, tables) are already in e->step. */
struct eng_step {
  uint32_t n_tokens;            /* rows of the activations this step uses */
  uint32_t n_logits;            /* rows of xl and logits */
  const uint32_t *logit_rows;   /* (n_logits) the token row of each logits row */
  uint32_t max_kv;              /* the longest n_kv of any token (attention's chunking) */
  uint32_t n_splits;            /* attention KV splits, attn_pick_splits() */
  uint32_t n_tiles;             /* > 0: prefill tiles for attn_tile (no splits) */
  const struct kv_copy *copies; /* (n_copies) copy-on-write block copies, run before anything */
  uint32_t n_copies;
};

/* (Re)creates the step buffer and tables_host for tables_cap table entries (engine_step.c). */
int engine__layout_step(struct engine *e, uint64_t tables_cap);

/* Records and submits the forward pass of step s (engine_forward.c). Returns the recording's
 * first error (gpu.h: errors are sticky) or the submission's; on success the caller waits. */
int engine__record_step(struct engine *e, const struct eng_step *s);

#endif
