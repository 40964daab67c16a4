/* kvctl internals: options and exit codes shared by kvctl.c (commands) and kvctl_gen.c
 * (generation and chat, the two commands that stream and take Ctrl-C). */
#ifndef KVCTL_H
#define KVCTL_H

#include "kvd.h"

#include <stdbool.h>
#include <stddef.h>

/* Exit codes, part of kvctl's interface: scripts rely on them (see --help and client/README.md). */
enum {
  KVCTL_OK = 0,
  KVCTL_EFAIL = 1,    /* the request failed: kvd refused it or the generation ended in error */
  KVCTL_EUSAGE = 2,   /* bad command line */
  KVCTL_ECONNECT = 3, /* cannot connect to kvd (not running, no permission, no answer) */
  KVCTL_EINTR = 4,    /* interrupted (Ctrl-C) or cancelled */
  KVCTL_ELOST = 5,    /* the connection to kvd was lost in the middle of a request */
};

#define KVCTL_MAX_STOP 64 /* more than the protocol's IPC_MAX_STOP_STRINGS: kvd says no, not us */

struct kvctl_opts {
  const char *socket;
  struct kvd_gen_params gen;
  const char *stop[KVCTL_MAX_STOP];
  const char *name;   /* load --name */
  const char *system; /* chat --system */
  const char *session; /* chat --session: the saved session to resume and keep saving */
  const char *chat_template; /* load --chat-template */
  const char *kv_type;       /* load --kv-type */
  bool raw;           /* send PROMPT as it is, not as a chat message */
  bool json;
  bool verbose;
};

/* Prints "kvctl: " and the client's last error to stderr; returns the exit code for it. */
int kvctl_fail(struct kvd_client *c, int rc);

/* kvctl_gen.c */
int kvctl_generate(struct kvd_client *c, const struct kvctl_opts *o, const char *prompt);
int kvctl_chat(struct kvd_client *c, const struct kvctl_opts *o);

#endif
