/* kvctl's generation and chat: the two commands that stream text and must stay responsive to
 * Ctrl-C while kvd works. Both run the generation through libkvd's event-loop API, in a poll()
 * over the client's socket and a self-pipe written by the signal handler: the first Ctrl-C sends
 * `cancel` and waits (briefly) for kvd to end the generation cleanly, a second one leaves at once
 * (closing the connection cancels on the server too). */
#include "kvctl.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <histedit.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

/* How long kvd gets to honour a cancel before kvctl stops waiting. */
#define CANCEL_GRACE_MS 5000

static int sig_pipe[2] = {-1, -1};
static volatile sig_atomic_t sig_count;

static void on_signal(int sig) {
  (void)sig;
  int e = errno;
  sig_count++;
  if (write(sig_pipe[1], "", 1) < 0) { /* the pipe is full: a wakeup is pending anyway */
  }
  errno = e;
}

/* SIGINT and SIGTERM wake the poll loop instead of killing kvctl. No SA_RESTART: a blocking read
 * of the chat prompt must return to notice them. */
static int signals_init(void) {
  if (sig_pipe[0] >= 0) return 0;
  if (pipe2(sig_pipe, O_NONBLOCK | O_CLOEXEC) < 0) return -1;
  struct sigaction sa = {.sa_handler = on_signal};
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  return 0;
}

static void drain_sig_pipe(void) {
  char buf[64];
  while (read(sig_pipe[0], buf, sizeof buf) > 0) {
  }
}

static long long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- Output -------------------------------------------------------------------------------- */

/* One generation's state, shared by the callbacks and the loop. */
struct run {
  const struct kvctl_opts *o;
  bool done;
  int rc;
  enum kvd_finish finish;
  bool chat; /* end the answer with a newline even off a terminal: the next turn follows */
  char last; /* last byte written to stdout, to end the answer with a newline */
};

static int on_chunk(void *ud, const struct kvd_chunk *ch) {
  struct run *r = ud;
  if (ch->text_len) {
    fwrite(ch->text, 1, ch->text_len, stdout);
    fflush(stdout);
    r->last = ch->text[ch->text_len - 1];
  }
  return 0;
}

static cJSON *json_logprobs(const struct kvd_gen_result *res) {
  cJSON *a = cJSON_CreateArray();
  for (size_t i = 0; a && i < res->n_logprobs; i++) {
    const struct kvd_logprob *lp = &res->logprobs[i];
    cJSON *o = cJSON_CreateObject(), *top = cJSON_CreateArray();
    cJSON_AddNumberToObject(o, "id", lp->id);
    cJSON_AddStringToObject(o, "text", lp->text ? lp->text : "");
    cJSON_AddNumberToObject(o, "logprob", lp->logprob);
    for (size_t j = 0; j < lp->n_top; j++) {
      cJSON *t = cJSON_CreateObject();
      cJSON_AddNumberToObject(t, "id", lp->top[j].id);
      cJSON_AddNumberToObject(t, "logprob", lp->top[j].logprob);
      cJSON_AddItemToArray(top, t);
    }
    cJSON_AddItemToObject(o, "top", top);
    cJSON_AddItemToArray(a, o);
  }
  return a;
}

/* The whole result as one line of JSON on stdout (--json). */
static void print_json(const struct kvd_gen_result *res) {
  cJSON *o = cJSON_CreateObject(), *t = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "text", res->text ? res->text : "");
  cJSON_AddStringToObject(o, "finish_reason", res->finish_reason ? res->finish_reason : "error");
  cJSON_AddNumberToObject(o, "prompt_tokens", (double)res->prompt_tokens);
  cJSON_AddNumberToObject(o, "completion_tokens", (double)res->completion_tokens);
  cJSON_AddNumberToObject(o, "cached_tokens", (double)res->cached_tokens);
  cJSON_AddNumberToObject(t, "queue_ms", res->timings.queue_ms);
  cJSON_AddNumberToObject(t, "prefill_ms", res->timings.prefill_ms);
  cJSON_AddNumberToObject(t, "decode_ms", res->timings.decode_ms);
  cJSON_AddNumberToObject(t, "ttft_ms", res->timings.ttft_ms);
  cJSON_AddNumberToObject(t, "tokens_per_s", res->timings.tokens_per_s);
  cJSON_AddNumberToObject(t, "draft_tokens", (double)res->draft_tokens);
  cJSON_AddNumberToObject(t, "accepted_tokens", (double)res->accepted_tokens);
  cJSON_AddItemToObject(o, "timings", t);
  if (res->n_logprobs) cJSON_AddItemToObject(o, "logprobs", json_logprobs(res));
  if (res->error) {
    cJSON *e = cJSON_CreateObject();
    cJSON_AddNumberToObject(e, "code", kvd_error_to_wire(res->error));
    cJSON_AddStringToObject(e, "message", res->error_message ? res->error_message : "");
    cJSON_AddItemToObject(o, "error", e);
  }
  char *s = cJSON_PrintUnformatted(o);
  if (s) printf("%s\n", s);
  fflush(stdout);
  cJSON_free(s);
  cJSON_Delete(o);
}

