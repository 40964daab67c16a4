/* gen_model: writes a synthetic llama-architecture GGUF of any shape with deterministic random
 * weights. A thin command line over synth_write_file() (daemon/model/synth.h). */
#include "kvd_error.h"
#include "synth.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static void usage(FILE *out) {
  fprintf(
      out,
      "usage: gen_model [options] --out FILE\n"
      "Writes a llama-architecture GGUF with deterministic random weights.\n"
      "  --dim N        embedding width (default 64)\n"
      "  --layers N     decoder blocks (default 5)\n"
      "  --heads N      query heads; dim/heads is the head dim, even (default 8)\n"
      "  --kv-heads N   key/value heads, dividing heads (default 4)\n"
      "  --ffn N        feed-forward width (default 172)\n"
      "  --vocab N      vocabulary size, at least 259 (default 512)\n"
      "  --ctx N        context length (default 512)\n"
      "  --type T       matrix type: f32 f16 bf16 q8_0 q4_0 (default f32); a matrix whose rows\n"
      "                 are not whole blocks of T is written as f16\n"
      "  --seed N       weight seed (default 1)\n"
      "  --tied         no output.weight (the classifier reuses token_embd)\n"
      "  --name S       general.name (default kvd-synthetic)\n"
      "  --chat-template S  tokenizer.chat_template (default: none)\n"
      "  --out FILE     where to write (required)\n");
}

static int parse_u64(const char *opt, const char *s, uint64_t max, uint64_t *ret) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 0);
  if (errno || end == s || *end || s[0] == '-' || v > max) {
    fprintf(stderr, "gen_model: %s: bad value '%s'\n", opt, s);
    return -1;
  }
  *ret = v;
  return 0;
}

int main(int argc, char **argv) {
  struct synth_params p;
  synth_params_default(&p);
  const char *out = NULL;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      usage(stdout);
      return 0;
    }
    if (strcmp(a, "--tied") == 0) {
      p.tied = true;
      continue;
    }
    if (i + 1 >= argc) {
      fprintf(stderr, "gen_model: %s needs a value (see --help)\n", a);
      return 2;
    }
    const char *v = argv[++i];
    uint64_t x = 0;
    uint32_t *u32 = NULL;
    if (strcmp(a, "--dim") == 0)
      u32 = &p.dim;
    else if (strcmp(a, "--layers") == 0)
      u32 = &p.n_layers;
    else if (strcmp(a, "--heads") == 0)
      u32 = &p.n_heads;
    else if (strcmp(a, "--kv-heads") == 0)
      u32 = &p.n_kv_heads;
    else if (strcmp(a, "--ffn") == 0)
      u32 = &p.ffn;
    else if (strcmp(a, "--vocab") == 0)
      u32 = &p.vocab;
    else if (strcmp(a, "--ctx") == 0)
      u32 = &p.ctx;
    if (u32) {
      if (parse_u64(a, v, UINT32_MAX, &x) < 0) return 2;
      *u32 = (uint32_t)x;
    } else if (strcmp(a, "--seed") == 0) {
      if (parse_u64(a, v, UINT64_MAX, &p.seed) < 0) return 2;
    } else if (strcmp(a, "--type") == 0) {
      static const struct {
        const char *name;
        enum dtype type;
      } types[] = {{"f32", DTYPE_F32},
                   {"f16", DTYPE_F16},
                   {"bf16", DTYPE_BF16},
                   {"q8_0", DTYPE_Q8_0},
                   {"q4_0", DTYPE_Q4_0}};
      size_t k = 0;
      while (k < sizeof types / sizeof types[0] && strcmp(types[k].name, v) != 0)
        k++;
      if (k == sizeof types / sizeof types[0]) {
        fprintf(stderr, "gen_model: --type: '%s' is not one of f32 f16 bf16 q8_0 q4_0\n", v);
        return 2;
      }
      p.type = types[k].type;
    } else if (strcmp(a, "--name") == 0) {
      p.name = v;
    } else if (strcmp(a, "--chat-template") == 0) {
      p.chat_template = v;
    } else if (strcmp(a, "--out") == 0) {
      out = v;
    } else {
      fprintf(stderr, "gen_model: unknown option %s (see --help)\n", a);
      return 2;
    }
  }
  if (!out) {
    fprintf(stderr, "gen_model: --out FILE is required (see --help)\n");
    return 2;
  }
  char why[160];
  if (synth_check(&p, why, sizeof why) < 0) {
    fprintf(stderr, "gen_model: %s\n", why);
    return 2;
  }
  int rc = synth_write_file(&p, out);
  if (rc < 0) {
    fprintf(stderr, "gen_model: writing %s: %s\n", out, kvd_strerror(rc));
    return 1;
  }
  struct stat st;
  if (stat(out, &st) == 0)
    printf("gen_model: wrote %s (%lld bytes, %u layers, dim %u, vocab %u, %s)\n", out,
           (long long)st.st_size, p.n_layers, p.dim, p.vocab, dtype_name((uint32_t)p.type));
  return 0;
}
