/* Model architectures: the hyperparameters of a Llama-shaped GGUF model and its weight tensors,
 * bound by name and checked against each other before anything computes with them.
 *
 * kvd runs one network shape: pre-norm decoder blocks with RMSNorm, rotary attention with grouped
 * KV heads and a gated feed-forward block. Each family is that shape with a few switches set
 * (struct model_hparams, filled from a per-family table in arch.c):
 *   llama, mistral  the shape as is (llama3: rope_freqs factors; mistral: sliding windows)
 *   qwen2           q/k/v biases, NeoX rotation (dimension halves instead of adjacent pairs)
 *   qwen3           per-head q/k RMSNorm, head size decoupled from n_embd / n_head
 *   gemma, gemma2, gemma3
 *                   embeddings scaled by sqrt(n_embd), GELU-gated FFN, NeoX; gemma2/3 add norms
 *                   after attention and after the FFN, interleaved sliding-window and global
 *                   layers (gemma3: with their own RoPE base), logit soft-capping where declared
 *   phi3            fused qkv and gate/up projections (bound here as row views of the fused
 *                   tensor, so the forward pass never sees the difference), partial rotary,
 *                   LongRoPE factors
 * The CPU reference and the engine read the same switches. Everything else is refused by name,
 * never guessed at, and so is any tensor the forward pass would not read: a silently ignored
 * weight gives plausible but wrong output. */
#ifndef KVD_MODEL_ARCH_H
#define KVD_MODEL_ARCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "gguf.h"

enum model_arch {
  MODEL_ARCH_LLAMA,
  MODEL_ARCH_MISTRAL,
  MODEL_ARCH_QWEN2,
  MODEL_ARCH_QWEN3,
  MODEL_ARCH_GEMMA,
  MODEL_ARCH_GEMMA2,
  MODEL_ARCH_GEMMA3,
  MODEL_ARCH_PHI3,
};

/* The feed-forward gate's activation: out = act(gate) * up. */
enum model_ffn_act {
  MODEL_FFN_SILU, /* SwiGLU: silu(g) = g / (1 + e^-g) */
  MODEL_FFN_GELU, /* GeGLU with the tanh approximation of GELU (gemma) */
};

/* Which dimensions RoPE rotates together (llama.cpp's rope modes 0 and 2). NORMAL: (2i, 2i+1),
 * the original Meta layout. NEOX: (i, i + n_rot/2), the GPT-NeoX/Hugging Face layout. */
enum model_rope_mode {
  MODEL_ROPE_NORMAL,
  MODEL_ROPE_NEOX,
};

/* Everything that sets the angle RoPE turns pair i of a head by at position pos:
 *   theta_i(pos) = pos * model_rope_freq(r, i)
 * and the factor (mscale) the rotated pair is multiplied by afterwards. One definition for the
 * CPU reference and the GPU frequency table (ops.h), so both rotate by the same angles. */
struct model_rope {
  uint32_t n_rot; /* leading dimensions of each head that RoPE rotates (even, <= head_dim) */
  enum model_rope_mode mode;
  float freq_base;
  /* Linear scaling: the angle uses pos * freq_scale (1 = unscaled). Under YaRN this is the
   * interpolated side of the ramp. */
  float freq_scale;
  /* (n_rot / 2) per-pair divisors of the angle, or NULL: Llama 3.1's rope_freqs tensor, or
   * Phi-3's LongRoPE short/long factors. Points into the model file. */
  const float *freq_factors;
  /* YaRN (ext_factor > 0): pairs rotating faster than beta_fast turns over the original context
   * keep their trained angle, those slower than beta_slow are interpolated by freq_scale, with a
   * linear ramp between; and mscale grows by 1 + 0.1 ln(1 / freq_scale). */
  float yarn_ext_factor;
  float yarn_beta_fast, yarn_beta_slow;
  uint32_t yarn_orig_ctx;
  /* The rotated pair's cos and sin are multiplied by this (attention factor); 0 means 1. */
  float mscale;
};

/* Radians per position of pair i (i < n_rot / 2), in double. */
double model_rope_freq(const struct model_rope *r, uint32_t i);
/* The multiplier of the rotated values: mscale (1 when 0) times YaRN's own growth. */
double model_rope_mscale(const struct model_rope *r);

