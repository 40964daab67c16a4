/* Logging for main and server only (library modules return codes instead): one line per event to
 * stderr with a "<N>" syslog-level prefix, which journald turns into the entry's priority. */
#ifndef KVD_LOG_H
#define KVD_LOG_H

enum {
  LOG_LVL_ERR = 3,
  LOG_LVL_WARNING = 4,
  LOG_LVL_NOTICE = 5,
  LOG_LVL_INFO = 6,
  LOG_LVL_DEBUG = 7
};

void log_set_level(int level);
void log_msg(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_err(...) log_msg(LOG_LVL_ERR, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_LVL_WARNING, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LVL_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_LVL_DEBUG, __VA_ARGS__)

#endif
