/* libFuzzer target for the ipc decoder. The input is a byte stream from a client; the first byte
 * picks how it is split into reads and the frame limit. Oracles beyond ASan/UBSan:
 *   - the stream decodes to the same messages and errors fed whole and fed in pieces;
 *   - every decoded message re-encodes (ipc_w_obj) and decodes again to equal values;
 *   - every string in a message is NUL-terminated inside the message's arena;
 *   - errors are consistent: code returned == err.code, a message, fatal errors stick;
 *   - the validators and typed accessors accept or refuse without crashing. */
#include "ipc.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A broken oracle: say which one before the fuzzer saves the input. */
#define FAIL() (fprintf(stderr, "fuzz_ipc: check at line %d failed\n", __LINE__), abort())

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_strings(const msgpack_object *o) {
  switch (o->type) {
  case MSGPACK_OBJECT_STR:
    if (o->via.str.ptr[o->via.str.size] != '\0') FAIL();
    break;
  case MSGPACK_OBJECT_ARRAY:
    for (uint32_t i = 0; i < o->via.array.size; i++)
      check_strings(&o->via.array.ptr[i]);
    break;
  case MSGPACK_OBJECT_MAP:
    for (uint32_t i = 0; i < o->via.map.size; i++) {
      check_strings(&o->via.map.ptr[i].key);
      check_strings(&o->via.map.ptr[i].val);
    }
    break;
  default:
    break;
  }
}

/* Runs every typed accessor a handler would on the method's declared params. */
static void touch_params(const struct ipc_msg *m) {
  struct ipc_err e;
  if (ipc_validate_params(m, &e) < 0 && e.message[0] == '\0') FAIL();
  if (m->method_id == IPC_M_UNKNOWN) return;
  const struct ipc_method_desc *md = &ipc_methods[m->method_id];
  for (unsigned i = 0; i < md->n_params; i++) {
    const char *key = md->params[i].name, *s;
    size_t n;
    uint64_t u;
    uint32_t u32;
    int64_t i64;
    double f;
    bool b;
    const msgpack_object *items;
    ipc_get_str(m->params, key, &s, &n, &e);
    ipc_get_u64(m->params, key, &u, &e);
    ipc_get_u32(m->params, key, &u32, &e);
    ipc_get_i64(m->params, key, &i64, &e);
    ipc_get_f64(m->params, key, &f, &e);
    ipc_get_bool(m->params, key, &b, &e);
    ipc_get_map(m->params, key, &items, &e);
    ipc_get_array(m->params, key, &items, &n, &e);
    ipc_get_strs(m->params, key, &items, &n, &e);
    ipc_get_uints(m->params, key, &items, &n, &e);
    if (ipc_get_maps(m->params, key, &items, &n, &e) == 1)
      for (size_t j = 0; j < n; j++)
        ipc_get_str(&items[j], "role", &s, NULL, &e);
  }
}

/* Writes m as it arrived, in canonical msgpack. */
static void encode(const struct ipc_msg *m, struct ipc_w *w) {
  if (m->type == IPC_RESPONSE) {
    ipc_w_array(w, 4);
    ipc_w_u64(w, 1);
    ipc_w_u64(w, m->id);
    if (m->error)
      ipc_w_obj(w, m->error);
    else
      ipc_w_nil(w);
    ipc_w_obj(w, m->result);
  } else {
    ipc_w_array(w, m->type == IPC_REQUEST ? 4 : 3);
    ipc_w_u64(w, m->type);
    if (m->type == IPC_REQUEST) ipc_w_u64(w, m->id);
    ipc_w_str(w, m->method, m->method_len);
    ipc_w_array(w, m->params ? 1 : 0);
    if (m->params) ipc_w_obj(w, m->params);
  }
  if (ipc_w_end(w) < 0) FAIL();
}

/* Encodes m, decodes that, encodes the result again: the two encodings must be identical (bytes,
 * not msgpack_object_equal, which a NaN would fool). */
