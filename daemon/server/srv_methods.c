/* The method handlers hello, status, models.list, cancel, tokenize, detokenize, and the dispatch.
 */
#include "srv.h"

#include "kvd_config.h"
#include "kvd_error.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void srv_h_hello(struct srv_conn *c, const struct ipc_msg *msg) {
  struct ipc_err e = {0};
  uint32_t proto = 0;
  const char *client = NULL;
  size_t clen = 0;
  if (ipc_get_u32(msg->params, "protocol", &proto, &e) < 0 ||
      ipc_get_str(msg->params, "client", &client, &clen, &e) < 0) {
    srv_reply_error(c, msg->id, e.code, "%s", e.message);
    return;
  }
  if (proto < 1) {
    srv_reply_error(c, msg->id, KVD_ENOTSUP, "kvd speaks protocol 1 and up; the client asked %u",
                    proto);
    return;
  }
  c->protocol = proto < IPC_PROTOCOL_VERSION ? proto : IPC_PROTOCOL_VERSION;
  if (client) {
    snprintf(c->client, sizeof c->client, "%.*s", (int)clen, client);
    log_info("client %llu is %s", (unsigned long long)c->serial, c->client);
  }
  struct srv_model *m = srv_model_find(c->srv, NULL, 0);
  ipc_w_result(&c->w, msg->id);
  ipc_w_map_open(&c->w);
  ipc_w_kv_u64(&c->w, "protocol", c->protocol);
  ipc_w_kv_cstr(&c->w, "version", KVD_VERSION);
  static const char *caps[] = {"stream", "logprobs", "sessions", "chat", "cancel", "speculative"};
  uint32_t n_caps = sizeof caps / sizeof caps[0];
  ipc_w_key(&c->w, "capabilities");
  ipc_w_array(&c->w, n_caps);
  for (uint32_t i = 0; i < n_caps; i++)
    ipc_w_cstr(&c->w, caps[i]);
  if (m) ipc_w_kv_cstr(&c->w, "model", m->name);
  ipc_w_close(&c->w);
  ipc_w_end(&c->w);
  srv_reply_done(c, msg->id);
}

/* The process's resident memory (weights being read, staging, every buffer): what a user sees
 * in top. 0 where /proc is not there. */
static uint64_t host_resident_bytes(void) {
  FILE *f = fopen("/proc/self/statm", "re");
  unsigned long long size = 0, resident = 0;
  int n = f ? fscanf(f, "%llu %llu", &size, &resident) : 0;
  if (f) fclose(f);
  long page = sysconf(_SC_PAGESIZE);
  return n == 2 && page > 0 ? (uint64_t)resident * (uint64_t)page : 0;
}

/* A model's speculation counters, and its draft model's KV pool when it has one. */
static void write_spec(struct ipc_w *w, const struct srv_model *m, const struct sched_stats *st) {
  ipc_w_key(w, "speculative");
  ipc_w_map_open(w);
  ipc_w_kv_u64(w, "drafted", st->spec_drafted);
  ipc_w_kv_u64(w, "accepted", st->spec_accepted);
  ipc_w_kv_f64(w, "acceptance",
               st->spec_drafted ? (double)st->spec_accepted / (double)st->spec_drafted : 0);
  ipc_w_kv_u64(w, "steps", st->spec_steps);
  ipc_w_kv_u64(w, "lookup_drafted", st->lookup_drafted);
  ipc_w_kv_u64(w, "lookup_accepted", st->lookup_accepted);
  ipc_w_kv_u64(w, "draft_drafted", st->draft_drafted);
  ipc_w_kv_u64(w, "draft_accepted", st->draft_accepted);
  if (m->draft_f) ipc_w_kv_cstr(w, "draft_model", m->draft_name);
  ipc_w_close(w);
  if (!st->has_draft) return;
  ipc_w_key(w, "draft_kv");
  ipc_w_map_open(w);
  ipc_w_kv_u64(w, "block_tokens", st->draft_kv.block_size);
  ipc_w_kv_u64(w, "blocks_total", st->draft_kv.total);
  ipc_w_kv_u64(w, "blocks_used", st->draft_kv.used);
  ipc_w_kv_u64(w, "blocks_free", st->draft_kv.free);
  ipc_w_kv_u64(w, "blocks_cached", st->draft_kv.cached);
  ipc_w_close(w);
}