/* --logprobs without --json: one line per token on stderr, so stdout stays the plain text. */
static void print_logprobs(const struct kvd_gen_result *res) {
  for (size_t i = 0; i < res->n_logprobs; i++) {
    const struct kvd_logprob *lp = &res->logprobs[i];
    fprintf(stderr, "%8u %10.4f  ", lp->id, lp->logprob);
    for (const char *s = lp->text ? lp->text : ""; *s; s++)
      fprintf(stderr, (unsigned char)*s < 0x20 ? "\\x%02x" : "%c", (unsigned char)*s);
    for (size_t j = 0; j < lp->n_top; j++)
      fprintf(stderr, "%s%u:%.3f", j ? " " : "  | ", lp->top[j].id, lp->top[j].logprob);
    fputc('\n', stderr);
  }
}

static void on_done(void *ud, int rc, const struct kvd_gen_result *res) {
  struct run *r = ud;
  r->done = true;
  r->rc = rc;
  r->finish = res->finish;
  if (r->o->json) {
    print_json(res);
  } else {
    if (r->last && r->last != '\n' && (isatty(STDOUT_FILENO) || r->chat)) {
      putchar('\n');
      r->last = '\n';
    }
    fflush(stdout);
    if (r->o->gen.logprobs) print_logprobs(res);
  }
  if (res->finish == KVD_FINISH_ERROR)
    fprintf(stderr, "kvctl: %s\n", res->error_message ? res->error_message : "generation failed");
  /* Said once per chat: the session goes on, but what the model remembers has changed. */
  static bool told_forgetting;
  if (r->chat && res->context_shifts && !told_forgetting) {
    fprintf(stderr, "[the conversation outgrew the model's context: the oldest turns are being "
                    "forgotten]\n");
    told_forgetting = true;
  }
  /* Drafts are said only when there were some: they change the speed, never the text. */
  char spec[80] = "";
  if (res->draft_tokens)
    snprintf(spec, sizeof spec, "; drafted %llu, accepted %llu",
             (unsigned long long)res->draft_tokens, (unsigned long long)res->accepted_tokens);
  if (r->o->verbose && rc == 0)
    fprintf(stderr,
            "[%s: %llu prompt tokens (%llu cached), %llu generated; first token %.1f ms, "
            "%.1f tokens/s%s]\n",
            res->finish_reason, (unsigned long long)res->prompt_tokens,
            (unsigned long long)res->cached_tokens, (unsigned long long)res->completion_tokens,
            res->timings.ttft_ms, res->timings.tokens_per_s, spec);
}

/* ---- One generation ------------------------------------------------------------------------ */

/* Runs one generation to its end; returns kvctl's exit code for it. */
static int run_one(struct kvd_client *c, const struct kvctl_opts *o, const struct kvd_gen_params *p,
                   bool chat) {
  struct run r = {.o = o, .chat = chat};
  uint32_t id;
  if (signals_init() < 0) {
    perror("kvctl: pipe");
    return KVCTL_EFAIL;
  }
  drain_sig_pipe();
  sig_atomic_t seen = sig_count;
  int rc = kvd_generate_async(c, p, o->json ? NULL : on_chunk, on_done, &r, &id);
  if (rc < 0) return kvctl_fail(c, rc);
  long long deadline = -1;
  while (!r.done) {
    struct pollfd pf[2] = {
        {.fd = kvd_client_fd(c), .events = POLLIN | (kvd_client_want_write(c) ? POLLOUT : 0)},
        {.fd = sig_pipe[0], .events = POLLIN},
    };
    int timeout = -1;
    if (deadline >= 0) {
      long long left = deadline - now_ms();
      timeout = left > 0 ? (int)left : 0;
    }
    int n = poll(pf, 2, timeout);
    if (n < 0 && errno != EINTR) {
      perror("kvctl: poll");
      return KVCTL_EFAIL;
    }
    if (n == 0 && deadline >= 0) {
      fprintf(stderr, "\nkvctl: kvd did not stop the generation within %d s\n",
              CANCEL_GRACE_MS / 1000);
      return KVCTL_EINTR;
    }
    drain_sig_pipe();
    if (sig_count != seen) {
      seen = sig_count;
      if (deadline >= 0) { /* a second Ctrl-C: do not wait for kvd */
        if (!chat) fputc('\n', stdout);
        return KVCTL_EINTR;
      }
      kvd_cancel(c, id);
      deadline = now_ms() + CANCEL_GRACE_MS;
    }
    /* A failure ends the generation through on_done, which the loop then sees. */
    if (pf[0].revents & (POLLIN | POLLHUP | POLLERR)) kvd_client_process(c);
    if (pf[0].revents & POLLOUT) kvd_client_flush(c);
  }
  /* on_done has said what went wrong. */
  if (r.rc < 0) return kvd_client_connected(c) ? KVCTL_EFAIL : KVCTL_ELOST;
  if (r.finish == KVD_FINISH_CANCELLED) return KVCTL_EINTR;
  if (r.finish == KVD_FINISH_ERROR) return KVCTL_EFAIL;
  return KVCTL_OK;
}

