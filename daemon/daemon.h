/* The daemon proper: owns the device, then the models and the server on it, and runs the loop
 * until a drain has finished. main.c parses options and picks this or a one-shot mode. */
#ifndef KVD_DAEMON_H
#define KVD_DAEMON_H

#include "config.h"

/* 0 after a clean drain, 1 when the device, the startup model or the socket failed. */
int daemon_serve(const struct kvd_config *cfg);

#endif