static void write_model(struct ipc_w *w, const struct srv_model *m, bool is_default) {
  const struct model_hparams *hp = engine_hparams(sched_engine(m->sched));
  struct sched_stats st;
  sched_get_stats(m->sched, &st);
  ipc_w_map_open(w);
  ipc_w_kv_cstr(w, "name", m->name);
  ipc_w_kv_cstr(w, "path", m->path);
  ipc_w_kv_cstr(w, "arch", model_arch_name(hp->arch));
  ipc_w_kv_u64(w, "n_ctx", hp->n_ctx_train);
  ipc_w_kv_u64(w, "n_vocab", hp->n_vocab);
  ipc_w_kv_u64(w, "n_layer", hp->n_layer);
  ipc_w_kv_u64(w, "n_embd", hp->n_embd);
  ipc_w_kv_cstr(w, "chat_template", chat_family_name(m->chat));
  ipc_w_kv_cstr(w, "chat_template_source", chat_source_name(m->chat_source));
  if (m->chat_source == CHAT_SRC_UNRECOGNISED)
    ipc_w_kv_cstr(w, "chat_template_warning",
                  "the model's chat template was not recognised: messages are joined as plain "
                  "text; load it with chat_template set to its family");
  uint64_t params = 0, bytes = 0;
  for (uint64_t i = 0; i < m->f->n_tensors; i++) {
    params += gguf_tensor_nelements(&m->f->tensors[i]);
    bytes += m->f->tensors[i].nbytes;
  }
  ipc_w_kv_u64(w, "n_params", params);
  ipc_w_kv_u64(w, "bytes", bytes);
  ipc_w_kv_u64(w, "kv_bytes_per_token", engine_kv_bytes_per_token(sched_engine(m->sched)));
  ipc_w_kv_cstr(w, "kv_type", kv_type_name(engine_kv_type(sched_engine(m->sched))));
  ipc_w_kv_u64(w, "steps", st.steps);
  ipc_w_kv_u64(w, "prefill_tokens", st.prefill_tokens);
  ipc_w_kv_u64(w, "decode_tokens", st.decode_tokens);
  ipc_w_kv_u64(w, "batch_tokens_max", st.batch_tokens_max);
  ipc_w_kv_u64(w, "preemptions", st.preemptions);
  ipc_w_kv_cstr(w, "overflow", kv_overflow_name(m->overflow));
  ipc_w_kv_u64(w, "context_shifts", st.shifts);
  ipc_w_kv_f64(w, "last_step_ms", st.last_step_ms);
  ipc_w_kv_bool(w, "default", is_default);
  write_spec(w, m, &st);
  ipc_w_close(w);
}

static uint32_t count_models(const struct srv *s) {
  uint32_t n = 0;
  for (const struct srv_model *m = s->models; m; m = m->next)
    n++;
  return n;
}

