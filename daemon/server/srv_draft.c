/* Speculative decoding on the server's side: the names of the modes, and a model's draft model
 * (its file, the check that it speaks the same vocabulary, its engine). The drafting and the
 * verification themselves are the scheduler's (sched_spec.c). */
#include "srv.h"

#include "kvd_error.h"

#include <stdio.h>
#include <string.h>

static const char *const spec_names[] = {
    [SCHED_SPEC_AUTO] = "auto",
    [SCHED_SPEC_OFF] = "off",
    [SCHED_SPEC_LOOKUP] = "lookup",
    [SCHED_SPEC_DRAFT] = "draft",
};

int srv_spec_parse(const char *s, size_t len, enum sched_spec *ret) {
  if (!s) return KVD_EINVAL;
  for (size_t i = 0; i < sizeof spec_names / sizeof spec_names[0]; i++)
    if (strlen(spec_names[i]) == len && memcmp(spec_names[i], s, len) == 0) {
      *ret = (enum sched_spec)i;
      return 0;
    }
  return KVD_EINVAL;
}

const char *srv_spec_name(enum sched_spec mode) {
  return (unsigned)mode < sizeof spec_names / sizeof spec_names[0] ? spec_names[mode] : "auto";
}

/* The draft's ids go straight into the target's verification and back, so they must mean the
 * same tokens: the same count, and the same string at every id. Messages name the check that
 * failed and the numbers, never the files' strings. */
static int draft_check_vocab(const struct gguf_file *tf, uint32_t t_vocab,
                             const struct gguf_file *df, uint32_t d_vocab, char *err,
                             size_t errlen) {
  if (t_vocab != d_vocab) {
    snprintf(err, errlen, "draft model: vocabulary of %u tokens, the model's has %u", d_vocab,
             t_vocab);
    return KVD_E_MISMATCH;
  }
  const struct gguf_value *ta = NULL, *da = NULL;
  if (gguf_get_arr(tf, "tokenizer.ggml.tokens", GGUF_VT_STRING, &ta) < 0 ||
      gguf_get_arr(df, "tokenizer.ggml.tokens", GGUF_VT_STRING, &da) < 0) {
    snprintf(err, errlen, "draft model: %s no token list (tokenizer.ggml.tokens) to compare",
             ta ? "the draft has" : "the model has");
    return KVD_E_MISMATCH;
  }
  if (ta->v.arr.count != da->v.arr.count) {
    snprintf(err, errlen, "draft model: token list of %llu entries, the model's has %llu",
             (unsigned long long)da->v.arr.count, (unsigned long long)ta->v.arr.count);
    return KVD_E_MISMATCH;
  }
  for (uint64_t i = 0; i < ta->v.arr.count; i++) {
    struct gguf_str a = ta->v.arr.elems[i].v.str, b = da->v.arr.elems[i].v.str;
    if (a.len != b.len || memcmp(a.ptr, b.ptr, a.len) != 0) {
      snprintf(err, errlen, "draft model: token %llu differs from the model's (another vocabulary)",
               (unsigned long long)i);
      return KVD_E_MISMATCH;
    }
  }
  return 0;
}

int srv_draft_open(struct srv *s, struct srv_model *m, const struct engine *target,
                   struct engine **ret, char *err, size_t errlen) {
  const char *path = m->draft_path;
  /* The same reader and checks as the model itself (srv_model.c, model_open). */
  struct gguf_error gerr = {0};
  int rc = gguf_open(path, &m->draft_f, &gerr);
  if (rc < 0) {
    snprintf(err, errlen, "draft model %s: %s (offset %llu)", path, gerr.msg,
             (unsigned long long)gerr.offset);
    return rc;
  }
  struct model_hparams dhp;
  struct model_error merr = {{0}};
  rc = model_hparams_read(m->draft_f, &dhp, &merr);
  if (rc < 0) {
    snprintf(err, errlen, "draft model %s: %s", path, merr.msg[0] ? merr.msg : kvd_strerror(rc));
    return rc;
  }
  rc = draft_check_vocab(m->f, engine_hparams(target)->n_vocab, m->draft_f, dhp.n_vocab, err,
                         errlen);
  if (rc < 0) return rc;
  /* Its own pool, as many blocks of the same size and type as the target's: a request's draft
   * sequence then never runs out before its target sequence does. Logits: one row per running
   * request (each drafts greedily from its own last row). */
  struct kv_pool_stats kv;
  engine_kv_stats(target, &kv);
  struct engine_opts eo = {
      .kv_type = engine_kv_type(target),
      .block_size = kv.block_size,
      .n_blocks = kv.total,
      .max_step_tokens = engine_max_step_tokens(target),
      .max_logits = (uint32_t)s->cfg->max_seqs,
  };
  rc = engine_new(s->device.dev, m->draft_f, &eo, ret, &merr);
  if (rc < 0) {
    snprintf(err, errlen, "draft model %s: %s", path, merr.msg[0] ? merr.msg : kvd_strerror(rc));
    return rc;
  }
  m->draft_kv_bytes_per_token = engine_kv_bytes_per_token(*ret);
  srv_model_default_name(path, m->draft_name, sizeof m->draft_name);
  return 0;
}
