/* ipc: the msgpack-rpc codec. Round trips of every message kind, the same stream decoded whole,
 * in random chunks and byte by byte, every documented decode error, the param accessors and the
 * generic validation from api.json, the writer's own checks, and every kvd error code through the
 * wire. */
#include "ipc.h"
#include "kt.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- helpers ------------------------------------------------------------------------------ */

/* Re-encodes a decoded message as it arrived (canonical msgpack), for comparing decodes. */
static void reencode(const struct ipc_msg *m, struct ipc_w *w) {
  switch (m->type) {
  case IPC_REQUEST:
  case IPC_NOTIFICATION:
    ipc_w_array(w, m->type == IPC_REQUEST ? 4 : 3);
    ipc_w_u64(w, m->type);
    if (m->type == IPC_REQUEST) ipc_w_u64(w, m->id);
    ipc_w_str(w, m->method, m->method_len);
    ipc_w_array(w, m->params ? 1 : 0);
    if (m->params) ipc_w_obj(w, m->params);
    break;
  case IPC_RESPONSE:
    ipc_w_array(w, 4);
    ipc_w_u64(w, 1);
    ipc_w_u64(w, m->id);
    if (m->error)
      ipc_w_obj(w, m->error);
    else
      ipc_w_nil(w);
    ipc_w_obj(w, m->result);
    break;
  }
}

enum feed_mode { WHOLE, CHUNKS, BYTES };

/* Decodes data fed in the given way; every message is re-encoded into out and every error is
 * recorded there as ["error", code, fatal, has_id, id], so two decodes can be compared byte for
 * byte. Returns the number of messages and errors, stopping at a fatal error. */
static int decode_all(const void *data, size_t len, enum feed_mode mode, size_t max_frame,
                      struct ipc_w *out) {
  struct ipc_dec d;
  const uint8_t *p = data;
  size_t off = 0;
  int count = 0;
  bool fatal = false;
  ipc_dec_init(&d, max_frame);
  while (!fatal) {
    struct ipc_msg *m = NULL;
    struct ipc_dec_err err;
    int rc = ipc_dec_next(&d, &m, &err);
    if (rc == 0) {
      if (off == len) break;
      size_t n = mode == WHOLE ? len : mode == BYTES ? 1 : kt_rand_range(1, 64);
      if (n > len - off) n = len - off;
      if (ipc_dec_feed(&d, p + off, n) < 0) abort();
      off += n;
      continue;
    }
    count++;
    if (rc == 1) {
      reencode(m, out);
      ipc_msg_free(m);
    } else {
      ipc_w_array(out, 5);
      ipc_w_cstr(out, "error");
      ipc_w_i64(out, rc);
      ipc_w_bool(out, err.fatal);
      ipc_w_bool(out, err.has_id);
      ipc_w_u64(out, err.id);
      fatal = err.fatal;
    }
    if (ipc_w_end(out) < 0) abort();
  }
  ipc_dec_destroy(&d);
  return count;
}

/* Decodes one message from bytes fed at once; NULL (with err) if it fails. */
static struct ipc_msg *decode_one(const void *data, size_t len, struct ipc_dec_err *err,
                                  int *ret_rc) {
  struct ipc_dec d;
  struct ipc_msg *m = NULL;
  ipc_dec_init(&d, IPC_MAX_FRAME_BYTES);
  ipc_dec_feed(&d, data, len);
  *ret_rc = ipc_dec_next(&d, &m, err);
  ipc_dec_destroy(&d);
  return *ret_rc == 1 ? m : NULL;
}

/* A request with nested params: every type the protocol uses. */
static void write_generate(struct ipc_w *w, uint32_t id) {
  ipc_w_request(w, id, "generate");
  ipc_w_map_open(w);
  ipc_w_key(w, "messages");
  ipc_w_array(w, 2);
  ipc_w_map(w, 2);
  ipc_w_kv_cstr(w, "role", "system");
  ipc_w_kv_cstr(w, "content", "You are terse.");
  ipc_w_map_open(w);
  ipc_w_kv_cstr(w, "role", "user");
  ipc_w_kv_str(w, "content", "h\0i", 3);
  ipc_w_close(w);
  ipc_w_kv_u64(w, "max_tokens", 64);
  ipc_w_kv_f64(w, "temperature", 0.25);
  ipc_w_kv_u64(w, "top_k", 0);
  ipc_w_kv_i64(w, "offset", -5);
  ipc_w_kv_bool(w, "stream", true);
  ipc_w_kv_nil(w, "model");
  ipc_w_key(w, "stop");
  ipc_w_array_open(w);
  ipc_w_cstr(w, "\n\n");
  ipc_w_cstr(w, "User:");
  ipc_w_close(w);
  ipc_w_key(w, "extra");
  ipc_w_map(w, 1);
  ipc_w_key(w, "deeper");
  ipc_w_array(w, 1);
  ipc_w_map(w, 1);
  ipc_w_kv_u64(w, "big", UINT64_MAX);
  ipc_w_close(w);
}

/* ---- round trips --------------------------------------------------------------------------- */

KT_TEST(request_with_nested_params_round_trips) {
  struct ipc_w w;
  ipc_w_init(&w, IPC_MAX_FRAME_BYTES);
  write_generate(&w, 42);
  KT_ASSERT_OK(ipc_w_end(&w));
  struct ipc_dec_err err;
  int rc;
  struct ipc_msg *m = decode_one(ipc_w_data(&w), ipc_w_len(&w), &err, &rc);
  KT_ASSERT_MSG(m, "decode failed: %d %s", rc, err.message);
  KT_CHECK_EQ(m->type, IPC_REQUEST);
  KT_CHECK_EQ(m->id, 42);
  KT_CHECK_EQ(m->method_id, IPC_M_GENERATE);
  KT_CHECK_EQ(m->frame_bytes, ipc_w_len(&w));
  KT_ASSERT_STREQ(m->method, "generate");
  KT_ASSERT(m->params != NULL);

  struct ipc_err e;
  const msgpack_object *items;
  size_t n;
  KT_ASSERT_EQ(ipc_get_maps(m->params, "messages", &items, &n, &e), 1);
  KT_ASSERT_EQ(n, 2);
  const char *s;
  size_t len;
  KT_ASSERT_EQ(ipc_get_str(&items[0], "role", &s, &len, &e), 1);
  KT_CHECK_EQ(len, 6);
  KT_ASSERT_STREQ(s, "system");
  KT_ASSERT_EQ(ipc_get_str(&items[1], "content", &s, &len, &e), 1);
  KT_CHECK_EQ(len, 3); /* the embedded NUL survives; strlen tells it apart */
  KT_CHECK(memcmp(s, "h\0i", 4) == 0);
  uint64_t u = 0;
  KT_ASSERT_EQ(ipc_get_u64(m->params, "max_tokens", &u, &e), 1);
  KT_CHECK_EQ(u, 64);
  double f = 0;
  KT_ASSERT_EQ(ipc_get_f64(m->params, "temperature", &f, &e), 1);
  KT_CHECK(f == 0.25);
  int64_t i = 0;
  KT_ASSERT_EQ(ipc_get_i64(m->params, "offset", &i, &e), 1);
  KT_CHECK_EQ(i, -5);
  bool b = false;
  KT_ASSERT_EQ(ipc_get_bool(m->params, "stream", &b, &e), 1);
  KT_CHECK(b);
  s = "default";
  KT_ASSERT_EQ(ipc_get_str(m->params, "model", &s, &len, &e), 0); /* nil is absent */
  KT_ASSERT_STREQ(s, "default");
  KT_ASSERT_EQ(ipc_get_strs(m->params, "stop", &items, &n, &e), 1);
  KT_ASSERT_EQ(n, 2);
  KT_ASSERT_STREQ(ipc_obj_str(&items[1], &len), "User:");
  const msgpack_object *extra, *big;
  KT_ASSERT_EQ(ipc_get_map(m->params, "extra", &extra, &e), 1);
  KT_ASSERT_EQ(ipc_get_array(extra, "deeper", &items, &n, &e), 1);
  KT_ASSERT_EQ(ipc_get_u64(&items[0], "big", &u, &e), 1);
  KT_CHECK(u == UINT64_MAX);
  big = ipc_map_find(&items[0], "big");
  KT_CHECK(big && big->type == MSGPACK_OBJECT_POSITIVE_INTEGER);
  KT_ASSERT_OK(ipc_validate_params(m, &e));

  /* Scratch memory from the message's arena goes away with it. */
  char *scratch = ipc_msg_alloc(m, 100);
  KT_ASSERT(scratch);
  memset(scratch, 1, 100);
  ipc_msg_free(m);
  ipc_w_destroy(&w);
}

