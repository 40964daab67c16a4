/* Push-constant structs are written in the common subset of C and GLSL and included by both sides,
 * so the host and the shader can never disagree about a layout. PC_ASSERT_SIZE carries its own
 * semicolon because GLSL rejects a stray one. Only 32-bit scalar members: std430
 * (GLSL push constants) and C then lay them out identically. */
#ifndef KVD_PC_COMMON_H
#define KVD_PC_COMMON_H
#ifndef VULKAN
#include <stdint.h>
typedef uint32_t uint;
#define PC_ASSERT_SIZE(type, bytes) _Static_assert(sizeof(struct type) == (bytes), #type " size");
#else
#define PC_ASSERT_SIZE(type, bytes)
#endif
#endif
