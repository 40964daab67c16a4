/* The protocol's version and limits: every number a client can run into, in one place.
 *
 * ipc/gen_api.py reads this file to write the limits table of ipc/PROTOCOL.md, so each constant
 * needs the one comment above it, and its value must stay a plain integer expression. The server
 * enforces each one with the error code its comment names; raising one is a compatible change,
 * lowering one is not. */
#ifndef KVD_IPC_LIMITS_H
#define KVD_IPC_LIMITS_H

/* Protocol version this code speaks (see `hello`). */
#define IPC_PROTOCOL_VERSION 1

/* Largest message a client may send, in bytes. A larger frame is answered by closing the
 * connection (KVD_E2BIG), since the rest of the stream can no longer be trusted. */
#define IPC_MAX_FRAME_BYTES (1 << 20)

/* Largest message the server sends, in bytes; clients size their decoder with it. */
#define IPC_MAX_REPLY_BYTES (16 << 20)

/* Deepest nesting of arrays and maps in a message; the message itself is level 1 (KVD_E2BIG). */
#define IPC_MAX_DEPTH 16

/* Longest method name, in bytes (KVD_E2BIG). */
#define IPC_MAX_METHOD_LEN 64

/* Requests of one connection awaiting their response; one more is answered with KVD_EBUSY. */
#define IPC_MAX_INFLIGHT 64

/* Open connections; the server closes a connection beyond this at once. */
#define IPC_MAX_CONNECTIONS 64

/* Longest prompt: `prompt`, or the `content` of all `messages` together, in bytes (KVD_E2BIG). */
#define IPC_MAX_PROMPT_BYTES (768 << 10)

/* Most `stop` strings in one generate (KVD_E2BIG). */
#define IPC_MAX_STOP_STRINGS 16

/* Longest `stop` string, in bytes (KVD_E2BIG). */
#define IPC_MAX_STOP_BYTES 128

/* Largest `logprobs` (alternatives per token) in one generate (KVD_ERANGE). */
#define IPC_MAX_LOGPROBS 20

/* Open sessions per connection; `session.open` and `session.fork` beyond it get KVD_EBUSY. */
#define IPC_MAX_SESSIONS 64

/* Longest model name or `client` name, in bytes (KVD_E2BIG). */
#define IPC_MAX_NAME_BYTES 128

#endif