/* Why a model was refused: the key or tensor at fault, in a sentence. */
struct model_error {
  char msg[192];
};

struct model_hparams {
  enum model_arch arch;
  char name[64];        /* general.name, cut to fit; "" when absent */
  uint32_t n_embd;      /* model width (dim) */
  uint32_t n_layer;     /* decoder blocks */
  uint32_t n_head;      /* query heads */
  uint32_t n_head_kv;   /* key/value heads; query head h reads kv head h / (n_head / n_head_kv) */
  uint32_t head_dim;    /* attention.key_length, else n_embd / n_head (qwen3 decouples them) */
  uint32_t n_ff;        /* feed-forward hidden width */
  uint32_t n_vocab;     /* rows of the embedding and the classifier */
  uint32_t n_ctx_train; /* <arch>.context_length: the longest context the file claims */
  float rms_eps;
  float rope_freq_base;
  uint32_t n_rot; /* leading dimensions of each head that RoPE rotates (even, <= head_dim) */
  enum model_rope_mode rope_mode;
  /* Linear RoPE scaling: the angle uses pos * rope_freq_scale. 1 means unscaled. */
  float rope_freq_scale;
  /* Per-pair frequency factors (the rope_freqs.weight tensor, n_rot / 2 floats: Llama 3.1's
   * scaling): pair i's angle is divided by factor i. NULL = none. Points into the file. */
  const float *rope_freq_factors;
  /* LongRoPE (phi3 with rope_factors_long/short.weight): the long factors apply when the context
   * run is longer than rope_orig_ctx, the short ones otherwise; NULL when absent. */
  const float *rope_factors_long, *rope_factors_short;
  uint32_t rope_orig_ctx;  /* rope.scaling.original_context_length, 0 when absent */
  float rope_attn_factor;  /* rope.scaling.attn_factor (LongRoPE, YaRN), 1 when absent */
  float rope_yarn_factor;  /* YaRN (rope.scaling.type yarn): its ext_factor (1), else 0 */
  float rope_yarn_beta_fast, rope_yarn_beta_slow;

  /* Per-family switches (arch.c's table, then the file's keys). */
  float embd_scale;            /* x = embedding * embd_scale (gemma: sqrt(n_embd)), else 1 */
  enum model_ffn_act ffn_act;  /* SILU, or GELU for gemma */
  bool post_norms;             /* gemma2/3: RMSNorm of each block's output before the residual */
  float attn_scale;            /* attention scores are q.k * attn_scale: 1/sqrt(head_dim), or
                                  gemma's query_pre_attn_scalar for its 27B sizes */
  float attn_softcap;          /* scores become c * tanh(s / c) (gemma2: 50); 0 = none */
  float final_softcap;         /* logits become c * tanh(l / c) (gemma2: 30); 0 = none */
  /* Sliding-window attention: a windowed layer's query at position p reads positions
   * p - n_swa + 1 .. p only. 0 = no layer is windowed. Which layers are: all when swa_pattern is
   * 1, else those with il % swa_pattern < swa_pattern - 1 (gemma2: every other, gemma3: five of
   * every six; the rest are global). See model_layer_window(). */
  uint32_t n_swa;
  uint32_t swa_pattern;
  /* The RoPE of windowed layers where it differs (gemma3: base 10000, unscaled). */
  float rope_freq_base_swa, rope_freq_scale_swa;

  int32_t bos_id; /* tokenizer.ggml.bos_token_id, -1 when absent */
  int32_t eos_id; /* tokenizer.ggml.eos_token_id, -1 when absent */
};

/* One decoder block. Matrices are GGUF [ne0 = in, ne1 = out]: row r (ne0 values) computes output
 * r, y = W x with W row-major [out][in]. Their dtype is whatever the file holds (t->type); norm
 * vectors and biases are 1-D. */