/* Whether the model a request goes to (name, or the default when NULL) renders chat messages
 * with a template: 1 yes, 0 no (a plain model, or none of that name: the request itself will
 * say), or a negative code when the daemon cannot be asked. */
static int model_has_template(struct kvd_client *c, const char *name) {
  struct kvd_model_list *l;
  int rc = kvd_models_list(c, &l);
  if (rc < 0) return rc;
  int yes = 0;
  for (size_t i = 0; i < l->n; i++) {
    const struct kvd_model_info *m = &l->models[i];
    bool target = name ? m->name && strcmp(m->name, name) == 0 : m->is_default;
    if (target) yes = m->chat_template && strcmp(m->chat_template, "plain") != 0;
  }
  kvd_model_list_free(l);
  return yes;
}

int kvctl_generate(struct kvd_client *c, const struct kvctl_opts *o, const char *prompt) {
  struct kvd_gen_params p = o->gen;
  /* A question to a chat model goes through its template, as one user message after the
   * --system prompt; --raw (or a model without a template) sends the text as it is. */
  int chat = o->raw ? 0 : model_has_template(c, p.model);
  if (chat < 0) return kvctl_fail(c, chat);
  struct kvd_message msgs[2];
  size_t n = 0;
  if (chat) {
    if (o->system) msgs[n++] = (struct kvd_message){.role = "system", .content = o->system};
    msgs[n++] = (struct kvd_message){.role = "user", .content = prompt};
    p.messages = msgs;
    p.n_messages = n;
  } else {
    p.prompt = prompt;
  }
  return run_one(c, o, &p, false);
}

/* ---- Chat ---------------------------------------------------------------------------------- */

/* After a line is entered on a terminal, input that arrives within this long belongs to the same
 * paste: nobody types Enter and the next key within 15 ms, but a terminal may write a long paste
 * in several pieces. */
#define PASTE_GRACE_MS 15

static const char chat_help[] =
    "  /help           this list\n"
    "  /reset          forget the conversation: a new session (the --system prompt is sent again)\n"
    "  /quit, /exit    leave (so does Ctrl-D on an empty line)\n"
    "  //TEXT          send /TEXT (a line starting with one / is a command)\n"
    "Ctrl-C cancels the answer being written, or drops the line being typed. Lines pasted\n"
    "together are one turn.\n";

static const char *prompt_text = "> ";

static char *chat_prompt(EditLine *el) {
  (void)el;
  return (char *)prompt_text;
}

/* The terminal between two el_gets() calls. libedit puts the terminal in canonical mode when
 * el_gets() returns and prints the prompt of the next one before it leaves canonical mode; a
 * Ctrl-D typed in canonical mode (during an answer, or just after the prompt appears) becomes
 * the kernel's end-of-file mark, which libedit then reads as a NUL byte: the Ctrl-D is lost, and
 * libedit's handling of the NUL took the next Ctrl-D as a literal character, so the user could no
 * longer leave. Between reads kvctl keeps the terminal non-canonical and silent (keys typed ahead
 * wait as bytes, shown by libedit when it reads them) with signals on, so Ctrl-C still cancels. */
struct chat_tty {
  bool saved;
  struct termios orig;
};