KT_TEST(response_notification_and_error_round_trip) {
  struct ipc_w w;
  ipc_w_init(&w, IPC_MAX_REPLY_BYTES);
  ipc_w_result(&w, 7);
  ipc_w_map_open(&w);
  ipc_w_kv_cstr(&w, "text", "Once upon a time");
  ipc_w_kv_cstr(&w, "finish_reason", "length");
  ipc_w_kv_u64(&w, "prompt_tokens", 5);
  ipc_w_kv_u64(&w, "completion_tokens", 4);
  ipc_w_kv_u64(&w, "cached_tokens", 0);
  ipc_w_key(&w, "timings");
  ipc_w_map(&w, 2);
  ipc_w_kv_f64(&w, "prefill_ms", 1.5);
  ipc_w_kv_f64(&w, "tokens_per_s", 250.0);
  ipc_w_close(&w);
  KT_ASSERT_OK(ipc_w_end(&w));
  ipc_w_notification(&w, "generate.chunk");
  ipc_w_map(&w, 3);
  ipc_w_kv_u64(&w, "id", 7);
  ipc_w_kv_cstr(&w, "text", " time");
  ipc_w_key(&w, "tokens");
  ipc_w_array(&w, 2);
  ipc_w_u64(&w, 931);
  ipc_w_u64(&w, 70000);
  KT_ASSERT_OK(ipc_w_end(&w));
  ipc_w_error(&w, 8, KVD_E_NO_MODEL, "no such model loaded: nope");
  KT_ASSERT_OK(ipc_w_end(&w));
  ipc_w_error(&w, 9, KVD_EBUSY, NULL);
  KT_ASSERT_OK(ipc_w_end(&w));

  struct ipc_dec d;
  ipc_dec_init(&d, IPC_MAX_REPLY_BYTES);
  KT_ASSERT_OK(ipc_dec_feed(&d, ipc_w_data(&w), ipc_w_len(&w)));
  struct ipc_msg *m;
  struct ipc_dec_err err;
  struct ipc_err e;
  const char *msg;

  KT_ASSERT_EQ(ipc_dec_next(&d, &m, &err), 1);
  KT_CHECK_EQ(m->type, IPC_RESPONSE);
  KT_CHECK_EQ(m->id, 7);
  KT_CHECK(m->error == NULL && m->method == NULL);
  KT_CHECK_EQ(ipc_msg_error(m, &msg), 0);
  KT_ASSERT_MSG(ipc_validate_result(IPC_M_GENERATE, m->result, &e) == 0, "%s", e.message);
  const msgpack_object *timings;
  double f;
  KT_ASSERT_EQ(ipc_get_map(m->result, "timings", &timings, &e), 1);
  KT_ASSERT_EQ(ipc_get_f64(timings, "tokens_per_s", &f, &e), 1);
  KT_CHECK(f == 250.0);
  ipc_msg_free(m);

  KT_ASSERT_EQ(ipc_dec_next(&d, &m, &err), 1);
  KT_CHECK_EQ(m->type, IPC_NOTIFICATION);
  KT_CHECK_EQ(m->method_id, IPC_M_GENERATE_CHUNK);
  KT_ASSERT_OK(ipc_validate_params(m, &e));
  const msgpack_object *tokens;
  size_t n;
  KT_ASSERT_EQ(ipc_get_uints(m->params, "tokens", &tokens, &n, &e), 1);
  KT_ASSERT_EQ(n, 2);
  KT_CHECK_EQ(tokens[1].via.u64, 70000);
  ipc_msg_free(m);

  KT_ASSERT_EQ(ipc_dec_next(&d, &m, &err), 1);
  KT_CHECK_EQ(m->type, IPC_RESPONSE);
  KT_CHECK_EQ(m->id, 8);
  KT_CHECK(m->error != NULL && m->result->type == MSGPACK_OBJECT_NIL);
  KT_CHECK_EQ(ipc_msg_error(m, &msg), KVD_E_NO_MODEL);
  KT_ASSERT_STREQ(msg, "no such model loaded: nope");
  ipc_msg_free(m);

  KT_ASSERT_EQ(ipc_dec_next(&d, &m, &err), 1);
  KT_CHECK_EQ(ipc_msg_error(m, &msg), KVD_EBUSY);
  KT_ASSERT_STREQ(msg, kvd_strerror(KVD_EBUSY));
  ipc_msg_free(m);

  KT_ASSERT_EQ(ipc_dec_next(&d, &m, &err), 0);
  KT_CHECK_EQ(ipc_dec_buffered(&d), 0);
  ipc_dec_destroy(&d);
  ipc_w_destroy(&w);
}

KT_TEST(params_may_be_an_empty_array) {
  /* [0, 3, "status", []] */
  static const uint8_t bytes[] = {0x94, 0x00, 0x03, 0xa6, 's', 't', 'a', 't', 'u', 's', 0x90};
  struct ipc_dec_err err;
  int rc;
  struct ipc_msg *m = decode_one(bytes, sizeof bytes, &err, &rc);
  KT_ASSERT_MSG(m, "decode failed: %d %s", rc, err.message);
  KT_CHECK_EQ(m->method_id, IPC_M_STATUS);
  KT_CHECK(m->params == NULL);
  struct ipc_err e;
  uint64_t u = 9;
  KT_CHECK_EQ(ipc_get_u64(m->params, "anything", &u, &e), 0);
  KT_CHECK_EQ(u, 9);
  KT_CHECK_EQ(ipc_validate_params(m, &e), 0);
  ipc_msg_free(m);
}

KT_TEST(every_error_code_round_trips_through_an_error_response) {
  static const int codes[] = {
#define X(name, value, wire, msg) value,
      KVD_ERROR_TABLE(X)
#undef X
  };
  struct ipc_w w;
  ipc_w_init(&w, IPC_MAX_REPLY_BYTES);
  for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
    if (codes[i] == 0) continue; /* success is not an error */
    ipc_w_reset(&w);
    ipc_w_error(&w, (uint32_t)i, codes[i], NULL);
    KT_ASSERT_OK(ipc_w_end(&w));
    struct ipc_dec_err err;
    int rc;
    struct ipc_msg *m = decode_one(ipc_w_data(&w), ipc_w_len(&w), &err, &rc);
    KT_ASSERT(m);
    const msgpack_object *code = ipc_map_find(m->error, "code");
    KT_CHECK(code && (int)code->via.u64 == kvd_error_to_wire(codes[i]));
    const char *msg;
    KT_CHECK_EQ(ipc_msg_error(m, &msg), codes[i]);
    KT_ASSERT_STREQ(msg, kvd_strerror(codes[i]));
    ipc_msg_free(m);
  }
  /* A code outside the table goes out as 999 and comes back as a protocol error. */
  ipc_w_reset(&w);
  ipc_w_error(&w, 1, -4242, "odd");
  KT_ASSERT_OK(ipc_w_end(&w));
  struct ipc_dec_err err;
  int rc;
  struct ipc_msg *m = decode_one(ipc_w_data(&w), ipc_w_len(&w), &err, &rc);
  KT_ASSERT(m);
  KT_CHECK_EQ(ipc_map_find(m->error, "code")->via.u64, 999);
  const char *msg;
  KT_CHECK_EQ(ipc_msg_error(m, &msg), KVD_EPROTO);
  ipc_msg_free(m);
  ipc_w_destroy(&w);
}

