/* libFuzzer target for the GGUF reader: open the bytes, touch every value and tensor the reader
 * claims is valid (so a validation gap shows up as an out-of-bounds read under ASan), close. */
#include "gguf.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint64_t walk_value(const struct gguf_value *v) {
  uint64_t h = (uint64_t)v->type;
  switch (v->type) {
  case GGUF_VT_STRING:
    for (uint64_t i = 0; i < v->v.str.len; i++)
      h = h * 31 + (uint8_t)v->v.str.ptr[i];
    break;
  case GGUF_VT_ARRAY:
    for (uint64_t i = 0; i < v->v.arr.count; i++) {
      struct gguf_value e;
      if (gguf_arr_get(v, i, &e) == 0) h += walk_value(&e);
    }
    break;
  default:
    h += v->v.u64;
  }
  return h;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  struct gguf_file *f = NULL;
  struct gguf_error err;
  if (gguf_open_memory(data, size, &f, &err) < 0) {
    /* the message must always be a terminated string */
    if (strlen(err.msg) >= sizeof err.msg) __builtin_trap();
    return 0;
  }
  volatile uint64_t sink = 0;
  for (uint64_t i = 0; i < f->n_kv; i++) {
    const struct gguf_kv *kv = &f->kv[i];
    sink += walk_value(&kv->value);
    char key[128];
    size_t n = kv->key.len < sizeof key - 1 ? (size_t)kv->key.len : sizeof key - 1;
    memcpy(key, kv->key.ptr, n);
    key[n] = '\0';
    if (n == kv->key.len && gguf_find_kv(f, key) != kv) __builtin_trap();
  }
  for (uint64_t i = 0; i < f->n_tensors; i++) {
    const struct gguf_tensor *t = &f->tensors[i];
    const uint8_t *p = t->data;
    /* first and last byte prove the range lies inside the input */
    sink += p[0] + p[t->nbytes - 1];
    char name[GGUF_MAX_TENSOR_NAME + 1];
    memcpy(name, t->name.ptr, (size_t)t->name.len);
    name[t->name.len] = '\0';
    if (gguf_find_tensor(f, name) != t) __builtin_trap();
  }
  uint32_t u32;
  float f32;
  struct gguf_str s;
  sink += (uint64_t)gguf_get_u32(f, "general.alignment", &u32);
  sink += (uint64_t)gguf_get_f32(f, "llama.attention.layer_norm_rms_epsilon", &f32);
  sink += (uint64_t)gguf_get_str(f, "general.architecture", &s);
  static FILE *null; /* opened once: an fopen per input would dominate the run time */
  if (!null) null = fopen("/dev/null", "w");
  if (null) gguf_print_info(f, null);
  (void)sink;
  gguf_close(f);
  return 0;
}
