#include "ref_json.h"

#include "kt.h"

#include <stdio.h>
#include <stdlib.h>

cJSON *ref_json_load(const char *rel) {
  const char *path = kt_shared_path(rel);
  if (!path) return NULL;
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *text = n >= 0 ? malloc((size_t)n + 1) : NULL;
  cJSON *j = NULL;
  if (text && fread(text, 1, (size_t)n, f) == (size_t)n) {
    text[n] = 0;
    j = cJSON_Parse(text);
  }
  free(text);
  fclose(f);
  return j;
}

int32_t *ref_json_ids(const cJSON *obj, const char *key, uint32_t *n) {
  const cJSON *a = cJSON_GetObjectItemCaseSensitive(obj, key), *x;
  int size = cJSON_GetArraySize(a);
  *n = size > 0 ? (uint32_t)size : 0;
  int32_t *ids = malloc((*n + 1) * sizeof *ids);
  if (!ids) return NULL;
  uint32_t i = 0;
  cJSON_ArrayForEach(x, a) ids[i++] = (int32_t)x->valuedouble;
  return ids;
}