void srv_h_status(struct srv_conn *c, const struct ipc_msg *msg) {
  struct srv *s = c->srv;
  struct ipc_w *w = &c->w;
  ipc_w_result(w, msg->id);
  ipc_w_map_open(w);
  ipc_w_kv_cstr(w, "version", KVD_VERSION);
  ipc_w_kv_u64(w, "uptime_ms", (uint64_t)((srv_now() - s->started) * 1e3));
  ipc_w_kv_u64(w, "connections", s->n_conns);
  struct srv_device_mem ms = {0};
  if (s->device.memory) s->device.memory(s->device.dev, &ms);
  ipc_w_key(w, "devices");
  ipc_w_array(w, 1);
  ipc_w_map_open(w);
  ipc_w_kv_u64(w, "index", 0);
  ipc_w_kv_cstr(w, "name", s->device.name ? s->device.name : "?");
  ipc_w_kv_cstr(w, "type", s->device.type ? s->device.type : "other");
  ipc_w_kv_u64(w, "memory_total", s->device.memory_total);
  ipc_w_kv_u64(w, "memory_used", ms.reserved);
  ipc_w_close(w);
  /* KV: summed over the loaded models' pools. */
  uint64_t bt = 0, total = 0, used = 0, free_ = 0, hw = 0, fails = 0, kv_bytes = 0, cached = 0,
           lookups = 0, hits = 0, evictions = 0, preemptions = 0, bpt = 0, host = 0, host_cap = 0,
           swap_out = 0, swap_in = 0, recomputed = 0, sessions = 0, swapped = 0, disk_hits = 0,
           disk_writes = 0, disk_blocks = 0, disk_bytes = 0, ram_blocks = 0, ram_hits = 0,
           ram_spills = 0;
  const char *kv_type = NULL; /* the models' KV type, "mixed" when they differ */
  for (struct srv_model *m = s->models; m; m = m->next) {
    const struct engine *e = sched_engine(m->sched);
    const char *t = kv_type_name(engine_kv_type(e));
    kv_type = !kv_type || !strcmp(kv_type, t) ? t : "mixed";
    if (m == s->models) bpt = engine_kv_bytes_per_token(e); /* the default model's */
    struct sched_stats st;
    sched_get_stats(m->sched, &st);
    bt = st.kv.block_size;
    total += st.kv.total;
    used += st.kv.used;
    free_ += st.kv.free;
    hw += st.kv.high_water;
    fails += st.kv.alloc_failures;
    cached += st.kv.cached;
    lookups += st.kv.lookups;
    hits += st.kv.hits;
    evictions += st.kv.evictions;
    preemptions += st.preemptions;
    host += st.host_bytes;
    host_cap += st.host_budget;
    swap_out += st.swap_out;
    swap_in += st.swap_in;
    recomputed += st.swap_recomputed;
    sessions += st.sessions;
    swapped += st.sessions_swapped;
    disk_hits += st.disk_hits;
    disk_writes += st.disk_writes;
    disk_blocks += st.disk_blocks;
    disk_bytes += st.disk_bytes;
    ram_blocks += st.ram_blocks;
    ram_hits += st.ram_hits;
    ram_spills += st.ram_spills;
    kv_bytes += (uint64_t)st.kv.total * st.kv.block_size *
                engine_kv_bytes_per_token(sched_engine(m->sched));
    if (st.has_draft) /* the draft's pool is KV memory too, not weights */
      kv_bytes +=
          (uint64_t)st.draft_kv.total * st.draft_kv.block_size * m->draft_kv_bytes_per_token;
  }
  ipc_w_key(w, "memory");
  ipc_w_map_open(w);
  ipc_w_kv_u64(w, "host", host_resident_bytes());
  ipc_w_kv_u64(w, "device", ms.reserved);
  ipc_w_kv_u64(w, "kv", kv_bytes);
  ipc_w_kv_u64(w, "weights", ms.allocated > kv_bytes ? ms.allocated - kv_bytes : 0);
  ipc_w_close(w);
  ipc_w_key(w, "kv");
  ipc_w_map_open(w);
  ipc_w_kv_u64(w, "block_tokens", bt);
  ipc_w_kv_u64(w, "blocks_total", total);
  ipc_w_kv_u64(w, "blocks_used", used);
  ipc_w_kv_u64(w, "blocks_free", free_);
  ipc_w_kv_u64(w, "blocks_cached", cached);
  ipc_w_kv_u64(w, "prefix_lookups", lookups);
  ipc_w_kv_u64(w, "prefix_hits", hits);
  ipc_w_kv_f64(w, "prefix_hit_rate", lookups ? (double)hits / (double)lookups : 0);
  ipc_w_kv_u64(w, "evictions", evictions);
  ipc_w_kv_u64(w, "preemptions", preemptions);
  ipc_w_kv_u64(w, "high_water", hw);
  ipc_w_kv_u64(w, "alloc_failures", fails);
  ipc_w_kv_u64(w, "host_bytes", host);
  ipc_w_kv_u64(w, "host_budget", host_cap);
  ipc_w_kv_u64(w, "swap_out", swap_out);
  ipc_w_kv_u64(w, "swap_in", swap_in);
  ipc_w_kv_u64(w, "swap_recomputed", recomputed);
  ipc_w_kv_u64(w, "sessions_swapped", swapped);
  ipc_w_kv_u64(w, "sessions_known", sessions);
  ipc_w_kv_u64(w, "disk_blocks", disk_blocks);
  ipc_w_kv_u64(w, "disk_bytes", disk_bytes);
  ipc_w_kv_u64(w, "disk_hits", disk_hits);
  ipc_w_kv_u64(w, "disk_writes", disk_writes);
  ipc_w_kv_u64(w, "host_prefix_blocks", ram_blocks);
  ipc_w_kv_u64(w, "host_prefix_hits", ram_hits);
  ipc_w_kv_u64(w, "host_spills", ram_spills);
  if (kv_type) ipc_w_kv_cstr(w, "kv_type", kv_type);
  if (s->models) ipc_w_kv_u64(w, "bytes_per_token", bpt);
  ipc_w_close(w);
  /* From the same snapshot as the requests array (the engine's own counters lag it). */
  uint32_t n_queued, n_started;
  srv_gen_count(s, &n_queued, &n_started);
  ipc_w_kv_u64(w, "queue_depth", n_queued);
  ipc_w_kv_u64(w, "running", n_started);
  ipc_w_key(w, "models");
  ipc_w_array(w, count_models(s));
  for (struct srv_model *m = s->models; m; m = m->next)
    write_model(w, m, m == s->models);
  uint32_t q, r;
  ipc_w_key(w, "requests");
  srv_gen_write_status(s, w, &q, &r);
  ipc_w_key(w, "totals");
  ipc_w_map_open(w);
  ipc_w_kv_u64(w, "connections", s->stats.connections);
  ipc_w_kv_u64(w, "requests", s->stats.requests);
  ipc_w_kv_u64(w, "errors", s->stats.errors);
  ipc_w_kv_u64(w, "prompt_tokens", s->stats.prompt_tokens);
  ipc_w_kv_u64(w, "cached_tokens", s->stats.cached_tokens);
  ipc_w_kv_u64(w, "generated_tokens", s->stats.generated_tokens);
  ipc_w_kv_f64(w, "last_ttft_ms", s->stats.last_ttft_ms);
  ipc_w_kv_f64(w, "last_tpot_ms", s->stats.last_tpot_ms);
  ipc_w_close(w);
  ipc_w_close(w);
  if (ipc_w_end(w) < 0) {
    srv_reply_error(c, msg->id, KVD_ENOMEM, "cannot encode status");
    return;
  }
  srv_reply_done(c, msg->id);
}

