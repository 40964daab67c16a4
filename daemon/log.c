#include "log.h"

#include <stdarg.h>
#include <stdio.h>

static int max_level = LOG_LVL_INFO;

void log_set_level(int level) {
  max_level = level;
}

void log_msg(int level, const char *fmt, ...) {
  if (level > max_level) return;
  char line[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  /* One fprintf per line so concurrent threads never interleave inside a line. */
  fprintf(stderr, "<%d>kvd: %s\n", level, line);
}
