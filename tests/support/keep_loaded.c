/* Preloaded into every test under AddressSanitizer: dlclose() keeps the library mapped.
 *
 * The Vulkan loader unloads the driver (lavapipe) when the instance is destroyed; memory the
 * driver still reaches only from its own globals then looks leaked to LeakSanitizer, which runs
 * at exit after the unmapping and can no longer even name the module (a "<unknown module>"
 * frame that no suppression can match). Keeping the module mapped lets LeakSanitizer see those
 * references, so what it reports is ours. kvd itself never needs this. */
#include <stddef.h>

int dlclose(void *handle);

__attribute__((visibility("default"))) int dlclose(void *handle) {
  (void)handle;
  return 0;
}
