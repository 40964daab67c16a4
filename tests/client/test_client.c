/* libkvd against a scripted fake daemon (fake_kvd.c): connect and hello, blocking and async
 * generation with streamed chunks, errors with the server's message, cancel, lost connections,
 * timeouts, the other methods' results. */
#include "fake_kvd.h"
#include "kt.h"
#include "kvd.h"

#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* Starts a fake running script and connects a client to it. */
#define CONNECT(f, script, ud, c)                                                                  \
  do {                                                                                             \
    KT_ASSERT(fake_start(&(f), (script), (ud)) == 0);                                              \
    int rc_ = kvd_client_connect((f).path, &(c));                                                  \
    if (rc_ < 0) {                                                                                 \
      fake_join(&(f));                                                                             \
      KT_ASSERT_MSG(0, "connect: %s (%s)", kvd_client_last_error(NULL), (f).error);                \
    }                                                                                              \
  } while (0)

#define FAKE_OK(f)                                                                                 \
  do {                                                                                             \
    int rc_ = fake_join(&(f));                                                                     \
    KT_CHECK_MSG(rc_ == 0, "fake kvd: %s", (f).error);                                             \
  } while (0)

/* ---- Connect and hello --------------------------------------------------------------------- */

static void script_hello_only(struct fake *f) {
  fake_hello(f);
}

KT_TEST(connect_says_hello) {
  struct fake f;
  struct kvd_client *c;
  CONNECT(f, script_hello_only, NULL, c);
  KT_CHECK(kvd_client_connected(c));
  KT_CHECK(kvd_client_server_version(c) && !strcmp(kvd_client_server_version(c), "9.8.7"));
  KT_CHECK(kvd_client_default_model(c) && !strcmp(kvd_client_default_model(c), "tiny"));
  KT_CHECK(kvd_client_has_capability(c, "sessions"));
  KT_CHECK(!kvd_client_has_capability(c, "logprobs"));
  KT_CHECK(kvd_client_fd(c) >= 0);
  KT_CHECK_EQ(kvd_client_pending(c), 0);
  kvd_client_close(c);
  FAKE_OK(f);
  KT_CHECK(f.n_methods == 1 && !strcmp(f.methods[0], "hello"));
}

KT_TEST(connect_uses_kvd_socket_env) {
  struct fake f;
  struct kvd_client *c;
  KT_ASSERT(fake_start(&f, script_hello_only, NULL) == 0);
  char *old = getenv("KVD_SOCKET") ? strdup(getenv("KVD_SOCKET")) : NULL;
  setenv("KVD_SOCKET", f.path, 1);
  char path[256];
  KT_CHECK(kvd_default_socket_path(path, sizeof path) == (int)strlen(f.path));
  KT_CHECK(!strcmp(path, f.path));
  int rc = kvd_client_connect(NULL, &c);
  if (old)
    setenv("KVD_SOCKET", old, 1);
  else
    unsetenv("KVD_SOCKET");
  free(old);
  KT_CHECK_EQ(rc, 0);
  if (rc == 0) kvd_client_close(c);
  FAKE_OK(f);
}

KT_TEST(connect_refused) {
  struct kvd_client *c = (struct kvd_client *)0x1;
  char path[200];
  snprintf(path, sizeof path, "%s/nobody.sock", kt_tmp_dir());
  /* No file at all. */
  KT_CHECK_EQ(kvd_client_connect(path, &c), KVD_ECONNREFUSED);
  KT_CHECK(c == (struct kvd_client *)0x1); /* outputs are written only on success */
  KT_CHECK_MSG(strstr(kvd_client_last_error(NULL), "kvd --model"), "message: %s",
               kvd_client_last_error(NULL));
  KT_CHECK(strstr(kvd_client_last_error(NULL), path) != NULL);
  /* A socket file nobody listens on (a daemon that died). */
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%.100s", path);
  KT_ASSERT(bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0);
  close(fd);
  KT_CHECK_EQ(kvd_client_connect(path, &c), KVD_ECONNREFUSED);
  KT_CHECK(strstr(kvd_client_last_error(NULL), "systemctl --user start kvd") != NULL);
  unlink(path);
}

static void script_hello_error(struct fake *f) {
  struct ipc_msg *m = fake_expect(f, "hello");
  if (!m) return;
  fake_error(f, m->id, KVD_ENOTSUP, "protocol 1 is not spoken here");
  ipc_msg_free(m);
}

KT_TEST(connect_hello_refused) {
  struct fake f;
  struct kvd_client *c;
  KT_ASSERT(fake_start(&f, script_hello_error, NULL) == 0);
  KT_CHECK_EQ(kvd_client_connect(f.path, &c), KVD_ENOTSUP);
  KT_CHECK(strstr(kvd_client_last_error(NULL), "protocol 1 is not spoken here") != NULL);
  FAKE_OK(f);
}

static void script_hang_up_at_once(struct fake *f) {
  fake_hang_up(f);
}

KT_TEST(connect_closed_before_hello) {
  struct fake f;
  struct kvd_client *c;
  KT_ASSERT(fake_start(&f, script_hang_up_at_once, NULL) == 0);
  KT_CHECK_EQ(kvd_client_connect(f.path, &c), KVD_EIO);
  KT_CHECK(strstr(kvd_client_last_error(NULL), "closed the connection") != NULL);
  FAKE_OK(f);
}

/* ---- Blocking generate --------------------------------------------------------------------- */

static const char *const chunks[] = {" there", " was", "", " a \"fox\"\n"};
static const uint32_t chunk_tokens[] = {727, 471, 30, 263};