/* ---- streams and chunking ------------------------------------------------------------------ */

/* A random value, small enough for the depth limit; only sized containers, so the writer's
 * output is canonical msgpack and re-encoding a decode reproduces it byte for byte. */
static void random_value(struct ipc_w *w, int depth) {
  uint32_t kind = kt_rand_range(0, depth < 5 ? 9 : 6);
  char buf[300];
  switch (kind) {
  case 0:
    ipc_w_nil(w);
    break;
  case 1:
    ipc_w_bool(w, kt_rand_u64() & 1);
    break;
  case 2:
    ipc_w_u64(w, kt_rand_u64() >> kt_rand_range(0, 63));
    break;
  case 3:
    ipc_w_i64(w, -(int64_t)(kt_rand_u64() >> kt_rand_range(1, 63)) - 1);
    break;
  case 4:
    ipc_w_f64(w, kt_rand_float(-1e6f, 1e6f));
    break;
  case 5:
  case 6: {
    size_t n = kt_rand_range(0, 1) ? kt_rand_range(0, 40) : kt_rand_range(0, sizeof buf);
    for (size_t i = 0; i < n; i++)
      buf[i] = (char)kt_rand_range(0, 255);
    if (kind == 5)
      ipc_w_str(w, buf, n);
    else
      ipc_w_bin(w, buf, n);
    break;
  }
  case 7:
  case 8: {
    uint32_t n = kt_rand_range(0, 5);
    ipc_w_array(w, n);
    for (uint32_t i = 0; i < n; i++)
      random_value(w, depth + 1);
    break;
  }
  default: {
    uint32_t n = kt_rand_range(0, 5);
    ipc_w_map(w, n);
    for (uint32_t i = 0; i < n; i++) {
      snprintf(buf, sizeof buf, "k%u", i);
      ipc_w_cstr(w, buf);
      random_value(w, depth + 1);
    }
  }
  }
}

static void random_params(struct ipc_w *w) {
  uint32_t n = kt_rand_range(0, 6);
  ipc_w_map(w, n);
  for (uint32_t i = 0; i < n; i++) {
    char key[16];
    snprintf(key, sizeof key, "p%u", i);
    ipc_w_key(w, key);
    random_value(w, 4);
  }
}

/* A stream of random messages of every kind. */
static void random_stream(struct ipc_w *w, int n_msgs) {
  static const char *methods[] = {"hello", "generate", "status", "x.unknown", "session.fork"};
  for (int i = 0; i < n_msgs; i++) {
    switch (kt_rand_range(0, 3)) {
    case 0:
      ipc_w_request(w, (uint32_t)kt_rand_u64(), methods[kt_rand_range(0, 4)]);
      random_params(w);
      break;
    case 1:
      ipc_w_notification(w, methods[kt_rand_range(0, 4)]);
      random_params(w);
      break;
    case 2:
      ipc_w_result(w, (uint32_t)kt_rand_u64());
      random_value(w, 2);
      break;
    default:
      ipc_w_error(w, (uint32_t)kt_rand_u64(), KVD_EINVAL, "bad");
      break;
    }
    if (ipc_w_end(w) < 0) abort();
  }
}

KT_TEST(whole_chunked_and_bytewise_decodes_agree) {
  for (int round = 0; round < 20; round++) {
    struct ipc_w in, whole, chunks, bytes;
    ipc_w_init(&in, 64 << 20);
    ipc_w_init(&whole, 64 << 20);
    ipc_w_init(&chunks, 64 << 20);
    ipc_w_init(&bytes, 64 << 20);
    random_stream(&in, 30);
    int n1 = decode_all(ipc_w_data(&in), ipc_w_len(&in), WHOLE, IPC_MAX_FRAME_BYTES, &whole);
    int n2 = decode_all(ipc_w_data(&in), ipc_w_len(&in), CHUNKS, IPC_MAX_FRAME_BYTES, &chunks);
    int n3 = decode_all(ipc_w_data(&in), ipc_w_len(&in), BYTES, IPC_MAX_FRAME_BYTES, &bytes);
    KT_CHECK_EQ(n1, 30);
    KT_CHECK_EQ(n2, 30);
    KT_CHECK_EQ(n3, 30);
    /* Canonical input: the decode re-encodes to exactly the bytes sent. */
    KT_CHECK(ipc_w_len(&whole) == ipc_w_len(&in) &&
             memcmp(ipc_w_data(&whole), ipc_w_data(&in), ipc_w_len(&in)) == 0);
    KT_CHECK(ipc_w_len(&chunks) == ipc_w_len(&whole) &&
             memcmp(ipc_w_data(&chunks), ipc_w_data(&whole), ipc_w_len(&whole)) == 0);
    KT_CHECK(ipc_w_len(&bytes) == ipc_w_len(&whole) &&
             memcmp(ipc_w_data(&bytes), ipc_w_data(&whole), ipc_w_len(&whole)) == 0);
    ipc_w_destroy(&in);
    ipc_w_destroy(&whole);
    ipc_w_destroy(&chunks);
    ipc_w_destroy(&bytes);
    if (kt__failed()) return;
  }
}

KT_TEST(streams_with_errors_decode_the_same_in_any_chunking) {
  /* Good and bad frames mixed: the non-fatal errors must land in the same places. */
  struct ipc_w in, whole, bytes, chunks;
  ipc_w_init(&in, 1 << 20);
  ipc_w_init(&whole, 1 << 20);
  ipc_w_init(&bytes, 1 << 20);
  ipc_w_init(&chunks, 1 << 20);
  write_generate(&in, 1);
  ipc_w_end(&in);
  ipc_w_array(&in, 3); /* [0, 2, "m"]: a request one element short */
  ipc_w_u64(&in, 0);
  ipc_w_u64(&in, 2);
  ipc_w_cstr(&in, "m");
  ipc_w_end(&in);
  ipc_w_request(&in, 3, "status");
  ipc_w_map(&in, 0);
  ipc_w_end(&in);
  ipc_w_array(&in, 4); /* [0, "x", "m", []]: no readable msgid */
  ipc_w_u64(&in, 0);
  ipc_w_cstr(&in, "x");
  ipc_w_cstr(&in, "m");
  ipc_w_array(&in, 0);
  ipc_w_end(&in);
  ipc_w_request(&in, 4, "status");
  ipc_w_map(&in, 0);
  ipc_w_end(&in);
  uint8_t garbage = 0xc1; /* then bytes that are not msgpack: fatal, nothing after counts */
  ipc_w_array(&in, 1);
  ipc_w_u64(&in, 0);
  ipc_w_end(&in);
  size_t len = ipc_w_len(&in);
  char *data = malloc(len + 3);
  KT_ASSERT(data);
  memcpy(data, ipc_w_data(&in), len);
  data[len - 1] = (char)garbage; /* the 0 inside [0] becomes 0xc1 */
  memcpy(data + len, "\x94\x00\x05", 3);
  KT_CHECK_EQ(decode_all(data, len + 3, WHOLE, IPC_MAX_FRAME_BYTES, &whole), 6);
  KT_CHECK_EQ(decode_all(data, len + 3, BYTES, IPC_MAX_FRAME_BYTES, &bytes), 6);
  KT_CHECK_EQ(decode_all(data, len + 3, CHUNKS, IPC_MAX_FRAME_BYTES, &chunks), 6);
  KT_CHECK(ipc_w_len(&bytes) == ipc_w_len(&whole) &&
           memcmp(ipc_w_data(&bytes), ipc_w_data(&whole), ipc_w_len(&whole)) == 0);
  KT_CHECK(ipc_w_len(&chunks) == ipc_w_len(&whole) &&
           memcmp(ipc_w_data(&chunks), ipc_w_data(&whole), ipc_w_len(&whole)) == 0);
  free(data);
  ipc_w_destroy(&in);
  ipc_w_destroy(&whole);
  ipc_w_destroy(&bytes);
  ipc_w_destroy(&chunks);
}

