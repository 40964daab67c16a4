/* The error table: every code has a message and a wire code that maps back to it. */
#include "kt.h"
#include "kvd_error.h"

#include <string.h>

static const int all_codes[] = {
#define X(name, value, wire, msg) value,
    KVD_ERROR_TABLE(X)
#undef X
};

KT_TEST(every_code_round_trips_through_the_wire) {
  for (size_t i = 0; i < sizeof all_codes / sizeof all_codes[0]; i++) {
    int c = all_codes[i];
    KT_ASSERT(kvd_strerror(c) != NULL && strlen(kvd_strerror(c)) > 0);
    KT_ASSERT_EQ(kvd_error_from_wire(kvd_error_to_wire(c)), c);
  }
}

KT_TEST(wire_codes_are_unique) {
  size_t n = sizeof all_codes / sizeof all_codes[0];
  for (size_t i = 0; i < n; i++)
    for (size_t j = i + 1; j < n; j++)
      KT_CHECK(kvd_error_to_wire(all_codes[i]) != kvd_error_to_wire(all_codes[j]));
}

KT_TEST(unknown_codes_have_text) {
  KT_ASSERT_STREQ(kvd_strerror(-5555), "unknown error");
  KT_ASSERT_EQ(kvd_error_to_wire(-5555), 999);
  KT_ASSERT_EQ(kvd_error_from_wire(12345), KVD_EPROTO);
  /* An errno outside the table still gets libc's text rather than "unknown". */
  KT_ASSERT(strlen(kvd_strerror(-EPIPE)) > 0);
}
