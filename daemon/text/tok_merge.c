/* The merge engine shared by the SPM and BPE encoders.
 *
 * Both algorithms start from small symbols (characters or bytes) and repeatedly merge the best
 * adjacent pair; they differ only in what "best" means (SPM: highest score of the merged piece,
 * BPE: lowest merge rank), which the caller's pair function turns into a priority. Candidates sit
 * in a binary heap and are never removed when a merge makes them stale: a popped candidate is
 * simply checked against the symbols' current state. That keeps each merge O(log n), so long
 * inputs stay fast (a naive rescan per merge is O(n^2)). */
#include <stdlib.h>
#include <string.h>

#include "kvd_error.h"
#include "tok_internal.h"

void tok__work_free(struct tok__work *w) {
  free(w->sym);
  free(w->heap);
  free(w->buf);
  memset(w, 0, sizeof(*w));
}

static int grow(void **p, size_t *cap, size_t want, size_t elem) {
  if (want <= *cap) return 0;
  size_t n = *cap ? *cap : 64;
  while (n < want) {
    if (n > SIZE_MAX / 2 / elem) return KVD_ENOMEM;
    n *= 2;
  }
  void *q = realloc(*p, n * elem);
  if (!q) return KVD_ENOMEM;
  *p = q;
  *cap = n;
  return 0;
}

int tok__work_reserve(struct tok__work *w, size_t nsym, size_t nbuf) {
  if (nsym > INT32_MAX) return KVD_E2BIG; /* symbols link by int32 index */
  int rc = grow((void **)&w->sym, &w->sym_cap, nsym, sizeof(*w->sym));
  if (rc == 0) rc = grow((void **)&w->buf, &w->buf_cap, nbuf, 1);
  return rc;
}

static bool cand_before(const struct tok__cand *a, const struct tok__cand *b) {
  return a->prio < b->prio || (a->prio == b->prio && a->left < b->left);
}

static int heap_push(struct tok__work *w, const struct tok__cand *c) {
  int rc = grow((void **)&w->heap, &w->heap_cap, w->heap_n + 1, sizeof(*w->heap));
  if (rc < 0) return rc;
  size_t i = w->heap_n++;
  while (i > 0) {
    size_t parent = (i - 1) / 2;
    if (!cand_before(c, &w->heap[parent])) break;
    w->heap[i] = w->heap[parent];
    i = parent;
  }
  w->heap[i] = *c;
  return 0;
}

static struct tok__cand heap_pop(struct tok__work *w) {
  struct tok__cand top = w->heap[0];
  struct tok__cand last = w->heap[--w->heap_n];
  size_t n = w->heap_n, i = 0;
  for (;;) {
    size_t child = 2 * i + 1;
    if (child >= n) break;
    if (child + 1 < n && cand_before(&w->heap[child + 1], &w->heap[child])) child++;
    if (!cand_before(&w->heap[child], &last)) break;
    w->heap[i] = w->heap[child];
    i = child;
  }
  if (n > 0) w->heap[i] = last;
  return top;
}

static int try_pair(const struct tok *t, struct tok__work *w, const char *text, int32_t left,
                    tok__pair_fn pair) {
  if (left < 0) return 0;
  int32_t right = w->sym[left].next;
  if (right < 0) return 0;
  struct tok__cand c;
  if (!pair(t, text, &w->sym[left], &w->sym[right], &c.prio, &c.id)) return 0;
  c.left = (uint32_t)left;
  c.right = (uint32_t)right;
  c.len = w->sym[left].len + w->sym[right].len;
  return heap_push(w, &c);
}

int tok__merge_run(const struct tok *t, struct tok__work *w, const char *text, size_t nsym,
                   tok__pair_fn pair) {
  int rc = 0;
  w->heap_n = 0;
  for (size_t i = 0; i + 1 < nsym && rc == 0; i++)
    rc = try_pair(t, w, text, (int32_t)i, pair);
  while (rc == 0 && w->heap_n > 0) {
    struct tok__cand c = heap_pop(w);
    struct tok__sym *l = &w->sym[c.left], *r = &w->sym[c.right];
    /* Symbols only grow, and a merged-away symbol gets len 0, so a candidate is current exactly
     * when both sides are alive, still adjacent, and their lengths still add up. */
    if (l->len == 0 || r->len == 0 || l->next != (int32_t)c.right || l->len + r->len != c.len)
      continue;
    l->len = c.len;
    l->id = c.id;
    l->next = r->next;
    if (r->next >= 0) w->sym[r->next].prev = (int32_t)c.left;
    r->len = 0;
    rc = try_pair(t, w, text, l->prev, pair);
    if (rc == 0) rc = try_pair(t, w, text, (int32_t)c.left, pair);
  }
  return rc;
}