KT_TEST(several_messages_in_one_chunk) {
  struct ipc_w w;
  ipc_w_init(&w, IPC_MAX_FRAME_BYTES);
  for (uint32_t i = 1; i <= 3; i++) {
    ipc_w_request(&w, i, "tokenize");
    ipc_w_map(&w, 1);
    ipc_w_kv_cstr(&w, "text", "hi");
    KT_ASSERT_OK(ipc_w_end(&w));
  }
  struct ipc_dec d;
  ipc_dec_init(&d, IPC_MAX_FRAME_BYTES);
  KT_ASSERT_OK(ipc_dec_feed(&d, ipc_w_data(&w), ipc_w_len(&w)));
  for (uint32_t i = 1; i <= 3; i++) {
    struct ipc_msg *m;
    struct ipc_dec_err err;
    KT_ASSERT_EQ(ipc_dec_next(&d, &m, &err), 1);
    KT_CHECK_EQ(m->id, i);
    KT_CHECK_EQ(m->method_id, IPC_M_TOKENIZE);
    ipc_msg_free(m);
  }
  struct ipc_msg *m;
  struct ipc_dec_err err;
  KT_CHECK_EQ(ipc_dec_next(&d, &m, &err), 0);
  ipc_dec_destroy(&d);
  ipc_w_destroy(&w);
}

KT_TEST(truncated_frames_wait_for_more) {
  struct ipc_w w;
  ipc_w_init(&w, IPC_MAX_FRAME_BYTES);
  write_generate(&w, 5);
  KT_ASSERT_OK(ipc_w_end(&w));
  size_t len = ipc_w_len(&w);
  const char *p = ipc_w_data(&w);
  /* Every proper prefix leaves the decoder waiting; the last byte completes the message. */
  for (size_t cut = 0; cut < len; cut++) {
    struct ipc_dec d;
    struct ipc_msg *m = NULL;
    struct ipc_dec_err err;
    ipc_dec_init(&d, IPC_MAX_FRAME_BYTES);
    KT_ASSERT_OK(ipc_dec_feed(&d, p, cut));
    KT_ASSERT_EQ(ipc_dec_next(&d, &m, &err), 0);
    KT_ASSERT_EQ(ipc_dec_next(&d, &m, &err), 0); /* asking again changes nothing */
    KT_ASSERT_OK(ipc_dec_feed(&d, p + cut, len - cut));
    KT_ASSERT_EQ(ipc_dec_next(&d, &m, &err), 1);
    KT_CHECK_EQ(m->id, 5);
    ipc_msg_free(m);
    ipc_dec_destroy(&d);
  }
  ipc_w_destroy(&w);
}

KT_TEST(reserve_and_commit_read_in_place) {
  struct ipc_w w;
  ipc_w_init(&w, IPC_MAX_FRAME_BYTES);
  for (uint32_t i = 0; i < 50; i++) {
    ipc_w_request(&w, i, "detokenize");
    ipc_w_map(&w, 1);
    ipc_w_key(&w, "tokens");
    ipc_w_array(&w, 3);
    ipc_w_u64(&w, i);
    ipc_w_u64(&w, i * 1000);
    ipc_w_u64(&w, 1u << 31);
    KT_ASSERT_OK(ipc_w_end(&w));
  }
  struct ipc_dec d;
  ipc_dec_init(&d, IPC_MAX_FRAME_BYTES);
  size_t off = 0, got = 0;
  while (got < 50) {
    struct ipc_msg *m;
    struct ipc_dec_err err;
    int rc = ipc_dec_next(&d, &m, &err);
    KT_ASSERT(rc >= 0);
    if (rc == 1) {
      KT_CHECK_EQ(m->id, got);
      ipc_msg_free(m);
      got++;
      continue;
    }
    KT_ASSERT(off < ipc_w_len(&w));
    char *buf;
    size_t room;
    KT_ASSERT_OK(ipc_dec_reserve(&d, 7, &buf, &room));
    KT_ASSERT(room >= 7);
    size_t n = kt_rand_range(1, 7);
    if (n > ipc_w_len(&w) - off) n = ipc_w_len(&w) - off;
    memcpy(buf, ipc_w_data(&w) + off, n);
    ipc_dec_commit(&d, n);
    off += n;
  }
  ipc_dec_destroy(&d);
  ipc_w_destroy(&w);
}

/* ---- decode errors ------------------------------------------------------------------------- */

struct bad_case {
  const char *what;
  const uint8_t *bytes;
  size_t len;
  int code;
  bool fatal, has_id;
  uint32_t id;
};

#define B(...) (const uint8_t[]){__VA_ARGS__}, sizeof((const uint8_t[]){__VA_ARGS__})

KT_TEST(malformed_frames_give_the_documented_errors) {
  static const char long_method[] =
      "a123456789b123456789c123456789d123456789e123456789f123456789g1234";
  uint8_t too_long[80] = {0x94, 0x00, 0x09, 0xd9, 65};
  memcpy(too_long + 5, long_method, 65);
  too_long[70] = 0x90;
  const struct bad_case cases[] = {
      {"not msgpack", B(0xc1), KVD_EPROTO, true, false, 0}, /* first byte already not an array */
      {"0xc1 inside", B(0x94, 0x00, 0x01, 0xc1), KVD_EBADMSG, true, false, 0},
      {"not an array", B(0x05), KVD_EPROTO, true, false, 0},
      {"text", B('G', 'E', 'T', ' '), KVD_EPROTO, true, false, 0},
      {"empty array", B(0x90), KVD_EPROTO, false, false, 0},
      {"unknown type tag", B(0x94, 0x03, 0x01, 0xa1, 'm', 0x90), KVD_EPROTO, false, false, 0},
      {"negative type tag", B(0x94, 0xff, 0x01, 0xa1, 'm', 0x90), KVD_EPROTO, false, false, 0},
      {"request too short", B(0x93, 0x00, 0x02, 0xa1, 'm'), KVD_EPROTO, false, true, 2},
      {"request too long", B(0x95, 0x00, 0x02, 0xa1, 'm', 0x90, 0xc0), KVD_EPROTO, false, true, 2},
      {"msgid a string", B(0x94, 0x00, 0xa1, 'x', 0xa1, 'm', 0x90), KVD_EPROTO, false, false, 0},
      {"msgid negative", B(0x94, 0x00, 0xff, 0xa1, 'm', 0x90), KVD_EPROTO, false, false, 0},
      {"msgid over 32 bits", B(0x94, 0x00, 0xcf, 0, 0, 0, 1, 0, 0, 0, 0, 0xa1, 'm', 0x90),
       KVD_EPROTO, false, false, 0},
      {"msgid as uint64", B(0x94, 0x00, 0xcf, 0, 0, 0, 0, 0, 0, 0, 9, 0xa1, 'm', 0x90), 1, false,
       false, 0},
      {"method an int", B(0x94, 0x00, 0x05, 0x07, 0x90), KVD_EPROTO, false, true, 5},
      /* bin method names are accepted when UTF-8 (ipc_accepts_bin_method_names); not this one */
      {"method binary not UTF-8", B(0x94, 0x00, 0x05, 0xc4, 0x01, 0xff, 0x90), KVD_EPROTO, false,
       true, 5},
      {"method binary overlong", B(0x94, 0x00, 0x05, 0xc4, 0x02, 0xc0, 0xaf, 0x90), KVD_EPROTO,
       false, true, 5},
      {"params a map", B(0x94, 0x00, 0x05, 0xa1, 'm', 0x80), KVD_EPROTO, false, true, 5},
      {"params [1]", B(0x94, 0x00, 0x05, 0xa1, 'm', 0x91, 0x01), KVD_EINVAL, false, true, 5},
      {"params [{}, {}]", B(0x94, 0x00, 0x05, 0xa1, 'm', 0x92, 0x80, 0x80), KVD_EINVAL, false, true,
       5},
      {"int key", B(0x94, 0x00, 0x05, 0xa1, 'm', 0x91, 0x81, 0x01, 0x02), KVD_EINVAL, false, true,
       5},
      {"repeated key",
       B(0x94, 0x00, 0x05, 0xa1, 'm', 0x91, 0x83, 0xa1, 'a', 1, 0xa1, 'b', 2, 0xa1, 'a', 3),
       KVD_EINVAL, false, true, 5},
      {"method too long", too_long, 71, KVD_E2BIG, false, true, 9},
      {"response too short", B(0x93, 0x01, 0x05, 0xc0), KVD_EPROTO, false, false, 0},
      {"notification too long", B(0x94, 0x02, 0xa1, 'm', 0x90, 0xc0), KVD_EPROTO, false, false, 0},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const struct bad_case *c = &cases[i];
    struct ipc_dec d;
    struct ipc_msg *m = NULL;
    struct ipc_dec_err err;
    ipc_dec_init(&d, IPC_MAX_FRAME_BYTES);
    KT_ASSERT_OK(ipc_dec_feed(&d, c->bytes, c->len));
    /* A good request after it: reached after a non-fatal error, never after a fatal one. */
    static const uint8_t good[] = {0x94, 0x00, 0x2a, 0xa6, 's', 't', 'a', 't', 'u', 's', 0x90};
    KT_ASSERT_OK(ipc_dec_feed(&d, good, sizeof good));
    int rc = ipc_dec_next(&d, &m, &err);
    if (c->code == 1) { /* a valid case among the bad ones: msgid in a wide encoding */
      KT_ASSERT_MSG(rc == 1, "%s: got %d (%s)", c->what, rc, err.message);
      KT_CHECK_EQ(m->id, 9);
      ipc_msg_free(m);
    } else {
      KT_ASSERT_MSG(rc == c->code && err.code == rc && err.fatal == c->fatal &&
                        err.has_id == c->has_id && (!c->has_id || err.id == c->id),
                    "%s: got %d fatal %d has_id %d id %u (%s)", c->what, rc, err.fatal, err.has_id,
                    err.id, err.message);
      KT_ASSERT_MSG(strlen(err.message) > 0, "%s: no message", c->what);
    }
    rc = ipc_dec_next(&d, &m, &err);
    if (c->fatal) {
      KT_ASSERT_MSG(rc == c->code && err.fatal, "%s: fatal error must stick", c->what);
    } else {
      KT_ASSERT_MSG(rc == 1, "%s: the next message is lost (%d %s)", c->what, rc, err.message);
      KT_CHECK_EQ(m->id, 42);
      ipc_msg_free(m);
    }
    ipc_dec_destroy(&d);
  }
}

