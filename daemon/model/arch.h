/* Model architectures: the hyperparameters of a Llama-shaped GGUF model and its weight tensors,
 * bound by name and checked against each other before anything computes with them.
 *
 * kvd runs one network shape: pre-norm decoder blocks with RMSNorm, rotary attention with grouped
 * KV heads and a SwiGLU feed-forward block. `llama` and `mistral` files use it as is; `qwen2` adds
 * biases to the q/k/v projections and rotates dimension halves (NeoX) instead of adjacent pairs.
 * Everything else is refused by name, never guessed at, and so is any tensor the forward pass
 * would not read: a silently ignored weight gives plausible but wrong output. */
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
};

/* Which dimensions RoPE rotates together (llama.cpp's rope modes 0 and 2). NORMAL: (2i, 2i+1),
 * the original Meta layout. NEOX: (i, i + n_rot/2), the GPT-NeoX/Hugging Face layout. */
enum model_rope_mode {
  MODEL_ROPE_NORMAL,
  MODEL_ROPE_NEOX,
};

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

const char *model_arch_name(enum model_arch arch);
const char *model_rope_mode_name(enum model_rope_mode mode);

/* For kvd --model-info: the hyperparameters, one per line. */
void model_print_hparams(const struct model_hparams *hp, FILE *out);
/* The weights: how many tensors of each dtype, the classifier, the parameter count. */
void model_print_weights(const struct model_weights *w, FILE *out);

#endif
