/* The inference engine: a model's weights in device memory, the paged KV cache, and a forward
 * pass recorded as one command buffer per step.
 *
 * A step runs a batch of sequences, each with some new tokens (a prefill chunk or one decode
 * token, freely mixed); their K/V go into the sequences' KV blocks and logits come back for the
 * last token of every item that asks. Everything of the step (copy-on-write block copies,
 * embedding, every layer, the classifier) is one submission; the host touches only the small
 * per-step arrays (token ids, positions, KV slots, block tables) and the logits it asked for —
 * no per-token copies of weights or KV.
 *
 * Not thread-safe: one thread (the engine thread in the daemon) drives an engine. */
#ifndef KVD_ENGINE_ENGINE_H
#define KVD_ENGINE_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "arch.h"
#include "gguf.h"
#include "gpu.h"
#include "kv.h"
#include "kv_format.h"

struct engine;
struct engine_seq;

/* Called while weights upload: bytes done of total. */
typedef void (*engine_progress_fn)(void *ud, uint64_t done, uint64_t total);

struct engine_opts {
  uint32_t block_size;      /* tokens per KV block; 0 = KV_BLOCK_SIZE_DEFAULT */
  uint64_t kv_bytes;        /* KV budget in bytes; 0 = kv_fraction of the free device memory */
  double kv_fraction;       /* share of free device memory for KV when kv_bytes is 0; 0 = 0.5 */
  uint32_t n_blocks;        /* exact block count (overrides the budget; tests use tiny pools) */
  uint32_t max_step_tokens; /* most tokens one forward step holds; 0 = 512 */
  uint32_t max_logits;      /* most logits rows one step returns; 0 = 64 */
  /* How K and V are stored (kv_format.h). The zero value is f32, exact against the CPU
   * reference; the daemon's default is f16. KVD_E_UNSUPPORTED for a head size the type cannot
   * store. */
  enum kv_type kv_type;
  engine_progress_fn progress;
  void *progress_ud;
};

/* Binds and checks the model in f (see arch.h), uploads its weights as stored (quantized weights
 * stay quantized), sizes the KV pool and creates the pipelines. f must outlive the engine.
 * Errors: those of model_weights_new (err names the key or tensor), KVD_E_DEVICE_OOM,
 * KVD_E_LIMIT (a tensor larger than one storage binding), KVD_E_KV_EXHAUSTED (no KV block fits),
 * Vulkan failures (gpu_error_detail()). */
int engine_new(struct gpu_device *dev, const struct gguf_file *f, const struct engine_opts *opts,
               struct engine **ret, struct model_error *err);
void engine_free(struct engine *e); /* frees every sequence still open */

const struct model_hparams *engine_hparams(const struct engine *e);
void engine_kv_stats(const struct engine *e, struct kv_pool_stats *ret);
/* Bytes of KV one token takes over all layers (K and V), in the engine's KV type. */
uint64_t engine_kv_bytes_per_token(const struct engine *e);
enum kv_type engine_kv_type(const struct engine *e);
uint32_t engine_max_step_tokens(const struct engine *e);
uint32_t engine_max_logits(const struct engine *e); /* logits rows one step returns */

/* An empty sequence; its KV blocks are taken as tokens arrive. */
int engine_seq_new(struct engine *e, struct engine_seq **ret);
/* Returns every block the sequence holds (shared ones stay with their other holders). */
void engine_seq_free(struct engine *e, struct engine_seq *s);
/* Prefix cache: a new sequence starting with the longest chain of cached KV blocks that match
 * tokens' leading whole blocks (shared, not recomputed); *ret_cached = tokens already in it
 * (always < n_tokens). The caller runs tokens[*ret_cached, n_tokens) next. */
int engine_seq_new_prefix(struct engine *e, const int32_t *tokens, uint32_t n_tokens,
                          struct engine_seq **ret, uint32_t *ret_cached);
/* Makes the sequence's full blocks findable by later requests; history holds the ids of
 * positions [0, n). Call after each step (see kv.h). */
int engine_seq_register(struct engine *e, struct engine_seq *s, const int32_t *history, uint32_t n);
uint32_t engine_seq_len(const struct engine_seq *s);
/* Blocks a step of n new tokens on s would take now (admission control), and blocks an
 * allocation can take now (free plus evictable cached ones). */
uint32_t engine_seq_step_blocks(const struct engine *e, const struct engine_seq *s, uint32_t n);
uint32_t engine_kv_available(const struct engine *e);
/* Drops tokens past n (rewind), freeing whole blocks. KVD_ERANGE (nothing changed) when n is
 * before blocks engine_seq_drop_window gave back. */
int engine_seq_truncate(struct engine *e, struct engine_seq *s, uint32_t n);
/* Sliding windows: on a model whose every layer reads at most the last `window` positions, the
 * blocks wholly before both keep_from and the next query's window (len + 1 - window) are given
 * back to the pool, so a long generation holds a bounded number of blocks. keep_from is the
 * earliest position the caller may still rewind to (UINT32_MAX: none). Returns the blocks given
 * back (0 on any other model). */
int engine_seq_drop_window(struct engine *e, struct engine_seq *s, uint32_t keep_from);
/* Context shift: drops tokens [keep, keep + n_drop) of s (n_drop a multiple of the block size;
 * kv_overflow_plan() says which), gives their blocks back and rotates the keys of every later
 * token back by n_drop positions in every layer, so they read as if computed at their new
 * positions; len shrinks by n_drop. One synchronous submission. Errors: those of
 * kv_seq_shift_plan() (nothing changed), device failures. */