static void round_trip(const struct ipc_msg *m) {
  struct ipc_w a, b;
  ipc_w_init(&a, 64 << 20);
  ipc_w_init(&b, 64 << 20);
  encode(m, &a);
  struct ipc_dec d;
  struct ipc_msg *m2 = NULL;
  struct ipc_dec_err err;
  ipc_dec_init(&d, 64 << 20);
  if (ipc_dec_feed(&d, ipc_w_data(&a), ipc_w_len(&a)) < 0) FAIL();
  if (ipc_dec_next(&d, &m2, &err) != 1) FAIL();
  if (m2->type != m->type || m2->id != m->id || m2->method_id != m->method_id) FAIL();
  encode(m2, &b);
  if (ipc_w_len(&a) != ipc_w_len(&b) || memcmp(ipc_w_data(&a), ipc_w_data(&b), ipc_w_len(&a)))
    FAIL();
  ipc_msg_free(m2);
  ipc_dec_destroy(&d);
  ipc_w_destroy(&a);
  ipc_w_destroy(&b);
}

/* Decodes the stream in pieces whose sizes come from seed (0: all at once), recording a summary
 * of each message and error into out so two decodes can be compared. */
static void decode(const uint8_t *p, size_t len, uint8_t seed, size_t max_frame, bool deep,
                   struct ipc_w *out) {
  struct ipc_dec d;
  uint32_t rng = seed * 2654435761u + 1;
  size_t off = 0;
  ipc_dec_init(&d, max_frame);
  for (;;) {
    struct ipc_msg *m = NULL;
    struct ipc_dec_err err;
    int rc = ipc_dec_next(&d, &m, &err);
    if (rc == 0) {
      if (off == len) break;
      size_t n = len - off;
      if (seed) {
        rng = rng * 1103515245u + 12345u;
        n = 1 + (rng >> 16) % 17;
        if (n > len - off) n = len - off;
      }
      if (ipc_dec_feed(&d, p + off, n) < 0) FAIL();
      off += n;
      continue;
    }
    ipc_w_array(out, 4);
    ipc_w_i64(out, rc);
    if (rc == 1) {
      ipc_w_u64(out, m->type);
      ipc_w_u64(out, m->id);
      ipc_w_u64(out, m->frame_bytes);
      if (deep) {
        if (m->method && m->method[m->method_len] != '\0') FAIL();
        if (m->params) check_strings(m->params);
        if (m->error) check_strings(m->error);
        if (m->result) check_strings(m->result);
        if (m->type == IPC_RESPONSE) {
          const char *msg;
          struct ipc_err e;
          ipc_msg_error(m, &msg);
          ipc_validate_result(IPC_M_GENERATE, m->result, &e);
        } else {
          touch_params(m);
        }
        round_trip(m);
      }
      ipc_msg_free(m);
      if (ipc_w_end(out) < 0) FAIL();
      continue;
    }
    size_t mlen = strnlen(err.message, sizeof err.message);
    if (err.code != rc || mlen == 0 || mlen == sizeof err.message) FAIL();
    ipc_w_bool(out, err.fatal);
    ipc_w_u64(out, err.has_id ? err.id : UINT64_MAX);
    ipc_w_str(out, err.message, mlen);
    if (ipc_w_end(out) < 0) FAIL();
    if (err.fatal) {
      struct ipc_dec_err again;
      if (ipc_dec_next(&d, &m, &again) != rc || !again.fatal) FAIL();
      break;
    }
  }
  ipc_dec_destroy(&d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  uint8_t seed = data[0] & 0x7f;
  size_t max_frame = (data[0] & 0x80) ? 200 : IPC_MAX_FRAME_BYTES;
  struct ipc_w whole, pieces;
  ipc_w_init(&whole, 64 << 20);
  ipc_w_init(&pieces, 64 << 20);
  decode(data + 1, size - 1, 0, max_frame, true, &whole);
  decode(data + 1, size - 1, seed ? seed : 1, max_frame, false, &pieces);
  if (ipc_w_len(&whole) != ipc_w_len(&pieces) ||
      (ipc_w_len(&whole) && memcmp(ipc_w_data(&whole), ipc_w_data(&pieces), ipc_w_len(&whole))))
    FAIL();
  ipc_w_destroy(&whole);
  ipc_w_destroy(&pieces);
  return 0;
}
