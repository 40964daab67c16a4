/* The shared folder's JSON references (../shared/models/...), for the GPU tests. */
#ifndef KVD_TESTS_REF_JSON_H
#define KVD_TESTS_REF_JSON_H

#include <cjson/cJSON.h>
#include <stdint.h>

/* The parsed file at models-relative path rel under ../shared, or NULL (absent or not JSON). */
cJSON *ref_json_load(const char *rel);
/* obj[key] as a malloc'd id array (one spare slot), its length in *n. */
int32_t *ref_json_ids(const cJSON *obj, const char *key, uint32_t *n);

#endif