KT_TEST(error_messages_say_what_was_wrong) {
  struct ipc_dec_err err;
  int rc;
  KT_CHECK(decode_one(B(0x94, 0x00, 0x05, 0xa1, 'm', 0x91, 0x82, 0xa1, 'a', 1, 0xa1, 'a', 2), &err,
                      &rc) == NULL);
  KT_ASSERT_STREQ(err.message, "param 'a' given twice");
  KT_CHECK(decode_one(B(0x94, 0x00, 0x05, 0x07, 0x90), &err, &rc) == NULL);
  KT_ASSERT_STREQ(err.message, "method must be a string");
  KT_CHECK(decode_one(B(0x93, 0x00, 0x02, 0xa1, 'm'), &err, &rc) == NULL);
  KT_ASSERT_STREQ(err.message, "a request is [0, msgid, method, params]: got 3 elements");
}

/* [0, 1, "m", [{"a": [[[...]]]}]]: the innermost value sits at depth 5 + extra. */
static size_t nested(uint8_t *buf, int extra) {
  size_t n = 0;
  static const uint8_t head[] = {0x94, 0x00, 0x01, 0xa1, 'm', 0x91, 0x81, 0xa1, 'a'};
  memcpy(buf, head, sizeof head);
  n = sizeof head;
  for (int i = 0; i < extra; i++)
    buf[n++] = 0x91;
  buf[n++] = 0x07;
  return n;
}

KT_TEST(nesting_is_limited) {
  uint8_t buf[64];
  struct ipc_dec_err err;
  int rc;
  /* outer array 1, params array 2, map 3, value 4: extra arrays push the value deeper. */
  size_t n = nested(buf, IPC_MAX_DEPTH - 4);
  struct ipc_msg *m = decode_one(buf, n, &err, &rc);
  KT_ASSERT_MSG(m, "depth %d refused: %s", IPC_MAX_DEPTH, err.message);
  ipc_msg_free(m);
  n = nested(buf, IPC_MAX_DEPTH - 3);
  KT_CHECK(decode_one(buf, n, &err, &rc) == NULL);
  KT_CHECK_EQ(rc, KVD_E2BIG);
  KT_CHECK(!err.fatal && err.has_id && err.id == 1);

  /* Far deeper than msgpack-c's own stack (32): still skipped cleanly, byte by byte too. */
  uint8_t deep[2000];
  static const uint8_t head[] = {0x94, 0x00, 0x07, 0xa1, 'm'};
  memcpy(deep, head, sizeof head);
  size_t len = sizeof head;
  for (int i = 0; i < 1500; i++)
    deep[len++] = 0x91;
  deep[len++] = 0x80;
  static const uint8_t good[] = {0x94, 0x00, 0x08, 0xa1, 'm', 0x90};
  memcpy(deep + len, good, sizeof good);
  len += sizeof good;
  struct ipc_w out;
  ipc_w_init(&out, 1 << 20);
  KT_CHECK_EQ(decode_all(deep, len, BYTES, IPC_MAX_FRAME_BYTES, &out), 2);
  ipc_w_destroy(&out);
  struct ipc_dec d;
  ipc_dec_init(&d, IPC_MAX_FRAME_BYTES);
  KT_ASSERT_OK(ipc_dec_feed(&d, deep, len));
  KT_CHECK_EQ(ipc_dec_next(&d, &m, &err), KVD_E2BIG);
  KT_CHECK(err.has_id && err.id == 7 && !err.fatal);
  KT_ASSERT_EQ(ipc_dec_next(&d, &m, &err), 1);
  KT_CHECK_EQ(m->id, 8);
  ipc_msg_free(m);
  ipc_dec_destroy(&d);
}

