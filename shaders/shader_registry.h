/* The SPIR-V modules compiled from the shaders/ .comp files at build time and embedded in the binary. */
#ifndef KVD_SHADER_REGISTRY_H
#define KVD_SHADER_REGISTRY_H

#include <stddef.h>
#include <stdint.h>

struct shader_spirv {
  const char *name;     /* variant name from the table in shaders/meson.build */
  const uint32_t *code; /* SPIR-V words */
  size_t size;          /* bytes */
};

extern const size_t shader_spirv_count;
/* NULL when no variant has that name. */
const struct shader_spirv *shader_spirv_find(const char *name);
const struct shader_spirv *shader_spirv_at(size_t i);

#endif