/* Checks the generate params the test sends, then streams the chunks and a result. */
static void script_generate(struct fake *f) {
  fake_hello(f);
  struct ipc_msg *m = fake_expect(f, "generate");
  if (!m) return;
  struct ipc_err err;
  if (ipc_validate_params(m, &err) < 0) fake_fail(f, "generate params: %s", err.message);
  const char *prompt = NULL;
  uint64_t max_tokens = 0, top_k = 0, seed = 0;
  double temp = 0;
  bool stream = false;
  const msgpack_object *stop = NULL;
  size_t n_stop = 0;
  ipc_get_str(m->params, "prompt", &prompt, NULL, NULL);
  ipc_get_u64(m->params, "max_tokens", &max_tokens, NULL);
  ipc_get_u64(m->params, "top_k", &top_k, NULL);
  ipc_get_u64(m->params, "seed", &seed, NULL);
  ipc_get_f64(m->params, "temperature", &temp, NULL);
  ipc_get_bool(m->params, "stream", &stream, NULL);
  ipc_get_strs(m->params, "stop", &stop, &n_stop, NULL);
  if (!prompt || strcmp(prompt, "Once upon a time")) fake_fail(f, "prompt %s", prompt);
  if (max_tokens != 16 || top_k != 40 || seed != 42 || temp != 0.5 || !stream)
    fake_fail(f, "params: max_tokens %llu top_k %llu seed %llu temperature %g stream %d",
              (unsigned long long)max_tokens, (unsigned long long)top_k, (unsigned long long)seed,
              temp, stream);
  if (n_stop != 2 || strcmp(stop[0].via.str.ptr, "\n\n") || strcmp(stop[1].via.str.ptr, "END"))
    fake_fail(f, "stop strings");
  /* Unset options are not sent at all, so the server's defaults apply. */
  const char *unset[] = {"top_p",   "min_p", "repeat_penalty", "logprobs",
                         "session", "model", "messages"};
  for (size_t i = 0; i < sizeof unset / sizeof unset[0]; i++)
    if (ipc_map_find(m->params, unset[i])) fake_fail(f, "unset param %s was sent", unset[i]);
  for (size_t i = 0; i < 4; i++)
    fake_chunk(f, m->id, chunks[i], chunk_tokens[i]);
  fake_gen_result(f, m->id, "", "length", 4);
  ipc_msg_free(m);
}

struct collect {
  char text[256];
  int calls;
  uint32_t tokens[16];
  size_t n_tokens;
  int cancel_at; /* return nonzero on this call (1-based); 0: never */
  struct kvd_client *c;
  int nested_rc;
  bool done;
  int done_rc;
  char done_text[256];
  enum kvd_finish done_finish;
};

static int on_chunk(void *ud, const struct kvd_chunk *ch) {
  struct collect *col = ud;
  col->calls++;
  strncat(col->text, ch->text, sizeof col->text - strlen(col->text) - 1);
  for (size_t i = 0; i < ch->n_tokens && col->n_tokens < 16; i++)
    col->tokens[col->n_tokens++] = ch->tokens[i];
  return col->cancel_at && col->calls == col->cancel_at;
}

static void gen_params(struct kvd_gen_params *p) {
  static const char *const stop[] = {"\n\n", "END"};
  kvd_gen_params_init(p);
  p->prompt = "Once upon a time";
  p->max_tokens = 16;
  p->temperature = 0.5;
  p->top_k = 40;
  p->seed = 42;
  p->stop = stop;
  p->n_stop = 2;
}

KT_TEST(generate_streams_chunks_in_order) {
  struct fake f;
  struct kvd_client *c;
  CONNECT(f, script_generate, NULL, c);
  struct kvd_gen_params p;
  gen_params(&p);
  struct collect col = {0};
  struct kvd_gen_result *r = NULL;
  int rc = kvd_generate(c, &p, on_chunk, &col, &r);
  KT_CHECK_MSG(rc == 0, "generate: %d %s", rc, kvd_client_last_error(c));
  KT_CHECK_EQ(col.calls, 4); /* the empty chunk too: it carries a token */
  KT_CHECK(!strcmp(col.text, " there was a \"fox\"\n"));
  KT_CHECK_EQ(col.n_tokens, 4);
  for (size_t i = 0; i < 4 && i < col.n_tokens; i++)
    KT_CHECK_EQ(col.tokens[i], chunk_tokens[i]);
  if (r) {
    KT_CHECK(!strcmp(r->text, " there was a \"fox\"\n"));
    KT_CHECK_EQ(r->text_len, strlen(" there was a \"fox\"\n"));
    KT_CHECK_EQ(r->finish, KVD_FINISH_LENGTH);
    KT_CHECK(!strcmp(r->finish_reason, "length"));
    KT_CHECK_EQ(r->prompt_tokens, 5);
    KT_CHECK_EQ(r->completion_tokens, 4);
    KT_CHECK_EQ(r->cached_tokens, 2);
    KT_CHECK(r->timings.prefill_ms == 3.25 && r->timings.tokens_per_s == 150);
    KT_CHECK_EQ(r->n_tokens, 4);
    KT_CHECK_EQ(r->error, 0);
    KT_CHECK(r->error_message == NULL);
  }
  kvd_gen_result_free(r);
  KT_CHECK_EQ(kvd_client_pending(c), 0);
  kvd_client_close(c);
  FAKE_OK(f);
}

/* speculative goes out only when set, and the result's draft counts come back: the first
 * generate asks for "draft", the second leaves it to the daemon (and gets no counts). */