static void chat_tty_between_reads(struct chat_tty *t) {
  if (!t->saved) return;
  struct termios raw = t->orig;
  raw.c_lflag &= ~(tcflag_t)(ICANON | ECHO | ECHOK | ECHONL | IEXTEN);
  raw.c_lflag |= ISIG;
  raw.c_cc[VMIN] = 1;
  raw.c_cc[VTIME] = 0;
  tcsetattr(STDIN_FILENO, TCSANOW, &raw);
}

static void chat_tty_restore(struct chat_tty *t) {
  if (t->saved) tcsetattr(STDIN_FILENO, TCSANOW, &t->orig);
}

/* Whether more input is waiting (or arrives within PASTE_GRACE_MS). */
static bool input_pending(void) {
  struct pollfd pf = {.fd = STDIN_FILENO, .events = POLLIN};
  int n;
  while ((n = poll(&pf, 1, PASTE_GRACE_MS)) < 0 && errno == EINTR) {
  }
  return n > 0 && (pf.revents & POLLIN);
}

/* A growable string. */
struct text {
  char *s;
  size_t len, cap;
};

static bool text_append(struct text *t, const char *sep, const char *s) {
  size_t a = strlen(sep), b = strlen(s);
  if (t->cap - t->len < a + b + 1) {
    size_t cap = t->cap ? t->cap : 256;
    while (cap - t->len < a + b + 1)
      cap *= 2;
    char *p = realloc(t->s, cap);
    if (!p) return false;
    t->s = p;
    t->cap = cap;
  }
  memcpy(t->s + t->len, sep, a);
  memcpy(t->s + t->len + a, s, b + 1);
  t->len += a + b;
  return true;
}

/* The next line of input without its newline: from libedit on a terminal, else plain stdin.
 * NULL at the end of input; *interrupted when Ctrl-C came instead of a line. */
static char *read_line(EditLine *el, struct chat_tty *tty, char **buf, size_t *cap,
                       bool *interrupted) {
  sig_atomic_t seen = sig_count;
  *interrupted = false;
  const char *line;
  if (el) {
    int count;
    line = el_gets(el, &count);
    chat_tty_between_reads(tty);
  } else {
    errno = 0;
    line = getline(buf, cap, stdin) < 0 ? NULL : *buf;
  }
  if (sig_count != seen) {
    drain_sig_pipe();
    *interrupted = true;
    return NULL;
  }
  if (!line) return NULL;
  if (line != *buf) { /* libedit's buffer: copy, the next el_gets overwrites it */
    size_t n = strlen(line) + 1;
    if (*cap < n) {
      char *p = realloc(*buf, n);
      if (!p) return NULL;
      *buf = p;
      *cap = n;
    }
    memcpy(*buf, line, n);
  }
  size_t n = strlen(*buf);
  while (n && ((*buf)[n - 1] == '\n' || (*buf)[n - 1] == '\r'))
    (*buf)[--n] = '\0';
  return *buf;
}

static int open_session(struct kvd_client *c, const struct kvctl_opts *o, uint64_t *ret) {
  int rc = kvd_session_open(c, o->gen.model, ret);
  return rc < 0 ? kvctl_fail(c, rc) : KVCTL_OK;
}

/* --session NAME: the saved conversation if there is one (*ret_resumed), else a new session. */
static int resume_session(struct kvd_client *c, const struct kvctl_opts *o, uint64_t *ret,
                          bool *ret_resumed) {
  *ret_resumed = false;
  if (!o->session) return open_session(c, o, ret);
  uint64_t tokens = 0;
  int rc = kvd_session_restore(c, o->session, o->gen.model, ret, &tokens);
  if (rc == KVD_ENOENT) return open_session(c, o, ret);
  if (rc < 0) return kvctl_fail(c, rc);
  *ret_resumed = true;
  fprintf(stderr, "[resumed session %s: %llu tokens]\n", o->session, (unsigned long long)tokens);
  return KVCTL_OK;
}

