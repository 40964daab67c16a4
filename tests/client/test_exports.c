/* The shared library exports the kvd_ API and nothing else: not the ipc codec linked into it, not
 * libkvd's internal kvd__ helpers. Checked twice: through the dynamic linker (dlopen + dlsym) and
 * in the dynamic symbol table as `nm -D --defined-only` lists it. $LIBKVD_SO is set by meson. */
#include "kt.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *so_path(void) {
  return getenv("LIBKVD_SO");
}

KT_TEST(dlsym_finds_api_not_internals) {
  const char *so = so_path();
  KT_ASSERT_MSG(so, "LIBKVD_SO is not set");
  void *h = dlopen(so, RTLD_NOW | RTLD_LOCAL);
  KT_ASSERT_MSG(h, "dlopen: %s", dlerror());
  static const char *const api[] = {
      "kvd_client_connect",
      "kvd_client_close",
      "kvd_client_last_error",
      "kvd_generate",
      "kvd_generate_async",
      "kvd_chat",
      "kvd_cancel",
      "kvd_client_fd",
      "kvd_client_process",
      "kvd_client_want_write",
      "kvd_client_flush",
      "kvd_tokenize",
      "kvd_detokenize",
      "kvd_status",
      "kvd_models_list",
      "kvd_models_load",
      "kvd_models_load_opts",
      "kvd_models_unload",
      "kvd_session_open",
      "kvd_session_close",
      "kvd_session_fork",
      "kvd_gen_result_free",
      "kvd_strerror",
      "kvd_client_server_version",
      "kvd_gen_params_init",
      "kvd_library_version",
  };
  for (size_t i = 0; i < sizeof api / sizeof api[0]; i++)
    KT_CHECK_MSG(dlsym(h, api[i]) != NULL, "%s is not exported", api[i]);
  static const char *const hidden[] = {
      "ipc_dec_init", "ipc_dec_next", "ipc_w_init",        "ipc_w_end",
      "ipc_map_find", "ipc_methods",  "ipc_method_lookup", "ipc_validate_result",
      "kvd__begin",   "kvd__json",    "kvd__buf_add",
  };
  for (size_t i = 0; i < sizeof hidden / sizeof hidden[0]; i++)
    KT_CHECK_MSG(dlsym(h, hidden[i]) == NULL, "%s leaks out of libkvd", hidden[i]);
  dlclose(h);
}

KT_TEST(nm_lists_only_kvd_symbols) {
  const char *so = so_path();
  KT_ASSERT_MSG(so, "LIBKVD_SO is not set");
  char cmd[1024];
  snprintf(cmd, sizeof cmd, "nm -D --defined-only '%s' 2>&1", so);
  FILE *p = popen(cmd, "r");
  KT_ASSERT(p);
  char line[512];
  int n = 0, bad = 0;
  while (fgets(line, sizeof line, p)) {
    char addr[64], type[8], name[400];
    if (sscanf(line, "%63s %7s %399s", addr, type, name) != 3) {
      kt_log("nm: %s", line);
      bad++;
      continue;
    }
    n++;
    if (strncmp(name, "kvd_", 4) != 0 || !strncmp(name, "kvd__", 5)) {
      kt_log("exported: %s %s", type, name);
      bad++;
    }
  }
  int st = pclose(p);
  KT_CHECK_MSG(st == 0, "nm failed (%d)", st);
  KT_CHECK_EQ(bad, 0);
  KT_CHECK_MSG(n >= 30, "only %d symbols", n);
}

KT_TEST(soname_is_libkvd_so_0) {
  const char *so = so_path();
  KT_ASSERT_MSG(so, "LIBKVD_SO is not set");
  char cmd[1024];
  snprintf(cmd, sizeof cmd, "readelf -d '%s' 2>&1", so);
  FILE *p = popen(cmd, "r");
  KT_ASSERT(p);
  char line[512];
  bool found = false;
  while (fgets(line, sizeof line, p))
    if (strstr(line, "(SONAME)") && strstr(line, "[libkvd.so.0]")) found = true;
  pclose(p);
  KT_CHECK(found);
}