static void script_speculative(struct fake *f) {
  fake_hello(f);
  for (int i = 0; i < 2; i++) {
    struct ipc_msg *m = fake_expect(f, "generate");
    if (!m) return;
    const char *mode = NULL;
    size_t len = 0;
    ipc_get_str(m->params, "speculative", &mode, &len, NULL);
    if (i == 0 && (!mode || len != 5 || memcmp(mode, "draft", 5)))
      fake_fail(f, "speculative \"draft\" not sent");
    if (i == 1 && ipc_map_find(m->params, "speculative"))
      fake_fail(f, "speculative sent while unset");
    ipc_w_result(&f->w, m->id);
    ipc_w_map(&f->w, 6);
    ipc_w_kv_cstr(&f->w, "text", "Hello");
    ipc_w_kv_cstr(&f->w, "finish_reason", "length");
    ipc_w_kv_u64(&f->w, "prompt_tokens", 3);
    ipc_w_kv_u64(&f->w, "completion_tokens", 20);
    ipc_w_kv_u64(&f->w, "cached_tokens", 0);
    ipc_w_key(&f->w, "timings");
    ipc_w_map(&f->w, i == 0 ? 3 : 1);
    ipc_w_kv_f64(&f->w, "tokens_per_s", 80);
    if (i == 0) {
      ipc_w_kv_u64(&f->w, "draft_tokens", 24);
      ipc_w_kv_u64(&f->w, "accepted_tokens", 17);
    }
    fake_send(f);
    ipc_msg_free(m);
  }
}

KT_TEST(generate_speculative) {
  struct fake f;
  struct kvd_client *c;
  CONNECT(f, script_speculative, NULL, c);
  struct kvd_gen_params p;
  kvd_gen_params_init(&p);
  KT_CHECK(p.speculative == NULL);
  p.prompt = "Once";
  p.speculative = "draft";
  struct kvd_gen_result *r = NULL;
  int rc = kvd_generate(c, &p, NULL, NULL, &r);
  KT_CHECK_MSG(rc == 0, "generate: %s", kvd_client_last_error(c));
  if (r) {
    KT_CHECK_EQ(r->draft_tokens, 24);
    KT_CHECK_EQ(r->accepted_tokens, 17);
    KT_CHECK(r->timings.tokens_per_s == 80);
  }
  kvd_gen_result_free(r);
  r = NULL;
  p.speculative = NULL;
  rc = kvd_generate(c, &p, NULL, NULL, &r);
  KT_CHECK_MSG(rc == 0, "generate: %s", kvd_client_last_error(c));
  if (r) KT_CHECK(r->draft_tokens == 0 && r->accepted_tokens == 0);
  kvd_gen_result_free(r);
  kvd_client_close(c);
  FAKE_OK(f);
}

/* Not streamed: the text and logprobs come in the result. Messages instead of a prompt. */
static void script_chat_logprobs(struct fake *f) {
  fake_hello(f);
  struct ipc_msg *m = fake_expect(f, "generate");
  if (!m) return;
  const msgpack_object *msgs = NULL;
  size_t n = 0;
  uint64_t lp = 0;
  ipc_get_maps(m->params, "messages", &msgs, &n, NULL);
  ipc_get_u64(m->params, "logprobs", &lp, NULL);
  const char *role = NULL, *content = NULL;
  if (n == 2) {
    ipc_get_str(&msgs[1], "role", &role, NULL, NULL);
    ipc_get_str(&msgs[1], "content", &content, NULL, NULL);
  }
  if (n != 2 || !role || strcmp(role, "user") || !content || strcmp(content, "Hi!") || lp != 2)
    fake_fail(f, "chat params");
  if (ipc_map_find(m->params, "stream") || ipc_map_find(m->params, "prompt"))
    fake_fail(f, "stream or prompt sent");
  ipc_w_result(&f->w, m->id);
  ipc_w_map(&f->w, 7);
  ipc_w_kv_cstr(&f->w, "text", "Hello");
  ipc_w_kv_cstr(&f->w, "finish_reason", "stop");
  ipc_w_kv_u64(&f->w, "prompt_tokens", 12);
  ipc_w_kv_u64(&f->w, "completion_tokens", 1);
  ipc_w_kv_u64(&f->w, "cached_tokens", 0);
  ipc_w_key(&f->w, "timings");
  ipc_w_map(&f->w, 0);
  ipc_w_key(&f->w, "logprobs");
  ipc_w_array(&f->w, 1);
  ipc_w_map(&f->w, 5);
  ipc_w_kv_u64(&f->w, "id", 15043);
  ipc_w_kv_cstr(&f->w, "text", "Hello");
  ipc_w_kv_f64(&f->w, "logprob", -0.25);
  ipc_w_key(&f->w, "top");
  ipc_w_array(&f->w, 2);
  ipc_w_map(&f->w, 2);
  ipc_w_kv_u64(&f->w, "id", 15043);
  ipc_w_kv_f64(&f->w, "logprob", -0.25);
  ipc_w_map(&f->w, 2);
  ipc_w_kv_u64(&f->w, "id", 6324);
  ipc_w_kv_f64(&f->w, "logprob", -1.5);
  ipc_w_kv_cstr(&f->w, "future_key", "ignored"); /* keys from a newer server are ignored */
  fake_send(f);
  ipc_msg_free(m);
}

KT_TEST(chat_result_with_logprobs) {
  struct fake f;
  struct kvd_client *c;
  CONNECT(f, script_chat_logprobs, NULL, c);
  struct kvd_message msgs[] = {{"system", "Be brief."}, {"user", "Hi!"}};
  struct kvd_gen_params p;
  kvd_gen_params_init(&p);
  p.logprobs = 2;
  struct kvd_gen_result *r = NULL;
  int rc = kvd_chat(c, msgs, 2, &p, NULL, NULL, &r);
  KT_CHECK_MSG(rc == 0, "chat: %s", kvd_client_last_error(c));
  if (r) {
    KT_CHECK(!strcmp(r->text, "Hello"));
    KT_CHECK_EQ(r->finish, KVD_FINISH_STOP);
    KT_CHECK_EQ(r->n_tokens, 0);
    KT_CHECK_EQ(r->n_logprobs, 1);
    if (r->n_logprobs == 1) {
      KT_CHECK_EQ(r->logprobs[0].id, 15043);
      KT_CHECK(!strcmp(r->logprobs[0].text, "Hello"));
      KT_CHECK(r->logprobs[0].logprob == -0.25);
      KT_CHECK_EQ(r->logprobs[0].n_top, 2);
      if (r->logprobs[0].n_top == 2)
        KT_CHECK(r->logprobs[0].top[1].id == 6324 && r->logprobs[0].top[1].logprob == -1.5);
    }
  }
  kvd_gen_result_free(r);
  kvd_client_close(c);
  FAKE_OK(f);
}

