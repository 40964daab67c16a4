/* Named arguments: typed accessors over a params map, and the generic validation driven by the
 * method table that gen_api.py generates from api.json. The error messages are written for the
 * person reading the client's error, so they name the key and what it should have been. */
#include "ipc.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int ipc_err_set(struct ipc_err *err, int code, const char *fmt, ...) {
  if (err) {
    va_list ap;
    err->code = code;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
  }
  return code;
}

const char *ipc_type_phrase(enum ipc_type t) {
  switch (t) {
  case IPC_T_ANY:
    return "any value";
  case IPC_T_STR:
    return "a string";
  case IPC_T_UINT:
    return "an unsigned integer";
  case IPC_T_INT:
    return "an integer";
  case IPC_T_FLOAT:
    return "a finite number";
  case IPC_T_BOOL:
    return "a boolean";
  case IPC_T_MAP:
    return "a map";
  case IPC_T_ARRAY:
    return "an array";
  case IPC_T_STRS:
    return "an array of strings";
  case IPC_T_UINTS:
    return "an array of unsigned integers";
  case IPC_T_MAPS:
    return "an array of maps";
  }
  return "?";
}

const msgpack_object *ipc_map_find(const msgpack_object *map, const char *key) {
  if (!map || map->type != MSGPACK_OBJECT_MAP) return NULL;
  size_t n = strlen(key);
  for (uint32_t i = 0; i < map->via.map.size; i++) {
    const msgpack_object *k = &map->via.map.ptr[i].key;
    if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == n &&
        memcmp(k->via.str.ptr, key, n) == 0)
      return &map->via.map.ptr[i].val;
  }
  return NULL;
}

static bool is_number(const msgpack_object *v) {
  switch (v->type) {
  case MSGPACK_OBJECT_POSITIVE_INTEGER:
  case MSGPACK_OBJECT_NEGATIVE_INTEGER:
    return true;
  case MSGPACK_OBJECT_FLOAT32:
  case MSGPACK_OBJECT_FLOAT64:
    return isfinite(v->via.f64);
  default:
    return false;
  }
}

static msgpack_object_type item_type(enum ipc_type t) {
  return t == IPC_T_STRS    ? MSGPACK_OBJECT_STR
         : t == IPC_T_UINTS ? MSGPACK_OBJECT_POSITIVE_INTEGER
                            : MSGPACK_OBJECT_MAP;
}

/* Whether v holds type t; for arrays of one kind, *ret_bad is the first item that does not. */
static bool has_type(const msgpack_object *v, enum ipc_type t, uint32_t *ret_bad) {
  switch (t) {
  case IPC_T_ANY:
    return true;
  case IPC_T_STR:
    return v->type == MSGPACK_OBJECT_STR;
  case IPC_T_UINT:
    return v->type == MSGPACK_OBJECT_POSITIVE_INTEGER;
  case IPC_T_INT:
    return v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER ||
           (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER && v->via.u64 <= INT64_MAX);
  case IPC_T_FLOAT:
    return is_number(v);
  case IPC_T_BOOL:
    return v->type == MSGPACK_OBJECT_BOOLEAN;
  case IPC_T_MAP:
    return v->type == MSGPACK_OBJECT_MAP;
  case IPC_T_ARRAY:
    return v->type == MSGPACK_OBJECT_ARRAY;
  case IPC_T_STRS:
  case IPC_T_UINTS:
  case IPC_T_MAPS:
    if (v->type != MSGPACK_OBJECT_ARRAY) return false;
    for (uint32_t i = 0; i < v->via.array.size; i++) {
      if (v->via.array.ptr[i].type != item_type(t)) {
        *ret_bad = i;
        return false;
      }
    }
    return true;
  }
  return false;
}

