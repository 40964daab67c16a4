/* msgpack to JSON text, for kvd_server_status.json: the whole status answer in a form any program
 * (or `kvctl status --json`) can pass on, keys this library does not know included. */
#include "kvd_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

static void json_str(struct kvd__buf *b, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  kvd__buf_add(b, "\"", 1);
  size_t run = 0; /* bytes copied as they are, written in one go */
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch >= 0x20 && ch != '"' && ch != '\\') continue;
    kvd__buf_add(b, s + run, i - run);
    run = i + 1;
    switch (ch) {
    case '"':
      kvd__buf_add(b, "\\\"", 2);
      break;
    case '\\':
      kvd__buf_add(b, "\\\\", 2);
      break;
    case '\n':
      kvd__buf_add(b, "\\n", 2);
      break;
    case '\r':
      kvd__buf_add(b, "\\r", 2);
      break;
    case '\t':
      kvd__buf_add(b, "\\t", 2);
      break;
    default: {
      char u[6] = {'\\', 'u', '0', '0', hex[ch >> 4], hex[ch & 15]};
      kvd__buf_add(b, u, sizeof u);
    }
    }
  }
  kvd__buf_add(b, s + run, n - run);
  kvd__buf_add(b, "\"", 1);
}

static void json_f64(struct kvd__buf *b, double v) {
  if (!isfinite(v)) {
    kvd__buf_puts(b, "null");
    return;
  }
  /* The shortest of 15 or 17 digits that reads back as the same double: 0.1 stays 0.1. */
  char tmp[32];
  snprintf(tmp, sizeof tmp, "%.15g", v);
  if (strtod(tmp, NULL) != v) snprintf(tmp, sizeof tmp, "%.17g", v);
  /* printf follows the program's locale; JSON's decimal point is always '.'. */
  for (char *p = tmp; *p; p++)
    if (*p == ',') *p = '.';
  kvd__buf_puts(b, tmp);
}

void kvd__json(struct kvd__buf *b, const msgpack_object *o) {
  switch (o->type) {
  case MSGPACK_OBJECT_NIL:
    kvd__buf_puts(b, "null");
    break;
  case MSGPACK_OBJECT_BOOLEAN:
    kvd__buf_puts(b, o->via.boolean ? "true" : "false");
    break;
  case MSGPACK_OBJECT_POSITIVE_INTEGER:
    kvd__buf_printf(b, "%llu", (unsigned long long)o->via.u64);
    break;
  case MSGPACK_OBJECT_NEGATIVE_INTEGER:
    kvd__buf_printf(b, "%lld", (long long)o->via.i64);
    break;
  case MSGPACK_OBJECT_FLOAT32:
  case MSGPACK_OBJECT_FLOAT64:
    json_f64(b, o->via.f64);
    break;
  case MSGPACK_OBJECT_STR:
    json_str(b, o->via.str.ptr, o->via.str.size);
    break;
  case MSGPACK_OBJECT_ARRAY:
    kvd__buf_add(b, "[", 1);
    for (uint32_t i = 0; i < o->via.array.size; i++) {
      if (i) kvd__buf_add(b, ",", 1);
      kvd__json(b, &o->via.array.ptr[i]);
    }
    kvd__buf_add(b, "]", 1);
    break;
  case MSGPACK_OBJECT_MAP:
    kvd__buf_add(b, "{", 1);
    for (uint32_t i = 0; i < o->via.map.size; i++) {
      const msgpack_object *k = &o->via.map.ptr[i].key;
      if (i) kvd__buf_add(b, ",", 1);
      if (k->type == MSGPACK_OBJECT_STR) {
        kvd__json(b, k);
      } else { /* JSON keys are strings: write any other key as the text of its JSON */
        struct kvd__buf kb = {0};
        kvd__json(&kb, k);
        json_str(b, kb.p ? kb.p : "", kb.len);
        b->oom |= kb.oom;
        kvd__buf_destroy(&kb);
      }
      kvd__buf_add(b, ":", 1);
      kvd__json(b, &o->via.map.ptr[i].val);
    }
    kvd__buf_add(b, "}", 1);
    break;
  default:
    kvd__buf_puts(b, "null");
    break; /* bin and ext do not occur in protocol 1 */
  }
}