void srv_h_models_list(struct srv_conn *c, const struct ipc_msg *msg) {
  ipc_w_result(&c->w, msg->id);
  ipc_w_map(&c->w, 1);
  ipc_w_key(&c->w, "models");
  ipc_w_array(&c->w, count_models(c->srv));
  for (struct srv_model *m = c->srv->models; m; m = m->next)
    write_model(&c->w, m, m == c->srv->models);
  ipc_w_end(&c->w);
  srv_reply_done(c, msg->id);
}

void srv_h_cancel(struct srv_conn *c, const struct ipc_msg *msg) {
  struct ipc_err e = {0};
  uint32_t id;
  if (ipc_get_u32(msg->params, "id", &id, &e) != 1) {
    srv_reply_error(c, msg->id, e.code ? e.code : KVD_EINVAL, "%s", e.message);
    return;
  }
  bool found;
  srv_gen_cancel_id(c, id, &found);
  ipc_w_result(&c->w, msg->id);
  ipc_w_map(&c->w, 1);
  ipc_w_kv_bool(&c->w, "cancelled", found);
  ipc_w_end(&c->w);
  srv_reply_done(c, msg->id);
}

struct srv_model *srv_model_param(struct srv_conn *c, const struct ipc_msg *msg) {
  struct ipc_err e = {0};
  const char *name = NULL;
  size_t len = 0;
  if (ipc_get_str(msg->params, "model", &name, &len, &e) < 0) {
    srv_reply_error(c, msg->id, e.code, "%s", e.message);
    return NULL;
  }
  struct srv_model *m = srv_model_find(c->srv, name, len);
  if (!m || m->unloading)
    srv_reply_error(c, msg->id, KVD_E_NO_MODEL,
                    name ? "no model named %.*s is loaded" : "no model is loaded%.*s", (int)len,
                    name ? name : "");
  return m && !m->unloading ? m : NULL;
}