struct model_layer {
  const struct gguf_tensor *attn_norm;   /* (n_embd) */
  const struct gguf_tensor *attn_q;      /* (n_head * head_dim, n_embd) [out][in] */
  const struct gguf_tensor *attn_k;      /* (n_head_kv * head_dim, n_embd) [out][in] */
  const struct gguf_tensor *attn_v;      /* (n_head_kv * head_dim, n_embd) [out][in] */
  const struct gguf_tensor *attn_q_bias; /* (n_head * head_dim) or NULL; qwen2 always has it */
  const struct gguf_tensor *attn_k_bias; /* (n_head_kv * head_dim) or NULL */
  const struct gguf_tensor *attn_v_bias; /* (n_head_kv * head_dim) or NULL */
  const struct gguf_tensor *attn_output; /* (n_embd, n_head * head_dim) [out][in] */
  /* qwen3: RMSNorm of each head of q and of k before RoPE, (head_dim) weights; else NULL. */
  const struct gguf_tensor *attn_q_norm;
  const struct gguf_tensor *attn_k_norm;
  /* gemma2/3: RMSNorm of the attention output (post_attention_norm) and of the FFN output
   * (post_ffw_norm) before each residual add; else NULL. */
  const struct gguf_tensor *attn_post_norm;
  const struct gguf_tensor *ffn_post_norm;
  const struct gguf_tensor *ffn_norm; /* (n_embd) */
  const struct gguf_tensor *ffn_gate; /* (n_ff, n_embd) [out][in] */
  const struct gguf_tensor *ffn_up;   /* (n_ff, n_embd) [out][in] */
  const struct gguf_tensor *ffn_down; /* (n_embd, n_ff) [out][in] */
};

/* The bound weights of a model. Pointers go into the gguf_file, which must outlive this. */
struct model_weights {
  struct model_hparams hp;
  const struct gguf_tensor *token_embd;  /* (n_vocab, n_embd) [token][dim] */
  const struct gguf_tensor *output_norm; /* (n_embd) */
  /* (n_vocab, n_embd) [token][dim]: output.weight, or token_embd when the file ties them. */
  const struct gguf_tensor *output;
  bool tied;                  /* output == token_embd because the file has no output.weight */
  struct model_layer *layers; /* n_layer blocks */
  /* phi3's fused attn_qkv and ffn_up [gate | up] tensors, split into row views (a copy of the
   * tensor header whose data and ne[1] cover some of its rows; the bytes stay in the file), which
   * attn_q/k/v and ffn_gate/up point to. (n_views) */
  struct gguf_tensor *views;
  uint32_t n_views;
};

/* Reads and checks the hyperparameters of f. Returns 0, KVD_E_UNSUPPORTED for an architecture or
 * feature kvd does not run (err names it), KVD_E_FORMAT for missing or inconsistent metadata (err
 * names the key). *ret is written on success only. Needs no tensors: works on vocabulary files. */
int model_hparams_read(const struct gguf_file *f, struct model_hparams *ret,
                       struct model_error *err);

/* Reads the hyperparameters, then binds every weight tensor and checks its shape against them and
 * that its dtype can be dequantized. Errors as above (err names the tensor), or KVD_ENOMEM. */
int model_weights_new(const struct gguf_file *f, struct model_weights **ret,
                      struct model_error *err);
void model_weights_free(struct model_weights *w); /* NULL is a no-op */

/* The window layer il attends within (0 = the whole context), and the RoPE it rotates with for a
 * context of n_ctx positions (which LongRoPE factors apply depends on it). */
uint32_t model_layer_window(const struct model_hparams *hp, uint32_t il);
void model_layer_rope(const struct model_hparams *hp, uint32_t il, uint32_t n_ctx,
                      struct model_rope *ret);
/* Whether any layer is windowed, and whether every one is (then KV blocks older than the window
 * are never read again and go back to the pool). */
bool model_any_window(const struct model_hparams *hp);
bool model_all_windowed(const struct model_hparams *hp);

/* "llama, mistral, qwen2, ...": the architectures kvd runs, for refusals and --help. */
const char *model_arch_list(void);

const char *model_arch_name(enum model_arch arch);
const char *model_rope_mode_name(enum model_rope_mode mode);

/* For kvd --model-info: the hyperparameters, one per line. */
void model_print_hparams(const struct model_hparams *hp, FILE *out);
/* The weights: how many tensors of each dtype, the classifier, the parameter count. */
void model_print_weights(const struct model_weights *w, FILE *out);

#endif