KT_TEST(generate_checks_params_locally) {
  struct fake f;
  struct kvd_client *c;
  CONNECT(f, script_hello_only, NULL, c);
  struct kvd_gen_params p;
  kvd_gen_params_init(&p);
  struct kvd_gen_result *r = (struct kvd_gen_result *)0x1;
  KT_CHECK_EQ(kvd_generate(c, &p, NULL, NULL, &r), KVD_EINVAL); /* neither prompt nor messages */
  KT_CHECK(strstr(kvd_client_last_error(c), "prompt") != NULL);
  KT_CHECK(r == (struct kvd_gen_result *)0x1);
  /* A prompt over the protocol's frame limit is refused before anything is sent. */
  char *big = malloc(IPC_MAX_FRAME_BYTES + 16);
  KT_ASSERT(big);
  memset(big, 'a', IPC_MAX_FRAME_BYTES + 15);
  big[IPC_MAX_FRAME_BYTES + 15] = '\0';
  p.prompt = big;
  KT_CHECK_EQ(kvd_generate(c, &p, NULL, NULL, &r), KVD_E2BIG);
  free(big);
  KT_CHECK(kvd_client_connected(c));
  KT_CHECK_EQ(kvd_client_pending(c), 0);
  kvd_client_close(c);
  FAKE_OK(f);
  KT_CHECK_EQ(f.n_methods, 1); /* only hello went out */
}

/* ---- Errors -------------------------------------------------------------------------------- */

static void script_errors(struct fake *f) {
  fake_hello(f);
  struct ipc_msg *m = fake_expect(f, "models.unload");
  if (m) fake_error(f, m->id, KVD_E_NO_MODEL, "no such model loaded: nope");
  ipc_msg_free(m);
  m = fake_expect(f, "generate");
  if (m) fake_error(f, m->id, KVD_E_CONTEXT, "prompt of 9000 tokens exceeds the context (256)");
  ipc_msg_free(m);
  /* A generate that fails after some tokens still gets a result. */
  m = fake_expect(f, "generate");
  if (!m) return;
  fake_chunk(f, m->id, "partial", 1);
  ipc_w_result(&f->w, m->id);
  ipc_w_map_open(&f->w);
  ipc_w_kv_cstr(&f->w, "text", "");
  ipc_w_kv_cstr(&f->w, "finish_reason", "error");
  ipc_w_kv_u64(&f->w, "prompt_tokens", 3);
  ipc_w_kv_u64(&f->w, "completion_tokens", 1);
  ipc_w_kv_u64(&f->w, "cached_tokens", 0);
  ipc_w_key(&f->w, "timings");
  ipc_w_map(&f->w, 0);
  ipc_w_kv_error(&f->w, "error", KVD_E_KV_EXHAUSTED, "KV cache exhausted after 1 token");
  ipc_w_close(&f->w);
  fake_send(f);
  ipc_msg_free(m);
  /* An error code this client does not know (999, or a newer server's). */
  m = fake_expect(f, "session.open");
  if (!m) return;
  /* A code without a wire number of its own goes out as 999. */
  ipc_w_error(&f->w, m->id, -4242, "from the future");
  fake_send(f);
  ipc_msg_free(m);
}

KT_TEST(server_errors_carry_the_message) {
  struct fake f;
  struct kvd_client *c;
  CONNECT(f, script_errors, NULL, c);
  KT_CHECK_EQ(kvd_models_unload(c, "nope"), KVD_E_NO_MODEL);
  KT_CHECK(!strcmp(kvd_client_last_error(c), "no such model loaded: nope"));

  struct kvd_gen_params p;
  kvd_gen_params_init(&p);
  p.prompt = "long";
  struct kvd_gen_result *r = NULL;
  KT_CHECK_EQ(kvd_generate(c, &p, NULL, NULL, &r), KVD_E_CONTEXT);
  KT_CHECK(r == NULL);
  KT_CHECK(strstr(kvd_client_last_error(c), "exceeds the context") != NULL);

  struct collect col = {0};
  KT_CHECK_EQ(kvd_generate(c, &p, on_chunk, &col, &r), 0);
  if (r) {
    KT_CHECK_EQ(r->finish, KVD_FINISH_ERROR);
    KT_CHECK_EQ(r->error, KVD_E_KV_EXHAUSTED);
    KT_CHECK(r->error_message && strstr(r->error_message, "exhausted"));
    KT_CHECK(!strcmp(r->text, "partial"));
  }
  kvd_gen_result_free(r);

  uint64_t s = 99;
  KT_CHECK_EQ(kvd_session_open(c, NULL, &s), KVD_EPROTO); /* unknown wire codes read as EPROTO */
  KT_CHECK_EQ(s, 99);
  KT_CHECK(!strcmp(kvd_client_last_error(c), "from the future"));
  KT_CHECK(kvd_client_connected(c)); /* errors are per request; the connection goes on */
  kvd_client_close(c);
  FAKE_OK(f);
}

/* ---- Event-loop API ------------------------------------------------------------------------ */

/* Two generations whose chunks interleave and whose responses come in the other order. */
static void script_two_async(struct fake *f) {
  fake_hello(f);
  struct ipc_msg *a = fake_expect(f, "generate");
  struct ipc_msg *b = fake_expect(f, "generate");
  if (!a || !b) {
    ipc_msg_free(a);
    ipc_msg_free(b);
    return;
  }
  fake_chunk(f, a->id, "A1", 1);
  fake_chunk(f, b->id, "B1", 2);
  fake_chunk(f, a->id, "A2", 3);
  fake_chunk(f, b->id, "B2", 4);
  fake_gen_result(f, b->id, "", "stop", 2);
  fake_chunk(f, a->id, "A3", 5);
  fake_gen_result(f, a->id, "", "length", 3);
  ipc_msg_free(a);
  ipc_msg_free(b);
}