KT_TEST(oversize_frames_are_fatal_before_they_arrive) {
  struct ipc_dec d;
  struct ipc_msg *m;
  struct ipc_dec_err err;
  /* A str32 header promising 2 MiB: refused on the header alone. */
  static const uint8_t big_str[] = {0x94, 0x00, 0x01, 0xdb, 0x00, 0x20, 0x00, 0x00};
  ipc_dec_init(&d, IPC_MAX_FRAME_BYTES);
  KT_ASSERT_OK(ipc_dec_feed(&d, big_str, sizeof big_str));
  KT_CHECK_EQ(ipc_dec_next(&d, &m, &err), KVD_E2BIG);
  KT_CHECK(err.fatal);
  KT_CHECK(ipc_dec_buffered(&d) < 64);
  ipc_dec_destroy(&d);

  /* An array32 claiming 2^32 - 1 items: more values than bytes allowed, refused at once (and
   * nothing is allocated for them). */
  static const uint8_t big_arr[] = {0x94, 0x00, 0x01, 0xa1, 'm', 0x91,
                                    0xdd, 0xff, 0xff, 0xff, 0xff};
  ipc_dec_init(&d, IPC_MAX_FRAME_BYTES);
  KT_ASSERT_OK(ipc_dec_feed(&d, big_arr, sizeof big_arr));
  KT_CHECK_EQ(ipc_dec_next(&d, &m, &err), KVD_E2BIG);
  KT_CHECK(err.fatal);
  ipc_dec_destroy(&d);

  /* With a small limit: a frame of exactly the limit passes, one byte more does not. */
  struct ipc_w w;
  ipc_w_init(&w, 1 << 20);
  ipc_w_request(&w, 1, "tokenize");
  ipc_w_map(&w, 1);
  ipc_w_kv_cstr(&w, "text", "0123456789");
  KT_ASSERT_OK(ipc_w_end(&w));
  size_t exact = ipc_w_len(&w);
  ipc_dec_init(&d, exact);
  KT_ASSERT_OK(ipc_dec_feed(&d, ipc_w_data(&w), exact));
  KT_ASSERT_EQ(ipc_dec_next(&d, &m, &err), 1);
  ipc_msg_free(m);
  ipc_dec_destroy(&d);
  ipc_dec_init(&d, exact - 1);
  for (size_t i = 0; i < exact; i++) {
    KT_ASSERT_OK(ipc_dec_feed(&d, ipc_w_data(&w) + i, 1));
    int rc = ipc_dec_next(&d, &m, &err);
    if (rc < 0) {
      KT_CHECK_EQ(rc, KVD_E2BIG);
      KT_CHECK(err.fatal);
      /* The string header already tells: it does not wait for the payload. */
      KT_CHECK(i < exact - 10);
      break;
    }
    KT_ASSERT_EQ(rc, 0);
  }
  KT_CHECK_EQ(ipc_dec_next(&d, &m, &err), KVD_E2BIG); /* sticky */
  /* Bytes after a fatal error are dropped, not buffered. */
  KT_CHECK_EQ(ipc_dec_feed(&d, ipc_w_data(&w), exact), KVD_E2BIG);
  size_t held = ipc_dec_buffered(&d);
  char *room;
  size_t n_room;
  KT_ASSERT_OK(ipc_dec_reserve(&d, 16, &room, &n_room));
  KT_CHECK(ipc_dec_buffered(&d) <= held);
  ipc_dec_destroy(&d);
  ipc_w_destroy(&w);
}

KT_TEST(random_garbage_never_crashes) {
  for (int round = 0; round < 2000; round++) {
    uint8_t buf[256];
    size_t len = kt_rand_range(1, sizeof buf);
    for (size_t i = 0; i < len; i++)
      buf[i] = (uint8_t)kt_rand_u64();
    /* Often start like an array so the scanner gets past the first byte. */
    if (round % 2) buf[0] = (uint8_t)(0x90 | kt_rand_range(0, 15));
    struct ipc_w a, b;
    ipc_w_init(&a, 64 << 20);
    ipc_w_init(&b, 64 << 20);
    int n1 = decode_all(buf, len, WHOLE, 4096, &a);
    int n2 = decode_all(buf, len, BYTES, 4096, &b);
    KT_CHECK_EQ(n1, n2);
    KT_CHECK(ipc_w_len(&a) == ipc_w_len(&b) &&
             (ipc_w_len(&a) == 0 || memcmp(ipc_w_data(&a), ipc_w_data(&b), ipc_w_len(&a)) == 0));
    ipc_w_destroy(&a);
    ipc_w_destroy(&b);
    if (kt__failed()) return;
  }
}

/* ---- accessors and validation -------------------------------------------------------------- */

/* Decodes [0, 1, method, [params]] with params written by fn. */
static struct ipc_msg *make(const char *method, void (*fn)(struct ipc_w *)) {
  struct ipc_w w;
  ipc_w_init(&w, IPC_MAX_FRAME_BYTES);
  ipc_w_request(&w, 1, method);
  fn(&w);
  struct ipc_msg *m = NULL;
  if (ipc_w_end(&w) == 0) {
    struct ipc_dec_err err;
    int rc;
    m = decode_one(ipc_w_data(&w), ipc_w_len(&w), &err, &rc);
  }
  ipc_w_destroy(&w);
  return m;
}

static void wrong_types(struct ipc_w *w) {
  ipc_w_map_open(w);
  ipc_w_kv_i64(w, "max_tokens", -1);
  ipc_w_kv_cstr(w, "temperature", "hot");
  ipc_w_kv_u64(w, "stream", 1);
  ipc_w_kv_f64(w, "top_k", 1.5);
  ipc_w_kv_u64(w, "prompt", 3);
  ipc_w_key(w, "stop");
  ipc_w_array(w, 2);
  ipc_w_cstr(w, "a");
  ipc_w_u64(w, 2);
  ipc_w_key(w, "messages");
  ipc_w_array(w, 1);
  ipc_w_cstr(w, "hi");
  ipc_w_kv_u64(w, "session", (uint64_t)1 << 40);
  ipc_w_kv_u64(w, "seed", UINT64_MAX);
  ipc_w_kv_f64(w, "top_p", NAN);
  ipc_w_key(w, "logprobs");
  ipc_w_array(w, 0);
  ipc_w_close(w);
}

KT_TEST(accessors_report_type_errors_by_name) {
  struct ipc_msg *m = make("generate", wrong_types);
  KT_ASSERT(m);
  struct ipc_err e;
  uint64_t u = 77;
  uint32_t u32 = 77;
  int64_t i = 77;
  double f = 77;
  bool b = true;
  const char *s = "keep";
  size_t n;
  const msgpack_object *items;

  KT_CHECK_EQ(ipc_get_u64(m->params, "max_tokens", &u, &e), KVD_EINVAL);
  KT_ASSERT_STREQ(e.message, "param 'max_tokens' must be an unsigned integer");
  KT_CHECK_EQ(u, 77);
  KT_CHECK_EQ(ipc_get_i64(m->params, "max_tokens", &i, &e), 1);
  KT_CHECK_EQ(i, -1);
  KT_CHECK_EQ(ipc_get_f64(m->params, "max_tokens", &f, &e), 1);
  KT_CHECK(f == -1.0);
  KT_CHECK_EQ(ipc_get_f64(m->params, "temperature", &f, &e), KVD_EINVAL);
  KT_ASSERT_STREQ(e.message, "param 'temperature' must be a finite number");
  KT_CHECK_EQ(ipc_get_f64(m->params, "top_p", &f, &e), KVD_EINVAL);
  KT_ASSERT_STREQ(e.message, "param 'top_p' must be a finite number");
  KT_CHECK_EQ(ipc_get_bool(m->params, "stream", &b, &e), KVD_EINVAL);
  KT_ASSERT_STREQ(e.message, "param 'stream' must be a boolean");
  KT_CHECK_EQ(ipc_get_u64(m->params, "top_k", &u, &e), KVD_EINVAL);
  KT_ASSERT_STREQ(e.message, "param 'top_k' must be an unsigned integer");
  KT_CHECK_EQ(ipc_get_str(m->params, "prompt", &s, &n, &e), KVD_EINVAL);
  KT_ASSERT_STREQ(e.message, "param 'prompt' must be a string");
  KT_ASSERT_STREQ(s, "keep");
  KT_CHECK_EQ(ipc_get_strs(m->params, "stop", &items, &n, &e), KVD_EINVAL);
  KT_ASSERT_STREQ(e.message, "param 'stop' must be an array of strings (item 1 is not)");
  KT_CHECK_EQ(ipc_get_array(m->params, "stop", &items, &n, &e), 1);
  KT_CHECK_EQ(n, 2);
  KT_CHECK_EQ(ipc_get_maps(m->params, "messages", &items, &n, &e), KVD_EINVAL);
  KT_ASSERT_STREQ(e.message, "param 'messages' must be an array of maps (item 0 is not)");
  KT_CHECK_EQ(ipc_get_uints(m->params, "stop", &items, &n, &e), KVD_EINVAL);
  KT_CHECK_EQ(ipc_get_map(m->params, "stop", &items, &e), KVD_EINVAL);
  KT_ASSERT_STREQ(e.message, "param 'stop' must be a map");
  KT_CHECK_EQ(ipc_get_u32(m->params, "session", &u32, &e), KVD_ERANGE);
  KT_ASSERT_STREQ(e.message, "param 'session' must be below 2^32");
  KT_CHECK_EQ(u32, 77);
  KT_CHECK_EQ(ipc_get_u64(m->params, "session", &u, &e), 1);
  KT_CHECK(u == (uint64_t)1 << 40);
  KT_CHECK_EQ(ipc_get_i64(m->params, "seed", &i, &e), KVD_ERANGE);
  KT_CHECK_EQ(ipc_get_uints(m->params, "logprobs", &items, &n, &e), 1); /* empty is fine */
  KT_CHECK_EQ(n, 0);
  KT_CHECK_EQ(ipc_get_u64(m->params, "absent", &u, &e), 0);
  KT_CHECK_EQ(ipc_get_u64(NULL, "absent", &u, &e), 0);

  /* The generic validation finds the first wrong declared param in api.json order. */
  KT_CHECK_EQ(ipc_validate_params(m, &e), KVD_EINVAL);
  KT_ASSERT_STREQ(e.message, "param 'prompt' must be a string");
  ipc_msg_free(m);
}