/* Checks one value against a type; noun says what it is ("param", "result key"). */
static int check(const msgpack_object *v, const char *noun, const char *key, enum ipc_type t,
                 int code, struct ipc_err *err) {
  uint32_t bad = UINT32_MAX;
  if (has_type(v, t, &bad)) return 0;
  if (bad != UINT32_MAX)
    return ipc_err_set(err, code, "%s '%s' must be %s (item %u is not)", noun, key,
                       ipc_type_phrase(t), bad);
  if (t == IPC_T_INT && v->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
    return ipc_err_set(err, KVD_ERANGE, "%s '%s' is out of range for a 64-bit integer", noun, key);
  return ipc_err_set(err, code, "%s '%s' must be %s", noun, key, ipc_type_phrase(t));
}

/* The shared part of every accessor: 0 when absent or nil, 1 and *ret when present and of type t,
 * or the error. */
static int get(const msgpack_object *map, const char *key, enum ipc_type t,
               const msgpack_object **ret, struct ipc_err *err) {
  const msgpack_object *v = ipc_map_find(map, key);
  if (!v || v->type == MSGPACK_OBJECT_NIL) return 0;
  int rc = check(v, "param", key, t, KVD_EINVAL, err);
  if (rc < 0) return rc;
  *ret = v;
  return 1;
}

int ipc_get_str(const msgpack_object *map, const char *key, const char **ret_s, size_t *ret_len,
                struct ipc_err *err) {
  const msgpack_object *v;
  int rc = get(map, key, IPC_T_STR, &v, err);
  if (rc <= 0) return rc;
  *ret_s = v->via.str.ptr;
  if (ret_len) *ret_len = v->via.str.size;
  return 1;
}

int ipc_get_u64(const msgpack_object *map, const char *key, uint64_t *ret, struct ipc_err *err) {
  const msgpack_object *v;
  int rc = get(map, key, IPC_T_UINT, &v, err);
  if (rc <= 0) return rc;
  *ret = v->via.u64;
  return 1;
}

int ipc_get_u32(const msgpack_object *map, const char *key, uint32_t *ret, struct ipc_err *err) {
  const msgpack_object *v;
  int rc = get(map, key, IPC_T_UINT, &v, err);
  if (rc <= 0) return rc;
  if (v->via.u64 > UINT32_MAX)
    return ipc_err_set(err, KVD_ERANGE, "param '%s' must be below 2^32", key);
  *ret = (uint32_t)v->via.u64;
  return 1;
}

int ipc_get_i64(const msgpack_object *map, const char *key, int64_t *ret, struct ipc_err *err) {
  const msgpack_object *v;
  int rc = get(map, key, IPC_T_INT, &v, err);
  if (rc <= 0) return rc;
  *ret = v->via.i64;
  return 1;
}

int ipc_get_f64(const msgpack_object *map, const char *key, double *ret, struct ipc_err *err) {
  const msgpack_object *v;
  int rc = get(map, key, IPC_T_FLOAT, &v, err);
  if (rc <= 0) return rc;
  if (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
    *ret = (double)v->via.u64;
  else if (v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
    *ret = (double)v->via.i64;
  else
    *ret = v->via.f64; /* msgpack-c widens float32 into f64 */
  return 1;
}

int ipc_get_bool(const msgpack_object *map, const char *key, bool *ret, struct ipc_err *err) {
  const msgpack_object *v;
  int rc = get(map, key, IPC_T_BOOL, &v, err);
  if (rc <= 0) return rc;
  *ret = v->via.boolean;
  return 1;
}

int ipc_get_map(const msgpack_object *map, const char *key, const msgpack_object **ret,
                struct ipc_err *err) {
  return get(map, key, IPC_T_MAP, ret, err);
}

static int get_items(const msgpack_object *map, const char *key, enum ipc_type t,
                     const msgpack_object **ret_items, size_t *ret_n, struct ipc_err *err) {
  const msgpack_object *v;
  int rc = get(map, key, t, &v, err);
  if (rc <= 0) return rc;
  *ret_items = v->via.array.ptr;
  *ret_n = v->via.array.size;
  return 1;
}

int ipc_get_array(const msgpack_object *map, const char *key, const msgpack_object **ret_items,
                  size_t *ret_n, struct ipc_err *err) {
  return get_items(map, key, IPC_T_ARRAY, ret_items, ret_n, err);
}

int ipc_get_strs(const msgpack_object *map, const char *key, const msgpack_object **ret_items,
                 size_t *ret_n, struct ipc_err *err) {
  return get_items(map, key, IPC_T_STRS, ret_items, ret_n, err);
}

int ipc_get_uints(const msgpack_object *map, const char *key, const msgpack_object **ret_items,
                  size_t *ret_n, struct ipc_err *err) {
  return get_items(map, key, IPC_T_UINTS, ret_items, ret_n, err);
}

int ipc_get_maps(const msgpack_object *map, const char *key, const msgpack_object **ret_items,
                 size_t *ret_n, struct ipc_err *err) {
  return get_items(map, key, IPC_T_MAPS, ret_items, ret_n, err);
}

/* Checks map against a field list: required present, declared ones of their type, one_of groups
 * with exactly one member present. */
static int validate(const struct ipc_method_desc *md, const struct ipc_field *f, size_t n,
                    unsigned n_groups, const msgpack_object *map, const char *noun, int code,
                    struct ipc_err *err) {
  uint8_t group_count[256] = {0};
  for (size_t i = 0; i < n; i++) {
    const msgpack_object *v = ipc_map_find(map, f[i].name);
    bool present = v && v->type != MSGPACK_OBJECT_NIL;
    if (!present) {
      if (f[i].required)
        return ipc_err_set(err, code, "%s: missing %s '%s'", md->name, noun, f[i].name);
      continue;
    }
    int rc = check(v, noun, f[i].name, f[i].type, code, err);
    if (rc < 0) return rc;
    if (f[i].one_of && group_count[f[i].one_of] < 255) group_count[f[i].one_of]++;
  }
  for (unsigned g = 1; g <= n_groups; g++) {
    if (group_count[g] == 1) continue;
    /* Name the group's members: "exactly one of 'prompt', 'messages'". */
    char names[96] = "";
    size_t used = 0;
    for (size_t i = 0; i < n && used < sizeof names; i++)
      if (f[i].one_of == g)
        used += (size_t)snprintf(names + used, sizeof names - used, "%s'%s'", used ? ", " : "",
                                 f[i].name);
    return ipc_err_set(err, code, "%s: exactly one of %s is required", md->name, names);
  }
  return 0;
}

int ipc_validate_params(const struct ipc_msg *m, struct ipc_err *err) {
  if (m->method_id < 0 || m->method_id >= IPC_M_COUNT)
    return ipc_err_set(err, KVD_E_NO_METHOD, "unknown method '%.64s'", m->method ? m->method : "");
  const struct ipc_method_desc *md = &ipc_methods[m->method_id];
  return validate(md, md->params, md->n_params, md->n_groups, m->params, "param", KVD_EINVAL, err);
}

int ipc_validate_result(enum ipc_method method, const msgpack_object *result, struct ipc_err *err) {
  if (method < 0 || method >= IPC_M_COUNT)
    return ipc_err_set(err, KVD_E_NO_METHOD, "unknown method");
  const struct ipc_method_desc *md = &ipc_methods[method];
  if (md->n_result > 0 && (!result || result->type != MSGPACK_OBJECT_MAP))
    return ipc_err_set(err, KVD_EPROTO, "%s: result must be a map", md->name);
  return validate(md, md->result, md->n_result, 0, result, "result key", KVD_EPROTO, err);
}
