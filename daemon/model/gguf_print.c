/* `kvd --model-info`: a readable listing of a GGUF file, in the spirit of gguf-dump.
 *
 * Everything printed comes from an already validated gguf_file, so this file only formats. Long
 * strings (chat templates) and long arrays (vocabularies) are abbreviated: a listing is for
 * reading, and a 150k-token vocabulary printed in full would bury the rest. */
#include "gguf.h"

#include <inttypes.h>

#define GGUF_PRINT_STR_MAX 64 /* bytes of a string shown before it is cut */
#define GGUF_PRINT_ARR_MAX 6  /* elements of an array shown before it is cut */

/* Writes s escaped (quotes, backslashes and control bytes; UTF-8 passes through so text reads as
 * text), cut after max bytes; returns the columns written, for padding. */
static int gguf__print_escaped(FILE *out, struct gguf_str s, uint64_t max) {
  uint64_t n = s.len < max ? s.len : max;
  int cols = 0;
  /* cut on a character boundary, not inside a UTF-8 sequence */
  while (n < s.len && n > 0 && ((unsigned char)s.ptr[n] & 0xc0) == 0x80)
    n--;
  for (uint64_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s.ptr[i];
    if (ch == '"' || ch == '\\') {
      fputc('\\', out);
      fputc(ch, out);
      cols += 2;
    } else if (ch == '\n') {
      fputs("\\n", out);
      cols += 2;
    } else if (ch < 0x20 || ch == 0x7f) {
      fprintf(out, "\\x%02x", ch);
      cols += 4;
    } else {
      fputc(ch, out);
      cols += (ch & 0xc0) != 0x80; /* count UTF-8 continuation bytes as no column */
    }
  }
  return cols;
}

static void gguf__print_str(FILE *out, struct gguf_str s, uint64_t max) {
  fputc('"', out);
  gguf__print_escaped(out, s, max);
  fputc('"', out);
  if (s.len > max) fprintf(out, "...(%" PRIu64 " bytes)", s.len);
}

static void gguf__print_value(FILE *out, const struct gguf_value *v) {
  switch (v->type) {
  case GGUF_VT_UINT8:
  case GGUF_VT_UINT16:
  case GGUF_VT_UINT32:
  case GGUF_VT_UINT64:
    fprintf(out, "%" PRIu64, v->v.u64);
    break;
  case GGUF_VT_INT8:
  case GGUF_VT_INT16:
  case GGUF_VT_INT32:
  case GGUF_VT_INT64:
    fprintf(out, "%" PRId64, v->v.i64);
    break;
  case GGUF_VT_FLOAT32:
    fprintf(out, "%.9g", v->v.f64);
    break;
  case GGUF_VT_FLOAT64:
    fprintf(out, "%.17g", v->v.f64);
    break;
  case GGUF_VT_BOOL:
    fputs(v->v.u64 ? "true" : "false", out);
    break;
  case GGUF_VT_STRING:
    gguf__print_str(out, v->v.str, GGUF_PRINT_STR_MAX);
    break;
  case GGUF_VT_ARRAY: {
    uint64_t n = v->v.arr.count;
    uint64_t show = n < GGUF_PRINT_ARR_MAX ? n : GGUF_PRINT_ARR_MAX;
    fputc('[', out);
    for (uint64_t i = 0; i < show; i++) {
      struct gguf_value e;
      if (i) fputs(", ", out);
      if (gguf_arr_get(v, i, &e) == 0)
        gguf__print_value(out, &e);
      else
        fputc('?', out);
    }
    if (show < n) fprintf(out, ", ... %" PRIu64 " more", n - show);
    fputc(']', out);
    break;
  }
  default:
    fputs("?", out);
  }
}

/* "array[string]", "array[array]" ... for the type column. */
static void gguf__type_label(const struct gguf_value *v, char *buf, size_t cap) {
  if (v->type == GGUF_VT_ARRAY)
    snprintf(buf, cap, "%s[%" PRIu64 "]", gguf_vtype_name(v->v.arr.type), v->v.arr.count);
  else
    snprintf(buf, cap, "%s", gguf_vtype_name(v->type));
}

static void gguf__print_bytes(FILE *out, uint64_t n) {
  if (n >= (1ull << 30))
    fprintf(out, "%" PRIu64 " bytes (%.2f GiB)", n, (double)n / (double)(1ull << 30));
  else if (n >= (1ull << 20))
    fprintf(out, "%" PRIu64 " bytes (%.2f MiB)", n, (double)n / (double)(1ull << 20));
  else if (n >= (1ull << 10))
    fprintf(out, "%" PRIu64 " bytes (%.1f KiB)", n, (double)n / (double)(1ull << 10));
  else
    fprintf(out, "%" PRIu64 " bytes", n);
}

void gguf_print_info(const struct gguf_file *f, FILE *out) {
  if (!f || !out) return;
  fprintf(out,
          "GGUF v%" PRIu32 ", %zu bytes, alignment %" PRIu64 ", tensor data at offset %" PRIu64
          "\n",
          f->version, f->size, f->alignment, f->data_offset);

  fprintf(out, "\n%" PRIu64 " metadata keys:\n", f->n_kv);
  for (uint64_t i = 0; i < f->n_kv; i++) {
    const struct gguf_kv *kv = &f->kv[i];
    char label[48];
    gguf__type_label(&kv->value, label, sizeof label);
    fprintf(out, "  %4" PRIu64 "  %-16s ", i, label);
    gguf__print_escaped(out, kv->key, UINT64_MAX);
    fputs(" = ", out);
    gguf__print_value(out, &kv->value);
    fputc('\n', out);
  }

  fprintf(out, "\n%" PRIu64 " tensors:\n", f->n_tensors);
  uint64_t count[DTYPE_MAX] = {0}, bytes[DTYPE_MAX] = {0};
  uint64_t total = 0, params = 0;
  for (uint64_t i = 0; i < f->n_tensors; i++) {
    const struct gguf_tensor *t = &f->tensors[i];
    char dims[96];
    int n = snprintf(dims, sizeof dims, "[");
    for (uint32_t d = 0; d < t->n_dims && n > 0 && (size_t)n < sizeof dims; d++)
      n += snprintf(dims + n, sizeof dims - (size_t)n, "%s%" PRIu64, d ? ", " : "", t->ne[d]);
    if (n > 0 && (size_t)n < sizeof dims) snprintf(dims + n, sizeof dims - (size_t)n, "]");
    fprintf(out, "  %4" PRIu64 "  ", i);
    for (int w = gguf__print_escaped(out, t->name, UINT64_MAX); w < 32; w++)
      fputc(' ', out);
    fprintf(out, " %-20s %-6s %12" PRIu64 " bytes  @ %" PRIu64 "\n", dims, dtype_name(t->type),
            t->nbytes, f->data_offset + t->offset);
    if ((unsigned)t->type < DTYPE_MAX) {
      count[t->type]++;
      bytes[t->type] += t->nbytes;
    }
    total += t->nbytes;
    params += gguf_tensor_nelements(t);
  }

  if (f->n_tensors) {
    fprintf(out, "\ntensor types:\n");
    for (unsigned ty = 0; ty < DTYPE_MAX; ty++) {
      if (!count[ty]) continue;
      fprintf(out, "  %-6s %5" PRIu64 " tensors  ", dtype_name(ty), count[ty]);
      gguf__print_bytes(out, bytes[ty]);
      fputc('\n', out);
    }
  }
  fprintf(out, "total: %" PRIu64 " tensors, %" PRIu64 " parameters, ", f->n_tensors, params);
  gguf__print_bytes(out, total);
  fputc('\n', out);
}
