/* hello_kvd: the smallest useful libkvd program. Connects to kvd, streams a completion of the
 * prompt given on the command line to stdout, and prints how it ended.
 *
 *   cc hello_kvd.c $(pkg-config --cflags --libs libkvd) -o hello_kvd
 *   ./hello_kvd "Once upon a time"
 */
#include <kvd.h>

#include <stdio.h>

/* Each piece of text as it is generated; returning nonzero would cancel. */
static int on_chunk(void *ud, const struct kvd_chunk *chunk) {
  (void)ud;
  fwrite(chunk->text, 1, chunk->text_len, stdout);
  fflush(stdout);
  return 0;
}

int main(int argc, char **argv) {
  struct kvd_client *c;
  int rc = kvd_client_connect(NULL, &c); /* $KVD_SOCKET or the default socket */
  if (rc < 0) {
    fprintf(stderr, "hello_kvd: %s\n", kvd_client_last_error(NULL));
    return 3;
  }
  printf("connected to kvd %s\n", kvd_client_server_version(c));

  struct kvd_gen_params p;
  kvd_gen_params_init(&p); /* everything unset: the server's defaults */
  p.prompt = argc > 1 ? argv[1] : "Once upon a time";
  p.max_tokens = 64;
  p.temperature = 0.7;

  struct kvd_gen_result *r;
  rc = kvd_generate(c, &p, on_chunk, NULL, &r);
  if (rc < 0) {
    fprintf(stderr, "\nhello_kvd: %s (%s)\n", kvd_client_last_error(c), kvd_strerror(rc));
    kvd_client_close(c);
    return 1;
  }
  printf("\n[%s: %llu prompt tokens, %llu generated, %.1f tokens/s]\n", r->finish_reason,
         (unsigned long long)r->prompt_tokens, (unsigned long long)r->completion_tokens,
         r->timings.tokens_per_s);
  kvd_gen_result_free(r);
  kvd_client_close(c);
  return 0;
}