static void on_done(void *ud, int rc, const struct kvd_gen_result *r) {
  struct collect *col = ud;
  col->done = true;
  col->done_rc = rc;
  col->done_finish = r->finish;
  snprintf(col->done_text, sizeof col->done_text, "%s", r->text ? r->text : "(null)");
}

/* Drives c with poll() until every collect is done (or 5 s pass). */
static bool loop_until_done(struct kvd_client *c, struct collect **cols, size_t n) {
  for (int iter = 0; iter < 500; iter++) {
    bool all = true;
    for (size_t i = 0; i < n; i++)
      all &= cols[i]->done;
    if (all) return true;
    struct pollfd pfd = {.fd = kvd_client_fd(c),
                         .events = POLLIN | (kvd_client_want_write(c) ? POLLOUT : 0)};
    if (poll(&pfd, 1, 10) < 0) return false;
    if (pfd.revents & POLLOUT) kvd_client_flush(c);
    if (pfd.revents & (POLLIN | POLLHUP | POLLERR)) kvd_client_process(c);
  }
  return false;
}

KT_TEST(event_loop_drives_two_generations) {
  struct fake f;
  struct kvd_client *c;
  CONNECT(f, script_two_async, NULL, c);
  struct kvd_gen_params p;
  kvd_gen_params_init(&p);
  p.prompt = "x";
  struct collect a = {0}, b = {0};
  uint32_t ida = 0, idb = 0;
  KT_ASSERT_OK(kvd_generate_async(c, &p, on_chunk, on_done, &a, &ida));
  KT_ASSERT_OK(kvd_generate_async(c, &p, on_chunk, on_done, &b, &idb));
  KT_CHECK(ida != idb && ida != 0 && idb != 0);
  KT_CHECK_EQ(kvd_client_pending(c), 2);
  struct collect *cols[] = {&a, &b};
  KT_CHECK(loop_until_done(c, cols, 2));
  KT_CHECK(!strcmp(a.text, "A1A2A3") && !strcmp(a.done_text, "A1A2A3"));
  KT_CHECK(!strcmp(b.text, "B1B2") && !strcmp(b.done_text, "B1B2"));
  KT_CHECK(a.done_rc == 0 && a.done_finish == KVD_FINISH_LENGTH);
  KT_CHECK(b.done_rc == 0 && b.done_finish == KVD_FINISH_STOP);
  KT_CHECK_EQ(kvd_client_pending(c), 0);
  KT_CHECK(!kvd_client_want_write(c));
  kvd_client_close(c);
  FAKE_OK(f);
}

/* ---- Cancel -------------------------------------------------------------------------------- */

/* Streams until the client cancels; a chunk already on its way arrives after the cancel. */
static void script_cancel(struct fake *f) {
  fake_hello(f);
  struct ipc_msg *g = fake_expect(f, "generate");
  if (!g) return;
  fake_chunk(f, g->id, "one", 1);
  struct ipc_msg *m = fake_expect(f, "cancel");
  if (m) {
    uint32_t id = 0;
    ipc_get_u32(m->params, "id", &id, NULL);
    if (id != g->id) fake_fail(f, "cancel names %u, the generate was %u", id, g->id);
    fake_chunk(f, g->id, " two", 2); /* raced with the cancel */
    ipc_w_result(&f->w, m->id);
    ipc_w_map(&f->w, 1);
    ipc_w_kv_bool(&f->w, "cancelled", true);
    fake_send(f);
    fake_gen_result(f, g->id, "", "cancelled", 2);
  }
  ipc_msg_free(m);
  ipc_msg_free(g);
}

KT_TEST(cancel_from_chunk_callback) {
  struct fake f;
  struct kvd_client *c;
  CONNECT(f, script_cancel, NULL, c);
  struct kvd_gen_params p;
  kvd_gen_params_init(&p);
  p.prompt = "x";
  struct collect col = {.cancel_at = 1};
  struct kvd_gen_result *r = NULL;
  int rc = kvd_generate(c, &p, on_chunk, &col, &r);
  KT_CHECK_MSG(rc == 0, "generate: %s", kvd_client_last_error(c));
  KT_CHECK_EQ(col.calls, 1); /* nothing reported after the callback asked to stop */
  if (r) {
    KT_CHECK_EQ(r->finish, KVD_FINISH_CANCELLED);
    KT_CHECK(!strcmp(r->text, "one two")); /* the result still has all the text */
  }
  kvd_gen_result_free(r);
  KT_CHECK_EQ(kvd_client_pending(c), 0); /* the cancel's own answer was consumed too */
  kvd_client_close(c);
  FAKE_OK(f);
  KT_CHECK(fake_saw(&f, "cancel"));
}

KT_TEST(cancel_async_by_id) {
  struct fake f;
  struct kvd_client *c;
  CONNECT(f, script_cancel, NULL, c);
  struct kvd_gen_params p;
  kvd_gen_params_init(&p);
  p.prompt = "x";
  struct collect col = {0};
  uint32_t id;
  KT_ASSERT_OK(kvd_generate_async(c, &p, on_chunk, on_done, &col, &id));
  KT_CHECK_EQ(kvd_cancel(c, id + 1000), KVD_ENOENT);
  /* Wait for the first chunk, then cancel from outside any callback. */
  for (int i = 0; i < 500 && col.calls == 0; i++) {
    struct pollfd pfd = {.fd = kvd_client_fd(c), .events = POLLIN};
    poll(&pfd, 1, 10);
    kvd_client_process(c);
  }
  KT_CHECK_EQ(col.calls, 1);
  KT_CHECK_EQ(kvd_cancel(c, id), 0);
  struct collect *cols[] = {&col};
  KT_CHECK(loop_until_done(c, cols, 1));
  KT_CHECK_EQ(col.calls, 1);
  KT_CHECK_EQ(col.done_finish, KVD_FINISH_CANCELLED);
  KT_CHECK(!strcmp(col.done_text, "one two"));
  KT_CHECK_EQ(kvd_cancel(c, id), KVD_ENOENT); /* finished */
  kvd_client_close(c);
  FAKE_OK(f);
}

