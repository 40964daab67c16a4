/* The KV types' row formats (kv_format.h): the CPU definition the shaders are tested against. */
#include "kv_format.h"

#include "dtype.h"
#include "kvd_error.h"

#include <math.h>
#include <string.h>

static const char *const NAMES[KV_TYPE_COUNT] = {"f32", "f16", "q8_0", "q4_0"};

const char *kv_type_name(enum kv_type t) {
  return (unsigned)t < KV_TYPE_COUNT ? NAMES[t] : "unknown";
}

int kv_type_parse(const char *name, enum kv_type *ret) {
  for (int i = 0; name && i < KV_TYPE_COUNT; i++)
    if (strcmp(name, NAMES[i]) == 0) {
      *ret = (enum kv_type)i;
      return 0;
    }
  return KVD_EINVAL;
}

uint32_t kv_group(uint32_t head_dim) {
  static const uint32_t sizes[] = {32, 16, 8};
  for (size_t i = 0; i < 3; i++)
    if (head_dim % sizes[i] == 0) return sizes[i];
  return 0;
}

/* Words of f16 scales at the start of a quantized row: one per two groups. */
static uint32_t scale_words(uint32_t head_dim) {
  uint32_t g = kv_group(head_dim);
  return g ? (head_dim / g + 1) / 2 : 0;
}

int kv_row_words(enum kv_type t, uint32_t head_dim, uint32_t *ret) {
  if (head_dim == 0) return KVD_EINVAL;
  switch (t) {
  case KV_F32:
    *ret = head_dim;
    return 0;
  case KV_F16:
    if (head_dim % 2) return KVD_E_UNSUPPORTED;
    *ret = head_dim / 2;
    return 0;
  case KV_Q8_0:
    if (!kv_group(head_dim)) return KVD_E_UNSUPPORTED;
    *ret = scale_words(head_dim) + head_dim / 4;
    return 0;
  case KV_Q4_0:
    if (!kv_group(head_dim)) return KVD_E_UNSUPPORTED;
    *ret = scale_words(head_dim) + head_dim / 8;
    return 0;
  case KV_TYPE_COUNT:
    break;
  }
  return KVD_EINVAL;
}

static void put_scale(uint32_t *row, uint32_t g, float d) {
  uint32_t h = dtype_f32_to_f16(d);
  row[g / 2] = (row[g / 2] & (g % 2 ? 0x0000ffffu : 0xffff0000u)) | h << (g % 2 ? 16 : 0);
}

static float get_scale(const uint32_t *row, uint32_t g) {
  return dtype_f16_to_f32((uint16_t)(row[g / 2] >> (g % 2 ? 16 : 0)));
}

void kv_encode_row(enum kv_type t, const float *x, uint32_t head_dim, uint32_t *row) {
  uint32_t words = 0;
  if (kv_row_words(t, head_dim, &words) < 0) return;
  memset(row, 0, (size_t)words * 4);
  if (t == KV_F32) {
    memcpy(row, x, (size_t)head_dim * 4);
    return;
  }
  if (t == KV_F16) {
    for (uint32_t i = 0; i < head_dim / 2; i++)
      row[i] = dtype_f32_to_f16(x[2 * i]) | (uint32_t)dtype_f32_to_f16(x[2 * i + 1]) << 16;
    return;
  }
  uint32_t G = kv_group(head_dim), sw = scale_words(head_dim);
  uint8_t *q = (uint8_t *)(row + sw);
  for (uint32_t g = 0; g < head_dim / G; g++) {
    const float *v = x + g * G;
    if (t == KV_Q8_0) {
      float amax = 0;
      for (uint32_t i = 0; i < G; i++)
        amax = fmaxf(amax, fabsf(v[i]));
      float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
      put_scale(row, g, d);
      for (uint32_t i = 0; i < G; i++)
        q[g * G + i] = (uint8_t)(int8_t)lrintf(v[i] * id);
    } else {
      float amax = 0, max = 0;
      for (uint32_t i = 0; i < G; i++)
        if (fabsf(v[i]) > amax) {
          amax = fabsf(v[i]);
          max = v[i];
        }
      float d = max / -8.0f, id = d ? 1.0f / d : 0.0f;
      put_scale(row, g, d);
      for (uint32_t i = 0; i < G; i++) {
        int n = (int)(v[i] * id + 8.5f);
        uint32_t nib = (uint32_t)(n < 0 ? 0 : n > 15 ? 15 : n);
        uint32_t e = g * G + i;
        row[sw + e / 8] |= nib << (4 * (e % 8));
      }
    }
  }
}

void kv_decode_row(enum kv_type t, const uint32_t *row, uint32_t head_dim, float *x) {
  uint32_t words = 0;
  if (kv_row_words(t, head_dim, &words) < 0) return;
  if (t == KV_F32) {
    memcpy(x, row, (size_t)head_dim * 4);
    return;
  }
  if (t == KV_F16) {
    for (uint32_t i = 0; i < head_dim / 2; i++) {
      x[2 * i] = dtype_f16_to_f32((uint16_t)row[i]);
      x[2 * i + 1] = dtype_f16_to_f32((uint16_t)(row[i] >> 16));
    }
    return;
  }
  uint32_t G = kv_group(head_dim), sw = scale_words(head_dim);
  const uint8_t *q = (const uint8_t *)(row + sw);
  for (uint32_t e = 0; e < head_dim; e++) {
    float d = get_scale(row, e / G);
    if (t == KV_Q8_0)
      x[e] = (float)(int8_t)q[e] * d;
    else
      x[e] = (float)((int)((row[sw + e / 8] >> (4 * (e % 8))) & 15u) - 8) * d;
  }
}