int kvctl_chat(struct kvd_client *c, const struct kvctl_opts *o) {
  uint64_t session;
  bool resumed;
  int code = resume_session(c, o, &session, &resumed);
  if (code) return code;
  if (signals_init() < 0) {
    perror("kvctl: pipe");
    return KVCTL_EFAIL;
  }
  bool tty = isatty(STDIN_FILENO) && isatty(STDOUT_FILENO);
  EditLine *el = NULL;
  History *hist = NULL;
  HistEvent ev;
  struct chat_tty term = {0};
  if (tty) {
    el = el_init("kvctl", stdin, stdout, stderr);
    hist = history_init();
    if (el && hist) {
      history(hist, &ev, H_SETSIZE, 1000);
      el_set(el, EL_HIST, history, hist);
      el_set(el, EL_PROMPT, chat_prompt);
      el_set(el, EL_EDITOR, "emacs");
      el_source(el, NULL); /* the user's ~/.editrc */
      term.saved = tcgetattr(STDIN_FILENO, &term.orig) == 0;
      chat_tty_between_reads(&term);
      fprintf(stderr, "kvctl chat with %s; /help lists the commands, /quit or Ctrl-D leaves.\n",
              o->gen.model ? o->gen.model
                           : (kvd_client_default_model(c) ? kvd_client_default_model(c)
                                                          : "the default model"));
    } else {
      if (el) el_end(el);
      if (hist) history_end(hist);
      el = NULL;
      hist = NULL;
    }
  }

  char *buf = NULL;
  size_t cap = 0;
  struct text turn = {0};
  bool first = !resumed, eof = false;
  while (!eof) {
    bool interrupted;
    prompt_text = "> ";
    char *line = read_line(el, &term, &buf, &cap, &interrupted);
    if (interrupted) {
      if (!el) { /* a script's Ctrl-C (or SIGTERM) */
        code = KVCTL_EINTR;
        break;
      }
      fputc('\n', stdout); /* at the prompt, Ctrl-C only drops the line, as in a shell */
      continue;
    }
    if (!line) {
      if (el) fputc('\n', stdout);
      break;
    }
    if (!line[0]) continue;
    if (hist) history(hist, &ev, H_ENTER, line);
    /* A line starting with one / is a command, never sent; // sends the rest from its second /. */
    if (line[0] == '/' && line[1] != '/') {
      if (!strcmp(line, "/quit") || !strcmp(line, "/exit")) break;
      if (!strcmp(line, "/help")) {
        fprintf(stderr, "Commands:\n%s", chat_help);
      } else if (!strcmp(line, "/reset")) {
        kvd_session_close(c, session);
        if ((code = open_session(c, o, &session))) break;
        first = true;
        fprintf(stderr, "[new session: the conversation starts over]\n");
      } else {
        fprintf(stderr, "kvctl: unknown command '%s' (nothing sent); /help lists the commands\n",
                line);
      }
      continue;
    }
    turn.len = 0;
    bool ok = text_append(&turn, "", line[0] == '/' ? line + 1 : line);
    /* On a terminal the lines of a paste arrive together: the ones already waiting join this
     * turn, so a pasted paragraph is one message, not one per line. Piped input stays one turn
     * per line, which is what a script means. */
    while (ok && el && input_pending()) {
      prompt_text = "... ";
      line = read_line(el, &term, &buf, &cap, &interrupted);
      if (interrupted) break;
      if (!line) {
        eof = true; /* send what came, then leave */
        break;
      }
      if (hist && line[0]) history(hist, &ev, H_ENTER, line);
      ok = text_append(&turn, "\n", line);
    }
    if (interrupted) {
      fputc('\n', stdout);
      continue;
    }
    if (!ok) {
      fprintf(stderr, "kvctl: out of memory\n");
      code = KVCTL_EFAIL;
      break;
    }
    /* The session holds the history on the server: send only the new turn. */
    struct kvd_message msgs[2];
    size_t n = 0;
    if (first && o->system) msgs[n++] = (struct kvd_message){"system", o->system};
    msgs[n++] = (struct kvd_message){"user", turn.s};
    struct kvd_gen_params p = o->gen;
    p.prompt = NULL;
    p.messages = msgs;
    p.n_messages = n;
    p.session = (int64_t)session;
    code = run_one(c, o, &p, true);
    first = false;
    /* --session: saved after each answer, so a crash or a restart loses at most this turn. */
    if (o->session && kvd_client_connected(c) && kvd_session_save(c, session, o->session, NULL) < 0)
      fprintf(stderr, "kvctl: saving session %s: %s\n", o->session, kvd_client_last_error(c));
    if (code == KVCTL_EINTR && el) {
      fprintf(stderr, "[interrupted]\n");
      code = KVCTL_OK;
      continue;
    }
    if (code == KVCTL_ELOST || (code != KVCTL_OK && !el)) break;
    code = KVCTL_OK; /* on a terminal an error ends the turn, not the chat */
  }
  free(buf);
  free(turn.s);
  if (kvd_client_connected(c)) kvd_session_close(c, session);
  if (el) el_end(el);
  if (hist) history_end(hist);
  chat_tty_restore(&term);
  return code;
}