/* ---- Lost connections ---------------------------------------------------------------------- */

static void script_close_mid_stream(struct fake *f) {
  fake_hello(f);
  struct ipc_msg *g = fake_expect(f, "generate");
  if (!g) return;
  fake_chunk(f, g->id, "half", 1);
  if (f->ud) { /* and a frame cut short: a fixarray of 3 with only its first element */
    static const unsigned char cut[] = {0x93, 0x02};
    fake_send_raw(f, cut, sizeof cut);
  }
  fake_hang_up(f);
  ipc_msg_free(g);
}

KT_TEST(server_closes_mid_stream) {
  for (int cut = 0; cut < 2; cut++) {
    struct fake f;
    struct kvd_client *c;
    CONNECT(f, script_close_mid_stream, cut ? (void *)1 : NULL, c);
    struct kvd_gen_params p;
    kvd_gen_params_init(&p);
    p.prompt = "x";
    struct collect col = {0};
    struct kvd_gen_result *r = NULL;
    KT_CHECK_EQ(kvd_generate(c, &p, on_chunk, &col, &r), KVD_EIO);
    KT_CHECK(r == NULL);
    KT_CHECK(!strcmp(col.text, "half"));
    KT_CHECK(!kvd_client_connected(c));
    KT_CHECK_MSG(strstr(kvd_client_last_error(c), cut ? "middle of a message" : "closed"),
                 "message: %s", kvd_client_last_error(c));
    /* Every later call fails at once with the same code instead of hanging. */
    uint32_t *t;
    size_t n;
    KT_CHECK_EQ(kvd_tokenize(c, NULL, "x", 0, &t, &n), KVD_EIO);
    KT_CHECK(strstr(kvd_client_last_error(c), "lost") != NULL);
    KT_CHECK(kvd_client_process(c) < 0);
    kvd_client_close(c);
    FAKE_OK(f);
  }
}

KT_TEST(server_closes_async) {
  struct fake f;
  struct kvd_client *c;
  CONNECT(f, script_close_mid_stream, NULL, c);
  struct kvd_gen_params p;
  kvd_gen_params_init(&p);
  p.prompt = "x";
  struct collect col = {0};
  KT_ASSERT_OK(kvd_generate_async(c, &p, on_chunk, on_done, &col, NULL));
  struct collect *cols[] = {&col};
  KT_CHECK(loop_until_done(c, cols, 1));
  KT_CHECK_EQ(col.done_rc, KVD_EIO);
  KT_CHECK_EQ(col.done_finish, KVD_FINISH_ERROR);
  KT_CHECK(!strcmp(col.done_text, "half")); /* what arrived before is still reported */
  KT_CHECK_EQ(kvd_client_pending(c), 0);
  KT_CHECK_EQ(kvd_generate_async(c, &p, on_chunk, on_done, &col, NULL), KVD_EIO);
  kvd_client_close(c);
  FAKE_OK(f);
}

static void script_garbage(struct fake *f) {
  fake_hello(f);
  struct ipc_msg *m = fake_expect(f, "status");
  static const unsigned char junk[] = {0xc1, 0x00};
  fake_send_raw(f, junk, sizeof junk);
  ipc_msg_free(m);
}

KT_TEST(malformed_reply_loses_connection) {
  struct fake f;
  struct kvd_client *c;
  CONNECT(f, script_garbage, NULL, c);
  struct kvd_server_status *s = NULL;
  KT_CHECK_EQ(kvd_status(c, &s), KVD_EPROTO);
  KT_CHECK(s == NULL);
  KT_CHECK(!kvd_client_connected(c));
  kvd_client_close(c);
  FAKE_OK(f);
}

/* ---- Timeouts and callbacks ---------------------------------------------------------------- */

static void script_slow(struct fake *f) {
  fake_hello(f);
  struct ipc_msg *m = fake_expect(f, "tokenize");
  if (!m) return;
  usleep(400 * 1000); /* past the client's timeout */
  ipc_w_result(&f->w, m->id);
  ipc_w_map(&f->w, 1);
  ipc_w_key(&f->w, "tokens");
  ipc_w_array(&f->w, 1);
  ipc_w_u64(&f->w, 1);
  fake_send(f);
  ipc_msg_free(m);
  m = fake_expect(f, "detokenize");
  if (!m) return;
  ipc_w_result(&f->w, m->id);
  ipc_w_map(&f->w, 1);
  ipc_w_kv_cstr(&f->w, "text", "late but fine");
  fake_send(f);
  ipc_msg_free(m);
}

KT_TEST(timeout_then_late_answer_is_ignored) {
  struct fake f;
  struct kvd_client *c;
  CONNECT(f, script_slow, NULL, c);
  kvd_client_set_timeout(c, 100);
  uint32_t *t = NULL;
  size_t n = 0;
  KT_CHECK_EQ(kvd_tokenize(c, NULL, "x", 0, &t, &n), KVD_EAGAIN);
  KT_CHECK(strstr(kvd_client_last_error(c), "no answer") != NULL);
  kvd_client_set_timeout(c, 0);
  /* The tokenize answer arrives first and must not be taken for this one. */
  char *text = NULL;
  uint32_t ids[] = {1, 2};
  KT_CHECK_EQ(kvd_detokenize(c, NULL, ids, 2, &text), 0);
  KT_CHECK(text && !strcmp(text, "late but fine"));
  free(text);
  kvd_client_close(c);
  FAKE_OK(f);
}