void srv_h_tokenize(struct srv_conn *c, const struct ipc_msg *msg) {
  struct ipc_err e = {0};
  const char *text;
  size_t len;
  bool add = true, parse = false;
  if (ipc_get_str(msg->params, "text", &text, &len, &e) != 1 ||
      ipc_get_bool(msg->params, "add_special", &add, &e) < 0 ||
      ipc_get_bool(msg->params, "parse_special", &parse, &e) < 0) {
    srv_reply_error(c, msg->id, e.code ? e.code : KVD_EINVAL, "%s", e.message);
    return;
  }
  struct srv_model *m = srv_model_param(c, msg);
  if (!m) return;
  unsigned flags = (add ? TOK_ADD_SPECIAL : 0) | (parse ? TOK_PARSE_SPECIAL : 0);
  int n = tok_encode(m->tok, text, len, flags, NULL, 0);
  int32_t *ids = n > 0 ? malloc((size_t)n * sizeof *ids) : NULL;
  if (n > 0 && !ids) n = KVD_ENOMEM;
  if (n > 0) n = tok_encode(m->tok, text, len, flags, ids, (size_t)n);
  if (n < 0) {
    free(ids);
    srv_reply_error(c, msg->id, n, NULL);
    return;
  }
  ipc_w_result(&c->w, msg->id);
  ipc_w_map(&c->w, 1);
  ipc_w_key(&c->w, "tokens");
  ipc_w_array(&c->w, (uint32_t)n);
  for (int i = 0; i < n; i++)
    ipc_w_u64(&c->w, (uint64_t)ids[i]);
  free(ids);
  ipc_w_end(&c->w);
  srv_reply_done(c, msg->id);
}

void srv_h_detokenize(struct srv_conn *c, const struct ipc_msg *msg) {
  struct ipc_err e = {0};
  const msgpack_object *items;
  size_t n;
  if (ipc_get_uints(msg->params, "tokens", &items, &n, &e) != 1) {
    srv_reply_error(c, msg->id, e.code ? e.code : KVD_EINVAL, "%s", e.message);
    return;
  }
  struct srv_model *m = srv_model_param(c, msg);
  if (!m) return;
  int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
  if (!ids) {
    srv_reply_error(c, msg->id, KVD_ENOMEM, NULL);
    return;
  }
  for (size_t i = 0; i < n; i++) {
    if (items[i].via.u64 >= tok_vocab_size(m->tok)) {
      free(ids);
      srv_reply_error(c, msg->id, KVD_ERANGE, "token %llu is outside the vocabulary of %u",
                      (unsigned long long)items[i].via.u64, tok_vocab_size(m->tok));
      return;
    }
    ids[i] = (int32_t)items[i].via.u64;
  }
  /* The text goes out as a msgpack str, which must be UTF-8: ids can spell any bytes (byte
   * tokens, half a character), so they go through the streaming detokenizer, which turns what
   * is not UTF-8 into U+FFFD. Each raw byte becomes at most 3 bytes of output. */
  int raw = tok_decode(m->tok, ids, n, 0, NULL, 0);
  size_t bound = tok_stream_bound(m->tok), cap = raw > 0 ? (size_t)raw * 3 + bound + 4 : 0;
  char *text = raw > 0 ? malloc(cap) : NULL;
  int len = raw;
  if (raw > 0 && text) {
    struct tok_stream ts;
    tok_stream_init(&ts, m->tok, 0);
    size_t off = 0;
    for (size_t i = 0; i < n && len >= 0; i++) {
      len = tok_stream_feed(&ts, ids[i], text + off, cap - off);
      if (len > 0) off += (size_t)len;
    }
    if (len >= 0) len = tok_stream_flush(&ts, text + off, cap - off);
    if (len >= 0) len = (int)(off + (size_t)len);
  }
  free(ids);
  if (len < 0 || (raw > 0 && !text)) {
    free(text);
    srv_reply_error(c, msg->id, len < 0 ? len : KVD_ENOMEM, NULL);
    return;
  }
  ipc_w_result(&c->w, msg->id);
  ipc_w_map(&c->w, 1);
  ipc_w_kv_str(&c->w, "text", text ? text : "", (size_t)len);
  free(text);
  ipc_w_end(&c->w);
  srv_reply_done(c, msg->id);
}

void srv_dispatch(struct srv_conn *c, struct ipc_msg *m) {
  struct ipc_err e = {0};
  if (m->method_id == IPC_M_UNKNOWN) {
    srv_reply_error(c, m->id, KVD_E_NO_METHOD, "unknown method '%.*s'", (int)m->method_len,
                    m->method);
    return;
  }
  int rc = ipc_validate_params(m, &e);
  if (rc < 0) {
    srv_reply_error(c, m->id, rc, "%s", e.message);
    return;
  }
  /* The table is generated from api.json (srv_handlers.c): one handler per request method. */
  srv_handler_fn h = srv_handlers[m->method_id];
  if (!h) { /* generate.chunk is a notification the server sends, not a request it answers */
    srv_reply_error(c, m->id, KVD_E_NO_METHOD, "'%.*s' is not a request", (int)m->method_len,
                    m->method);
    return;
  }
  h(c, m);
}