static void gen_both(struct ipc_w *w) {
  ipc_w_map(w, 2);
  ipc_w_kv_cstr(w, "prompt", "a");
  ipc_w_key(w, "messages");
  ipc_w_array(w, 0);
}
static void gen_neither(struct ipc_w *w) {
  ipc_w_map(w, 2);
  ipc_w_kv_u64(w, "max_tokens", 3);
  ipc_w_kv_nil(w, "prompt");
}
static void gen_good(struct ipc_w *w) {
  ipc_w_map(w, 3);
  ipc_w_kv_cstr(w, "prompt", "a");
  ipc_w_kv_u64(w, "temperature", 1);            /* an integer is a fine number */
  ipc_w_kv_cstr(w, "future_option", "ignored"); /* unknown keys are allowed */
}
static void empty_map(struct ipc_w *w) {
  ipc_w_map(w, 0);
}
static void load_bad(struct ipc_w *w) {
  ipc_w_map(w, 2);
  ipc_w_kv_cstr(w, "path", "/m.gguf");
  ipc_w_kv_bool(w, "name", true);
}

KT_TEST(validation_follows_api_json) {
  struct ipc_err e;
  struct ipc_msg *m = make("generate", gen_both);
  KT_ASSERT(m);
  KT_CHECK_EQ(ipc_validate_params(m, &e), KVD_EINVAL);
  KT_ASSERT_STREQ(e.message, "generate: exactly one of 'prompt', 'messages' is required");
  ipc_msg_free(m);
  m = make("generate", gen_neither);
  KT_ASSERT(m);
  KT_CHECK_EQ(ipc_validate_params(m, &e), KVD_EINVAL);
  KT_ASSERT_STREQ(e.message, "generate: exactly one of 'prompt', 'messages' is required");
  ipc_msg_free(m);
  m = make("generate", gen_good);
  KT_ASSERT(m);
  KT_CHECK_EQ(ipc_validate_params(m, &e), 0);
  ipc_msg_free(m);
  m = make("models.load", empty_map);
  KT_ASSERT(m);
  KT_CHECK_EQ(ipc_validate_params(m, &e), KVD_EINVAL);
  KT_ASSERT_STREQ(e.message, "models.load: missing param 'path'");
  ipc_msg_free(m);
  m = make("models.load", load_bad);
  KT_ASSERT(m);
  KT_CHECK_EQ(ipc_validate_params(m, &e), KVD_EINVAL);
  KT_ASSERT_STREQ(e.message, "param 'name' must be a string");
  ipc_msg_free(m);
  m = make("generate.chunk", empty_map); /* a notification's name in a request */
  KT_ASSERT(m);
  KT_CHECK_EQ(m->method_id, IPC_M_UNKNOWN);
  ipc_msg_free(m);
  m = make("no.such", empty_map);
  KT_ASSERT(m);
  KT_CHECK_EQ(m->method_id, IPC_M_UNKNOWN);
  KT_CHECK_EQ(ipc_validate_params(m, &e), KVD_E_NO_METHOD);
  KT_ASSERT_STREQ(e.message, "unknown method 'no.such'");
  ipc_msg_free(m);

  /* Results: a client checks what it got back. */
  m = make("session.fork", empty_map);
  KT_ASSERT(m);
  KT_CHECK_EQ(ipc_validate_result(IPC_M_SESSION_FORK, m->params, &e), KVD_EPROTO);
  KT_ASSERT_STREQ(e.message, "session.fork: missing result key 'session'");
  KT_CHECK_EQ(ipc_validate_result(IPC_M_SESSION_FORK, NULL, &e), KVD_EPROTO);
  KT_CHECK_EQ(ipc_validate_result(IPC_M_UNKNOWN, NULL, &e), KVD_E_NO_METHOD);
  ipc_msg_free(m);
}

KT_TEST(method_table_matches_api_json) {
  KT_CHECK_EQ(IPC_API_PROTOCOL, IPC_PROTOCOL_VERSION);
  static const char *const names[] = {
      "hello",        "status",         "models.list",  "models.load", "models.unload",
      "generate",     "generate.chunk", "cancel",       "tokenize",    "detokenize",
      "session.open", "session.close",  "session.fork", "session.save", "session.restore",
      "session.list", "session.delete",
  };
  KT_ASSERT_EQ(IPC_M_COUNT, sizeof names / sizeof names[0]);
  for (int i = 0; i < IPC_M_COUNT; i++) {
    const struct ipc_method_desc *md = &ipc_methods[i];
    KT_ASSERT(md->name);
    KT_CHECK_EQ(md->name_len, strlen(md->name));
    KT_CHECK_EQ(ipc_method_lookup(names[i], strlen(names[i])), i);
    KT_CHECK_EQ(md->since, 1);
    KT_CHECK(md->kind == (i == IPC_M_GENERATE_CHUNK ? IPC_MK_NOTIFICATION : IPC_MK_REQUEST));
    for (unsigned j = 0; j < md->n_errors; j++)
      KT_CHECK(md->errors[j] < 0 && kvd_error_to_wire(md->errors[j]) != 999);
    for (unsigned j = 0; j < md->n_params; j++) {
      KT_CHECK(md->params[j].name && md->params[j].since >= 1);
      KT_CHECK(md->params[j].one_of <= md->n_groups);
    }
  }
  KT_CHECK_EQ(ipc_method_lookup("generat", 7), IPC_M_UNKNOWN);
  KT_CHECK_EQ(ipc_method_lookup("generate.", 9), IPC_M_UNKNOWN);
  KT_CHECK_EQ(ipc_methods[IPC_M_GENERATE].n_groups, 1);
  KT_CHECK(ipc_methods[IPC_M_MODELS_LOAD].params[0].required);
  KT_CHECK_EQ(ipc_methods[IPC_M_MODELS_LOAD].params[0].type, IPC_T_STR);
  KT_ASSERT_STREQ(ipc_type_phrase(IPC_T_UINTS), "an array of unsigned integers");
}

/* ---- writer -------------------------------------------------------------------------------- */