int engine_seq_shift(struct engine *e, struct engine_seq *s, uint32_t keep, uint32_t n_drop);
/* Shifts run and rows they rewrote (every layer counts once), for status and benchmarks. */
void engine_shift_stats(const struct engine *e, uint64_t *ret_shifts, uint64_t *ret_rows);
/* Blocks of the pool s holds now (what a window keeps bounded). */
uint32_t engine_seq_live_blocks(const struct engine_seq *s);
/* Host copies of a sequence's KV, for swapping it out of the pool and for session files
 * (engine_swap.c). The unit is one block over all layers, engine_kv_block_bytes() bytes (each
 * layer's K block then its V block, in the engine's KV type, unconverted): a copy goes back only
 * into an engine of the same model, KV type and block size, which the caller checks.
 *   engine_seq_export_blocks(s, &first)   blocks a copy of s takes: its live blocks, from logical
 *                                         block `first` (those a sliding window gave back are
 *                                         not copied)
 *   engine_seq_export(e, s, dst)          copies them into dst (that many units)
 *   engine_seq_skip_dropped(e, s, first)  on a new empty sequence: the given-back blocks again
 *   engine_seq_import(e, s, src, n, tok)  appends n blocks filled from src holding tok tokens
 *                                         ((n - 1) * block_size < tok <= n * block_size) to s,
 *                                         whose len must be a multiple of the block size with no
 *                                         block reserved past it; all or nothing
 *                                         (KVD_E_KV_EXHAUSTED, KVD_E_CONTEXT, KVD_EINVAL, device
 *                                         failures: s unchanged)
 * Both copies are synchronous on the calling (engine) thread. An imported sequence registers in
 * the prefix cache like any other unless it was shifted (engine_seq_mark_shifted). */
uint64_t engine_kv_block_bytes(const struct engine *e);
/* The disk tier's side (engine_swap.c): physical blocks copied out as units like the above, the
 * registered blocks not written to the tier yet (by id from `from`, with their keys) and the
 * mark once they are; a sequence's chain key and the next block's, to look past its pool hits. */
int engine_blocks_export(struct engine *e, const uint32_t *blocks, uint32_t n, void *dst);
uint32_t engine_next_unpersisted(const struct engine *e, uint32_t from, uint64_t *ret_key);
void engine_mark_persisted(struct engine *e, uint32_t block);
/* The cached blocks next to be evicted, least recently used first (after KV_BLOCK_NONE: the
 * first), with their keys and whether a lower tier has them; and the free blocks left. */
uint32_t engine_lru_next(const struct engine *e, uint32_t after, uint64_t *ret_key,
                         bool *ret_persisted);
uint32_t engine_kv_free_blocks(const struct engine *e);
uint64_t engine_seq_chain_key(const struct engine *e, const struct engine_seq *s);
uint64_t engine_prefix_next(const struct engine *e, uint64_t parent, const int32_t *tokens);
/* Marks s's logical blocks [first, first + n) as already in the disk tier. */
void engine_seq_mark_persisted(struct engine *e, const struct engine_seq *s, uint32_t first,
                               uint32_t n);
uint64_t engine_seq_export_blocks(const struct engine_seq *s, uint32_t *ret_first);
int engine_seq_export(struct engine *e, const struct engine_seq *s, void *dst);
int engine_seq_skip_dropped(struct engine *e, struct engine_seq *s, uint32_t n_blocks);
int engine_seq_import(struct engine *e, struct engine_seq *s, const void *src, uint32_t n_blocks,
                      uint32_t n_tokens);
/* Whether tokens were dropped from s's middle (a context shift): its K/V no longer follow from
 * its token history, so it is never recomputed from one or registered; and the mark, for an
 * imported copy of such a sequence. */
bool engine_seq_shifted(const struct engine_seq *s);
void engine_seq_mark_shifted(struct engine_seq *s);
uint32_t engine_seq_dropped_blocks(const struct engine_seq *s);
/* A new sequence sharing all of src's blocks (copy-on-write on the first write to a shared one). */
int engine_seq_fork(struct engine *e, const struct engine_seq *src, struct engine_seq **ret);
/* A fork that cannot fail where it runs: engine_seq_reserve (any thread: memory only) makes an
 * empty sequence with room for n_tokens; engine_seq_fork_into (engine thread) makes it share src
 * and opens it (KVD_ERANGE only if src holds more than n_tokens); engine_seq_unreserve frees one
 * that was never forked into. */
int engine_seq_reserve(const struct engine *e, uint32_t n_tokens, struct engine_seq **ret);
int engine_seq_fork_into(struct engine *e, const struct engine_seq *src, struct engine_seq *dst);
void engine_seq_unreserve(struct engine_seq *s);

struct engine_item {
  struct engine_seq *seq;
  const int32_t *tokens; /* the new tokens, at positions seq_len .. seq_len + n_tokens - 1 */
  uint32_t n_tokens;     /* >= 1 */
  float *logits;         /* NULL, or n_vocab floats: the logits after the last new token */
  /* With logits: 0 or 1 as above; k > 1 (at most n_tokens) the logits after each of the last k
   * new tokens, k * n_vocab floats in order, each taking a logits row of the step (verifying k
   * drafted tokens in one step: speculative decoding). */
  uint32_t n_logits;
};

/* Runs one step. All or nothing: on KVD_E_KV_EXHAUSTED (not enough free blocks for every item),
 * KVD_E2BIG (more tokens or logits rows than one step holds), KVD_E_CONTEXT (a sequence would pass
 * the model's context) or KVD_EINVAL (a token outside the vocabulary) no sequence changes.
 * A device failure after submission also leaves the sequences' lengths unchanged. */
int engine_forward(struct engine *e, struct engine_item *items, uint32_t n_items);

/* GPU time of the last step's dispatches, by label, for benchmarks (see gpu_cmd_timings). */
uint32_t engine_last_timings(const struct engine *e, const struct gpu_timing **ret);

#endif
