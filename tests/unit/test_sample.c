/* Sampling: greedy is argmax, a seed reproduces a sequence, the truncations keep what they should,
 * the draw follows the softmax distribution, and the penalties change exactly the logits of
 * tokens in the window. */
#include "kt.h"
#include "kvd_error.h"
#include "sample.h"

#include <math.h>
#include <string.h>

static struct sample_params plain(float temp) {
  struct sample_params p = {.temperature = temp, .top_p = 1.0f, .repeat_penalty = 1.0f};
  return p;
}

KT_TEST(greedy_is_argmax_with_lowest_id_on_ties) {
  struct sampler *s;
  struct sample_params p = plain(0);
  KT_ASSERT_OK(sampler_new(5, &p, &s));
  float l[5] = {0.1f, 3.0f, -2.0f, 3.0f, 1.0f};
  KT_CHECK_EQ(sampler_sample(s, l, NULL, 0), 1);
  sampler_free(s);
}

KT_TEST(same_seed_same_tokens_other_seed_other_tokens) {
  enum { V = 50, N = 200 };
  float base[V];
  kt_rand_fill(base, V, -2, 2);
  int32_t a[N], b[N], c[N];
  for (int run = 0; run < 3; run++) {
    struct sample_params p = plain(1.0f);
    p.seed = run == 2 ? 43 : 42;
    struct sampler *s;
    KT_ASSERT_OK(sampler_new(V, &p, &s));
    for (int i = 0; i < N; i++) {
      float l[V];
      memcpy(l, base, sizeof l);
      (run == 0 ? a : run == 1 ? b : c)[i] = sampler_sample(s, l, NULL, 0);
    }
    sampler_free(s);
  }
  KT_CHECK(memcmp(a, b, sizeof a) == 0);
  KT_CHECK(memcmp(a, c, sizeof a) != 0);
}

KT_TEST(draw_follows_the_softmax_distribution) {
  float logits[4] = {1.0f, 0.0f, -1.0f, 0.5f};
  double z = 0, prob[4];
  for (int i = 0; i < 4; i++)
    z += exp(logits[i]);
  for (int i = 0; i < 4; i++)
    prob[i] = exp(logits[i]) / z;
  struct sample_params p = plain(1.0f);
  p.seed = kt_rand_u64();
  struct sampler *s;
  KT_ASSERT_OK(sampler_new(4, &p, &s));
  int counts[4] = {0};
  enum { N = 40000 };
  for (int i = 0; i < N; i++) {
    float l[4];
    memcpy(l, logits, sizeof l);
    counts[sampler_sample(s, l, NULL, 0)]++;
  }
  for (int i = 0; i < 4; i++)
    KT_CHECK(fabs((double)counts[i] / N - prob[i]) < 0.015);
  sampler_free(s);
}

KT_TEST(truncations_keep_only_the_allowed_tokens) {
  enum { V = 100 };
  float base[V];
  for (int i = 0; i < V; i++)
    base[i] = (float)(V - i) * 0.1f; /* token 0 best */
  struct {
    uint32_t top_k;
    float top_p, min_p;
    int32_t max_id;
  } cases[] = {
      {1, 1.0f, 0.0f, 0}, /* top-k 1 is greedy whatever the temperature */
      {5, 1.0f, 0.0f, 4},
      {0, 1e-6f, 0.0f, 0}, /* a tiny top-p keeps only the best */
      {0, 1.0f, 0.8f, 2},  /* exp(-0.1 k) >= 0.8 for k <= 2 */
  };
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    struct sample_params p = plain(5.0f); /* hot: would wander far without the cut */
    p.top_k = cases[c].top_k;
    p.top_p = cases[c].top_p;
    p.min_p = cases[c].min_p;
    p.seed = kt_rand_u64();
    struct sampler *s;
    KT_ASSERT_OK(sampler_new(V, &p, &s));
    int32_t worst = 0;
    for (int i = 0; i < 2000; i++) {
      float l[V];
      memcpy(l, base, sizeof l);
      int32_t id = sampler_sample(s, l, NULL, 0);
      if (id > worst) worst = id;
    }
    sampler_free(s);
    KT_CHECK_EQ(worst, cases[c].max_id);
  }
}

KT_TEST(penalties_touch_only_tokens_in_the_window) {
  struct sample_params p = plain(0);
  p.repeat_penalty = 2.0f;
  p.freq_penalty = 0.5f;
  p.presence_penalty = 0.25f;
  p.penalty_last_n = 3;
  struct sampler *s;
  KT_ASSERT_OK(sampler_new(6, &p, &s));
  float l[6] = {4.0f, -4.0f, 1.0f, 2.0f, 3.0f, 0.5f};
  int32_t hist[] = {5, 0, 1, 0}; /* window (last 3): 0, 1, 0; token 5 is outside it */
  sampler_sample(s, l, hist, 4);
  KT_CHECK(fabsf(l[0] - (4.0f / 2 - 2 * 0.5f - 0.25f)) < 1e-6f);
  KT_CHECK(fabsf(l[1] - (-4.0f * 2 - 1 * 0.5f - 0.25f)) < 1e-6f);
  KT_CHECK(l[2] == 1.0f && l[3] == 2.0f && l[4] == 3.0f && l[5] == 0.5f);
  sampler_free(s);
}

KT_TEST(bad_parameters_are_refused) {
  struct sampler *s;
  struct sample_params p = plain(-1.0f);
  KT_CHECK_EQ(sampler_new(10, &p, &s), KVD_EINVAL);
  p = plain(1.0f);
  p.top_p = 0;
  KT_CHECK_EQ(sampler_new(10, &p, &s), KVD_EINVAL);
  p = plain(1.0f);
  p.temperature = NAN;
  KT_CHECK_EQ(sampler_new(10, &p, &s), KVD_EINVAL);
  p = plain(1.0f);
  KT_CHECK_EQ(sampler_new(0, &p, &s), KVD_EINVAL);
}

KT_TEST(log_softmax_sums_to_one) {
  float l[7], out[7];
  kt_rand_fill(l, 7, -30, 30);
  sample_log_softmax(l, out, 7);
  double sum = 0;
  for (int i = 0; i < 7; i++)
    sum += exp(out[i]);
  KT_CHECK(fabs(sum - 1) < 1e-6);
}