static int nested_chunk(void *ud, const struct kvd_chunk *ch) {
  struct collect *col = ud;
  uint32_t *t;
  size_t n;
  col->nested_rc = kvd_tokenize(col->c, NULL, "x", 0, &t, &n);
  return on_chunk(ud, ch);
}

KT_TEST(blocking_call_from_callback_is_refused) {
  struct fake f;
  struct kvd_client *c;
  CONNECT(f, script_generate, NULL, c);
  struct kvd_gen_params p;
  gen_params(&p);
  struct collect col = {.c = c};
  struct kvd_gen_result *r = NULL;
  KT_CHECK_EQ(kvd_generate(c, &p, nested_chunk, &col, &r), 0);
  KT_CHECK_EQ(col.nested_rc, KVD_EBUSY);
  KT_CHECK_EQ(col.calls, 4);
  kvd_gen_result_free(r);
  kvd_client_close(c);
  FAKE_OK(f);
}

/* ---- The other methods --------------------------------------------------------------------- */

static void model_map(struct ipc_w *w, const char *name, bool is_default) {
  ipc_w_map(w, 8);
  ipc_w_kv_cstr(w, "name", name);
  ipc_w_kv_cstr(w, "path", "/models/x.gguf");
  ipc_w_kv_cstr(w, "arch", "llama");
  ipc_w_kv_u64(w, "n_ctx", 256);
  ipc_w_kv_u64(w, "n_vocab", 32000);
  ipc_w_kv_u64(w, "n_params", 15000000);
  ipc_w_kv_u64(w, "bytes", 60000000);
  ipc_w_kv_bool(w, "default", is_default);
}

static void script_methods(struct fake *f) {
  fake_hello(f);
  struct ipc_msg *m;
  struct ipc_w *w = &f->w;
  /* tokenize */
  if (!(m = fake_expect(f, "tokenize"))) return;
  bool add = true, parse = false;
  const char *text = NULL;
  ipc_get_bool(m->params, "add_special", &add, NULL);
  ipc_get_bool(m->params, "parse_special", &parse, NULL);
  ipc_get_str(m->params, "text", &text, NULL, NULL);
  if (add || !parse || !text || strcmp(text, "Hello")) fake_fail(f, "tokenize params");
  ipc_w_result(w, m->id);
  ipc_w_map(w, 1);
  ipc_w_key(w, "tokens");
  ipc_w_array(w, 2);
  ipc_w_u64(w, 1);
  ipc_w_u64(w, 15043);
  fake_send(f);
  ipc_msg_free(m);
  /* models.list */
  if (!(m = fake_expect(f, "models.list"))) return;
  ipc_w_result(w, m->id);
  ipc_w_map(w, 1);
  ipc_w_key(w, "models");
  ipc_w_array(w, 2);
  model_map(w, "tiny", true);
  model_map(w, "other", false);
  fake_send(f);
  ipc_msg_free(m);
  /* models.load */
  if (!(m = fake_expect(f, "models.load"))) return;
  const char *name = NULL, *kv_type = NULL;
  ipc_get_str(m->params, "name", &name, NULL, NULL);
  ipc_get_str(m->params, "kv_type", &kv_type, NULL, NULL); /* echoed: the client sent it */
  ipc_w_result(w, m->id);
  ipc_w_map(w, 7);
  ipc_w_kv_cstr(w, "name", name ? name : "?");
  ipc_w_kv_cstr(w, "arch", "llama");
  ipc_w_kv_u64(w, "n_ctx", 512);
  ipc_w_kv_u64(w, "n_vocab", 512);
  ipc_w_kv_cstr(w, "chat_template", "llama2");
  ipc_w_kv_cstr(w, "kv_type", kv_type ? kv_type : "f16");
  ipc_w_kv_u64(w, "kv_bytes_per_token", 480);
  fake_send(f);
  ipc_msg_free(m);
  /* sessions */
  if (!(m = fake_expect(f, "session.open"))) return;
  ipc_w_result(w, m->id);
  ipc_w_map(w, 1);
  ipc_w_kv_u64(w, "session", 7);
  fake_send(f);
  ipc_msg_free(m);
  if (!(m = fake_expect(f, "session.fork"))) return;
  uint64_t s = 0;
  ipc_get_u64(m->params, "session", &s, NULL);
  if (s != 7) fake_fail(f, "fork of %llu", (unsigned long long)s);
  ipc_w_result(w, m->id);
  ipc_w_map(w, 1);
  ipc_w_kv_u64(w, "session", 8);
  fake_send(f);
  ipc_msg_free(m);
  if (!(m = fake_expect(f, "session.close"))) return;
  ipc_w_result(w, m->id);
  ipc_w_map(w, 1);
  ipc_w_kv_u64(w, "session", 8);
  fake_send(f);
  ipc_msg_free(m);
  /* status */
  if (!(m = fake_expect(f, "status"))) return;
  ipc_w_result(w, m->id);
  ipc_w_map(w, 11);
  ipc_w_kv_cstr(w, "version", "9.8.7");
  ipc_w_kv_u64(w, "uptime_ms", 3723000);
  ipc_w_kv_u64(w, "connections", 2);
  ipc_w_key(w, "devices");
  ipc_w_array(w, 1);
  ipc_w_map(w, 5);
  ipc_w_kv_u64(w, "index", 0);
  ipc_w_kv_cstr(w, "name", "llvmpipe");
  ipc_w_kv_cstr(w, "type", "cpu");
  ipc_w_kv_u64(w, "memory_total", 1 << 30);
  ipc_w_kv_u64(w, "memory_used", 1 << 20);
  ipc_w_key(w, "memory");
  ipc_w_map(w, 4);
  ipc_w_kv_u64(w, "host", 10);
  ipc_w_kv_u64(w, "device", 20);
  ipc_w_kv_u64(w, "weights", 15);
  ipc_w_kv_u64(w, "kv", 5);
  ipc_w_key(w, "kv");
  ipc_w_map(w, 5);
  ipc_w_kv_u64(w, "block_tokens", 16);
  ipc_w_kv_u64(w, "blocks_total", 100);
  ipc_w_kv_u64(w, "blocks_used", 30);
  ipc_w_kv_u64(w, "blocks_free", 60);
  ipc_w_kv_u64(w, "blocks_cached", 10);
  ipc_w_kv_u64(w, "queue_depth", 1);
  ipc_w_kv_u64(w, "running", 2);
  ipc_w_key(w, "models");
  ipc_w_array(w, 1);
  model_map(w, "tiny", true);
  ipc_w_key(w, "requests");
  ipc_w_array(w, 1);
  ipc_w_map(w, 4);
  ipc_w_kv_u64(w, "id", 5);
  ipc_w_kv_cstr(w, "model", "tiny");
  ipc_w_kv_cstr(w, "state", "decode");
  ipc_w_kv_f64(w, "tokens_per_s", 123.5);
  ipc_w_kv_cstr(w, "extra \"key\"", "tab\there"); /* a newer server's key, kept in the JSON */
  fake_send(f);
  ipc_msg_free(m);
}

