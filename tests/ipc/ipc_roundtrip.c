/* ipc_roundtrip: reads a msgpack-rpc stream on stdin, decodes it with the C decoder and writes
 * every message back to stdout re-encoded (canonical msgpack, params as decoded). A frame the
 * decoder refuses becomes the notification
 *   [2, "ipc.error", [{"code": <wire code>, "fatal": bool, "id": <msgid or nil>, "message": str}]]
 * and a fatal one ends the stream. tests/ipc/test_peer.py drives it to check that what the Python
 * peer encodes from PROTOCOL.md is what the C side decodes, and back.
 *
 * Usage: ipc_roundtrip [CHUNK]   (CHUNK: bytes per feed, default 1: the worst case for resuming) */
#include "ipc.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void put(struct ipc_w *w) {
  if (ipc_w_end(w) < 0) {
    fprintf(stderr, "ipc_roundtrip: cannot encode\n");
    exit(2);
  }
  if (fwrite(ipc_w_data(w), 1, ipc_w_len(w), stdout) != ipc_w_len(w)) exit(2);
  ipc_w_reset(w);
}

static void echo(const struct ipc_msg *m, struct ipc_w *w) {
  switch (m->type) {
  case IPC_REQUEST:
  case IPC_NOTIFICATION:
    ipc_w_array(w, m->type == IPC_REQUEST ? 4 : 3);
    ipc_w_u64(w, m->type);
    if (m->type == IPC_REQUEST) ipc_w_u64(w, m->id);
    ipc_w_str(w, m->method, m->method_len);
    ipc_w_array(w, 1);
    if (m->params)
      ipc_w_obj(w, m->params);
    else
      ipc_w_map(w, 0);
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
  put(w);
}

int main(int argc, char **argv) {
  size_t chunk = argc > 1 ? strtoul(argv[1], NULL, 10) : 1;
  if (chunk == 0) chunk = 1;
  char *buf = malloc(chunk);
  if (!buf) return 2;
  struct ipc_dec d;
  struct ipc_w w;
  ipc_dec_init(&d, IPC_MAX_FRAME_BYTES);
  ipc_w_init(&w, IPC_MAX_REPLY_BYTES);
  bool eof = false;
  int status = 0;
  for (;;) {
    struct ipc_msg *m;
    struct ipc_dec_err err;
    int rc = ipc_dec_next(&d, &m, &err);
    if (rc == 1) {
      echo(m, &w);
      ipc_msg_free(m);
      continue;
    }
    if (rc < 0) {
      ipc_w_notification(&w, "ipc.error");
      ipc_w_map(&w, 4);
      ipc_w_kv_u64(&w, "code", (uint64_t)kvd_error_to_wire(rc));
      ipc_w_kv_bool(&w, "fatal", err.fatal);
      if (err.has_id)
        ipc_w_kv_u64(&w, "id", err.id);
      else
        ipc_w_kv_nil(&w, "id");
      ipc_w_kv_cstr(&w, "message", err.message);
      put(&w);
      if (err.fatal) break;
      continue;
    }
    if (eof) {
      if (ipc_dec_buffered(&d) > 0) status = 3; /* a truncated frame at the end */
      break;
    }
    ssize_t n = read(0, buf, chunk);
    if (n < 0) {
      status = 2;
      break;
    }
    if (n == 0) {
      eof = true;
      continue;
    }
    if (ipc_dec_feed(&d, buf, (size_t)n) < 0) {
      status = 2;
      break;
    }
  }
  fflush(stdout);
  ipc_dec_destroy(&d);
  ipc_w_destroy(&w);
  free(buf);
  return status;
}
