/* Context shift on the device: a sequence gives up tokens from its middle (kv_shift.c plans the
 * block table), and the keys that move are rotated back to their new positions in every layer
 * (kv_shift.comp), all in one submission. */
#include "engine_internal.h"

#include "kvd_error.h"

#include <string.h>

/* The host-visible moves array, grown to the largest shift seen. */
static int shift_reserve(struct engine *e, uint32_t n_moves) {
  if (n_moves <= e->shift_cap) return 0;
  uint32_t cap = e->shift_cap ? e->shift_cap : 256;
  while (cap < n_moves)
    cap = cap > UINT32_MAX / 2 ? n_moves : cap * 2;
  struct gpu_buffer *b = NULL;
  int rc = gpu_buffer_new(e->dev, (uint64_t)cap * sizeof(struct kv_move), GPU_MEM_HOST,
                          "shift moves", &b);
  if (rc < 0) return rc;
  gpu_buffer_free(e->shift_moves);
  e->shift_moves = b;
  e->shift_cap = cap;
  return 0;
}

int engine_seq_shift(struct engine *e, struct engine_seq *s, uint32_t keep, uint32_t n_drop) {
  struct kv_shift sh;
  int rc = kv_seq_shift_plan(&e->pool, s->kv, keep, n_drop, &sh);
  if (rc < 0) return rc;
  if (sh.n_moves) {
    rc = shift_reserve(e, sh.n_moves);
    if (rc == 0) {
      memcpy(gpu_buffer_map(e->shift_moves), sh.moves, (size_t)sh.n_moves * sizeof *sh.moves);
      rc = gpu_cmd_begin(e->cmd);
    }
    if (rc == 0) {
      struct gpu_binding mv = {e->shift_moves, 0, 0};
      for (uint32_t l = 0; l < e->hp.n_layer; l++) {
        const struct eng_layer *el = &e->layers[l];
        struct gpu_buffer *freq = ops_rope_freq(&e->ops, &el->rope);
        if (!freq) {
          gpu_cmd_fail(e->cmd, KVD_EINVAL); /* prepared for every layer at load */
          break;
        }
        attn_record_shift(&e->attn, e->cmd, (struct gpu_binding){el->k_cache, 0, 0},
                          (struct gpu_binding){el->v_cache, 0, 0}, mv,
                          (struct gpu_binding){freq, 0, 0}, sh.n_moves, sh.n_rotate,
                          e->hp.n_head_kv, e->hp.head_dim, e->pool.block_size, el->rope.n_rot,
                          el->rope.mode == MODEL_ROPE_NEOX, n_drop);
      }
      rc = gpu_cmd_submit(e->cmd);
      if (rc == 0) rc = gpu_cmd_wait(e->cmd);
    }
  }
  if (rc < 0) {
    /* Nothing was recorded, or the device failed: then rows rewritten in place may be half
     * rotated, but a failed device fails every later step too, so no output is built on them. */
    kv_seq_shift_cancel(&e->pool, &sh);
    return rc;
  }
  kv_seq_shift_commit(&e->pool, s->kv, &sh);
  e->shifts++;
  e->shift_rows += sh.n_moves;
  return 0;
}

void engine_shift_stats(const struct engine *e, uint64_t *ret_shifts, uint64_t *ret_rows) {
  *ret_shifts = e->shifts;
  *ret_rows = e->shift_rows;
}