KT_TEST(methods_parse_their_results) {
  struct fake f;
  struct kvd_client *c;
  CONNECT(f, script_methods, NULL, c);

  uint32_t *t = NULL;
  size_t n = 0;
  KT_CHECK_EQ(kvd_tokenize(c, NULL, "Hello", KVD_TOKENIZE_PARSE_SPECIAL, &t, &n), 0);
  KT_CHECK(n == 2 && t && t[0] == 1 && t[1] == 15043);
  free(t);

  struct kvd_model_list *l = NULL;
  KT_CHECK_EQ(kvd_models_list(c, &l), 0);
  if (l) {
    KT_CHECK_EQ(l->n, 2);
    KT_CHECK(l->n == 2 && !strcmp(l->models[0].name, "tiny") && l->models[0].is_default);
    KT_CHECK(l->n == 2 && !strcmp(l->models[1].arch, "llama") && !l->models[1].is_default);
    KT_CHECK(l->n == 2 && l->models[1].n_params == 15000000 && l->models[1].n_ctx == 256);
  }
  kvd_model_list_free(l);

  struct kvd_model_info *mi = NULL;
  KT_CHECK_EQ(kvd_models_load_opts(c, "/models/new.gguf",
                                   &(struct kvd_load_opts){.name = "new", .kv_type = "q8_0"}, &mi),
              0);
  KT_CHECK(mi && !strcmp(mi->name, "new") && !strcmp(mi->path, "/models/new.gguf"));
  KT_CHECK(mi && mi->n_ctx == 512);
  KT_CHECK(mi && mi->kv_type && !strcmp(mi->kv_type, "q8_0") && mi->kv_bytes_per_token == 480);
  kvd_model_info_free(mi);

  uint64_t s = 0, s2 = 0;
  KT_CHECK_EQ(kvd_session_open(c, "tiny", &s), 0);
  KT_CHECK_EQ(s, 7);
  KT_CHECK_EQ(kvd_session_fork(c, s, &s2), 0);
  KT_CHECK_EQ(s2, 8);
  KT_CHECK_EQ(kvd_session_close(c, s2), 0);

  struct kvd_server_status *st = NULL;
  KT_CHECK_EQ(kvd_status(c, &st), 0);
  if (st) {
    KT_CHECK(!strcmp(st->version, "9.8.7"));
    KT_CHECK(st->uptime_ms == 3723000 && st->connections == 2);
    KT_CHECK(st->queue_depth == 1 && st->running == 2);
    KT_CHECK(st->memory.weights == 15 && st->kv.blocks_cached == 10 && st->kv.block_tokens == 16);
    KT_CHECK(st->n_devices == 1 && !strcmp(st->devices[0].type, "cpu"));
    KT_CHECK(st->n_models == 1 && !strcmp(st->models[0].name, "tiny"));
    KT_CHECK(st->n_requests == 1 && st->requests[0].id == 5 &&
             st->requests[0].tokens_per_s == 123.5 && !strcmp(st->requests[0].state, "decode"));
    KT_CHECK(st->json && st->json[0] == '{');
    KT_CHECK_MSG(strstr(st->json, "\"extra \\\"key\\\"\":\"tab\\there\""), "json: %s", st->json);
    KT_CHECK(strstr(st->json, "\"tokens_per_s\":123.5") != NULL);
    KT_CHECK(strstr(st->json, "\"default\":true") != NULL);
  }
  kvd_server_status_free(st);
  kvd_client_close(c);
  FAKE_OK(f);
}

KT_TEST(strerror_and_wire_codes) {
  KT_CHECK(!strcmp(kvd_strerror(KVD_ECONNREFUSED), "connection refused (is kvd running?)"));
  KT_CHECK_EQ(kvd_error_to_wire(KVD_E_NO_MODEL), 112);
  KT_CHECK_EQ(kvd_error_from_wire(112), KVD_E_NO_MODEL);
  KT_CHECK(kvd_library_version()[0] != '\0');
  /* NULL is harmless everywhere it can be. */
  kvd_client_close(NULL);
  kvd_gen_result_free(NULL);
  kvd_model_list_free(NULL);
  kvd_model_info_free(NULL);
  kvd_server_status_free(NULL);
  KT_CHECK(!kvd_client_connected(NULL));
  KT_CHECK_EQ(kvd_client_process(NULL), KVD_EINVAL);
  struct kvd_gen_params p;
  kvd_gen_params_init(&p);
  KT_CHECK(isnan(p.temperature) && p.max_tokens < 0 && p.seed < 0 && p.session < 0);
}
