// Reading one cache row in the cache's KV type (daemon/model/kv_format.h; exactly one of KV_F32,
// KV_F16, KV_Q8_0, KV_Q4_0 is defined). The includer declares the K and V buffers as
// `kv_word k_cache[]` / `v_cache[]`, and for k_dot (KV_DOT defined) a shared `qs[]` holding the
// query; rows start at a word index `rb`, the row's position in the cache times p.row_words.
#if defined(KV_F32)
#define kv_word float
#else
#define kv_word uint
#endif

#if defined(KV_Q8_0) || defined(KV_Q4_0)
// Words of f16 scales at the start of a row: one per two groups.
uint kv_scale_words() { return (p.head_dim / p.group + 1u) / 2u; }
float kv_scale(uint w, uint g) { return unpackHalf2x16(g % 2u == 0u ? w : w >> 16).x; }
#endif

// Element d of a row starting at word rb of buffer `buf`: KV_AT(v_at, v_cache) defines
// v_at(rb, d) over V, KV_AT(k_at, k_cache) k_at(rb, d) over K (the tiled kernel decodes K too).
#if defined(KV_F32)
#define KV_AT(name, buf) float name(uint rb, uint d) { return buf[rb + d]; }
#elif defined(KV_F16)
#define KV_AT(name, buf)                                                                         \
  float name(uint rb, uint d) {                                                                  \
    vec2 h = unpackHalf2x16(buf[rb + d / 2u]);                                                   \
    return (d & 1u) == 0u ? h.x : h.y;                                                           \
  }
#elif defined(KV_Q8_0)
#define KV_AT(name, buf)                                                                         \
  float name(uint rb, uint d) {                                                                  \
    uint g = d / p.group;                                                                        \
    float s = kv_scale(buf[rb + g / 2u], g);                                                     \
    return float(bitfieldExtract(int(buf[rb + kv_scale_words() + d / 4u]), int(8u * (d % 4u)),   \
                                 8)) * s;                                                        \
  }
#else
#define KV_AT(name, buf)                                                                         \
  float name(uint rb, uint d) {                                                                  \
    uint g = d / p.group;                                                                        \
    float s = kv_scale(buf[rb + g / 2u], g);                                                     \
    uint q = bitfieldExtract(buf[rb + kv_scale_words() + d / 8u], int(4u * (d % 8u)), 4);         \
    return (float(q) - 8.0) * s;                                                                 \
  }
#endif

KV_AT(v_at, v_cache)

#ifdef KV_DOT
// q . K row rb, the query in qs[0 .. head_dim), decoding a word at a time.
float k_dot(uint rb) {
  float s = 0.0;
#if defined(KV_F32)
  for (uint d = 0u; d < p.head_dim; d++) s += qs[d] * k_cache[rb + d];
#elif defined(KV_F16)
  for (uint w = 0u; w < p.head_dim / 2u; w++) {
    vec2 h = unpackHalf2x16(k_cache[rb + w]);
    s += qs[2u * w] * h.x + qs[2u * w + 1u] * h.y;
  }
#else
  uint sw = kv_scale_words();
#if defined(KV_Q8_0)
  const uint PER_WORD = 4u, BITS = 8u;
#else
  const uint PER_WORD = 8u, BITS = 4u;
#endif
  for (uint g = 0u; g < p.head_dim / p.group; g++) {
    float gs = 0.0;
    for (uint w = g * p.group / PER_WORD; w < (g + 1u) * p.group / PER_WORD; w++) {
      uint word = k_cache[rb + sw + w];
      for (uint i = 0u; i < PER_WORD; i++) {
#if defined(KV_Q8_0)
        float q = float(bitfieldExtract(int(word), int(BITS * i), int(BITS)));
#else
        float q = float(bitfieldExtract(word, int(BITS * i), int(BITS))) - 8.0;
#endif
        gs += qs[w * PER_WORD + i] * q;
      }
    }
    s += gs * kv_scale(k_cache[rb + g / 2u], g);
  }
#endif
  return s;
}
#endif