KT_TEST(writer_refuses_unfinished_and_unbalanced_messages) {
  struct ipc_w w;
  ipc_w_init(&w, IPC_MAX_FRAME_BYTES);
  ipc_w_result(&w, 1);
  ipc_w_u64(&w, 5);
  KT_ASSERT_OK(ipc_w_end(&w));
  size_t good = ipc_w_len(&w);

  ipc_w_request(&w, 2, "status"); /* no params map */
  KT_CHECK_EQ(ipc_w_end(&w), KVD_EINVAL);
  KT_CHECK_EQ(ipc_w_len(&w), good); /* dropped; the message before stays */

  ipc_w_result(&w, 3);
  ipc_w_map_open(&w);
  ipc_w_key(&w, "a"); /* a key without its value */
  ipc_w_close(&w);
  KT_CHECK_EQ(ipc_w_end(&w), KVD_EINVAL);
  KT_CHECK_EQ(ipc_w_len(&w), good);

  ipc_w_result(&w, 4);
  ipc_w_array(&w, 1);
  ipc_w_key(&w, "not in a map");
  KT_CHECK_EQ(ipc_w_end(&w), KVD_EINVAL);

  ipc_w_result(&w, 5);
  ipc_w_array(&w, 2);
  ipc_w_u64(&w, 1);
  ipc_w_u64(&w, 2);
  ipc_w_close(&w); /* the sized array closed itself */
  KT_CHECK_EQ(ipc_w_end(&w), KVD_EINVAL);

  ipc_w_result(&w, 6);
  ipc_w_u64(&w, 1);
  ipc_w_u64(&w, 2); /* a value after the message was whole */
  KT_CHECK_EQ(ipc_w_end(&w), KVD_EINVAL);

  ipc_w_result(&w, 7);
  for (int i = 0; i < IPC_MAX_DEPTH + 2; i++)
    ipc_w_array_open(&w);
  KT_CHECK_EQ(ipc_w_end(&w), KVD_E2BIG);

  ipc_w_request(&w, 8, "x");
  ipc_w_map_open(&w);
  ipc_w_request(&w, 9, "y"); /* a message inside a message */
  KT_CHECK_EQ(ipc_w_end(&w), KVD_EINVAL);

  KT_CHECK_EQ(ipc_w_end(&w), KVD_EINVAL); /* nothing written */
  KT_CHECK_EQ(ipc_w_len(&w), good);

  /* Still usable after all that. */
  ipc_w_result(&w, 10);
  ipc_w_nil(&w);
  KT_ASSERT_OK(ipc_w_end(&w));
  size_t len;
  char *p = ipc_w_steal(&w, &len);
  KT_ASSERT(p);
  KT_CHECK_EQ(len, good + 5); /* [1, 10, nil, nil] */
  KT_CHECK_EQ(ipc_w_len(&w), 0);
  free(p);
  KT_CHECK(ipc_w_steal(&w, &len) == NULL && len == 0);
  ipc_w_destroy(&w);
}

KT_TEST(writer_stops_at_the_frame_limit) {
  struct ipc_w w;
  ipc_w_init(&w, 1000);
  ipc_w_result(&w, 1);
  ipc_w_cstr(&w, "small");
  KT_ASSERT_OK(ipc_w_end(&w));
  size_t good = ipc_w_len(&w);
  char big[2000];
  memset(big, 'x', sizeof big);
  ipc_w_result(&w, 2);
  ipc_w_str(&w, big, sizeof big);
  KT_CHECK_EQ(ipc_w_end(&w), KVD_E2BIG);
  KT_CHECK_EQ(ipc_w_len(&w), good);
  KT_CHECK(w.cap < 2000); /* it never grew for the refused string */
  /* The limit is per message: many small ones may queue past it. */
  for (int i = 0; i < 100; i++) {
    ipc_w_result(&w, (uint32_t)i);
    ipc_w_str(&w, big, 100);
    KT_ASSERT_OK(ipc_w_end(&w));
  }
  KT_CHECK(ipc_w_len(&w) > 10000);
  ipc_w_destroy(&w);
}

KT_TEST(counted_containers_match_sized_ones) {
  /* Counted containers use 32-bit size fields; they decode to the same values. */
  struct ipc_w a, b;
  ipc_w_init(&a, 1 << 20);
  ipc_w_init(&b, 1 << 20);
  ipc_w_result(&a, 1);
  ipc_w_map_open(&a);
  ipc_w_key(&a, "xs");
  ipc_w_array_open(&a);
  for (int i = 0; i < 300; i++)
    ipc_w_u64(&a, (uint64_t)i);
  ipc_w_close(&a);
  ipc_w_key(&a, "empty");
  ipc_w_map_open(&a);
  ipc_w_close(&a);
  ipc_w_close(&a);
  KT_ASSERT_OK(ipc_w_end(&a));
  ipc_w_result(&b, 1);
  ipc_w_map(&b, 2);
  ipc_w_key(&b, "xs");
  ipc_w_array(&b, 300);
  for (int i = 0; i < 300; i++)
    ipc_w_u64(&b, (uint64_t)i);
  ipc_w_key(&b, "empty");
  ipc_w_map(&b, 0);
  KT_ASSERT_OK(ipc_w_end(&b));
  struct ipc_dec_err err;
  int rc;
  struct ipc_msg *ma = decode_one(ipc_w_data(&a), ipc_w_len(&a), &err, &rc);
  struct ipc_msg *mb = decode_one(ipc_w_data(&b), ipc_w_len(&b), &err, &rc);
  KT_ASSERT(ma && mb);
  KT_CHECK(msgpack_object_equal(*ma->result, *mb->result));
  ipc_msg_free(ma);
  ipc_msg_free(mb);
  ipc_w_destroy(&a);
  ipc_w_destroy(&b);
}

/* pynvim's stock session (and other msgpack libraries from before the str/bin split) sends
 * method names as bin: accepted when they are UTF-8, as neovim does. And a response sent by a
 * client, whatever its error slot holds, is passed up (to be ignored), never a protocol error
 * that hangs up on it. */
KT_TEST(ipc_accepts_bin_method_names_and_any_response) {
  static const uint8_t bin_hello[] = {0x94, 0x00, 0x07, 0xc4, 0x05, 'h', 'e', 'l', 'l', 'o', 0x90};
  static const uint8_t bin_note[] = {0x93, 0x02, 0xc4, 0x03, 'n', 'v', 'm', 0x91, 0x80};
  /* pynvim's first message: positional params; and a method that is no string at all */
  static const uint8_t odd_notes[] = {0x93, 0x02, 0xa1, 'n', 0x92, 0xa1, 'x', 0x80, /* 2 args */
                                      0x93, 0x02, 0x01, 0x90};                      /* int name */
  static const uint8_t responses[] = {0x94, 0x01, 0x05, 0x03, 0xc0,             /* error an int */
                                      0x94, 0x01, 0xa1, 'x',  0xa1, 'y', 0x01}; /* msgid a str */
  struct ipc_dec d;
  struct ipc_msg *m = NULL;
  struct ipc_dec_err err;
  ipc_dec_init(&d, IPC_MAX_FRAME_BYTES);
  KT_ASSERT_OK(ipc_dec_feed(&d, bin_hello, sizeof bin_hello));
  KT_ASSERT_OK(ipc_dec_feed(&d, bin_note, sizeof bin_note));
  KT_ASSERT_OK(ipc_dec_feed(&d, odd_notes, sizeof odd_notes));
  KT_ASSERT_OK(ipc_dec_feed(&d, responses, sizeof responses));
  KT_ASSERT_MSG(ipc_dec_next(&d, &m, &err) == 1, "bin hello: %s", err.message);
  KT_CHECK_EQ(m->type, IPC_REQUEST);
  KT_CHECK_EQ(m->id, 7);
  KT_CHECK_EQ(m->method_id, IPC_M_HELLO);
  ipc_msg_free(m);
  KT_ASSERT_MSG(ipc_dec_next(&d, &m, &err) == 1, "bin notification: %s", err.message);
  KT_CHECK_EQ(m->type, IPC_NOTIFICATION);
  KT_CHECK(m->method_len == 3 && memcmp(m->method, "nvm", 3) == 0);
  ipc_msg_free(m);
  for (int i = 0; i < 2; i++) {
    KT_ASSERT_MSG(ipc_dec_next(&d, &m, &err) == 1, "odd notification %d: %s", i, err.message);
    KT_CHECK_EQ(m->type, IPC_NOTIFICATION);
    KT_CHECK_EQ(m->method_id, IPC_M_UNKNOWN);
    KT_CHECK(m->params == NULL);
    ipc_msg_free(m);
  }
  for (int i = 0; i < 2; i++) {
    KT_ASSERT_MSG(ipc_dec_next(&d, &m, &err) == 1, "response %d: %s", i, err.message);
    KT_CHECK_EQ(m->type, IPC_RESPONSE);
    ipc_msg_free(m);
  }
  ipc_dec_destroy(&d);
}
