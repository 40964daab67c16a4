#include "kvd_config.h"
#include <stdio.h>
int main(void) {
  printf("kvd %s\n", KVD_VERSION);
  return 0;
}
