/* Training a tiny model end to end with the optimizer: a short run is bitwise reproducible,
 * and AdamW drives the loss on one fixed batch to ~0 (the model and optimizer can learn). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bam/model.h"
#include "bam/optim.h"
#include "test_util.h"

static bam_model_shape tiny_shape(int n_kv_heads, int tied) {
  return (bam_model_shape){.n_layers = 2,
                           .d_model = 16,
                           .n_heads = 4,
                           .n_kv_heads = n_kv_heads,
                           .d_ff = 24,
                           .vocab_size = 37,
                           .seq_len = 8,
                           .tie_embeddings = tied,
                           .rope_base = 10000.0f,
                           .norm_eps = 1e-5f};
}

static void random_ids(int32_t *x, int n, int V, uint64_t seed) {
  bam_rng r;
  bam_rng_seed(&r, seed, 0);
  for (int i = 0; i < n; i++) x[i] = (int32_t)bam_rng_below(&r, (uint64_t)V);
}

/* ---- training helpers ---- */
typedef struct {
  bam_model *m;
  float *mom, *var;
  bam_adamw_hparams h;
} trainer;

static int trainer_init(trainer *tr, const bam_model_shape *s, int B, uint64_t seed) {
  memset(tr, 0, sizeof *tr);
  T_OK(bam_model_create(&tr->m, s, B));
  if (!tr->m) return 0;
  bam_model_init(tr->m, seed, 0.02f);
  tr->mom = calloc(tr->m->n_params, 4);
  tr->var = calloc(tr->m->n_params, 4);
  tr->h = (bam_adamw_hparams){.beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.0f};
  return 1;
}

static float trainer_step(trainer *tr, const int32_t *tok, const int32_t *tgt, int B, int T,
                          float lr, int step) {
  float loss = NAN;
  bam_model_zero_grad(tr->m);
  T_OK(bam_model_forward(tr->m, tok, tgt, B, T, &loss));
  T_OK(bam_model_backward(tr->m, 1.0f));
  bam_clip_grad(tr->m->grads_mem, tr->m->n_params, 1.0);
  bam_adamw_step(tr->m->params_mem, tr->m->grads_mem, tr->mom, tr->var, tr->m->tensors,
                 tr->m->n_tensors, lr, &tr->h, step);
  return loss;
}

static void trainer_free(trainer *tr) {
  bam_model_free(&tr->m);
  free(tr->mom);
  free(tr->var);
}

/* ---- bitwise determinism of a short run ---- */
static void test_determinism(void) {
  bam_model_shape s = tiny_shape(2, 1);
  const int B = 2, T = 8, n = B * T;
  int32_t tok[16], tgt[16];
  random_ids(tok, n, s.vocab_size, 7);
  random_ids(tgt, n, s.vocab_size, 8);
  float losses[2][5];
  float *final[2] = {NULL, NULL};
  for (int run = 0; run < 2; run++) {
    trainer tr;
    if (!trainer_init(&tr, &s, B, 1234)) return;
    tr.h.weight_decay = 0.1f;
    for (int step = 0; step < 5; step++)
      losses[run][step] =
          trainer_step(&tr, tok, tgt, B, T, bam_lr_at(step, 2, 5, 3e-3f, 0.1f), step + 1);
    final[run] = malloc(tr.m->n_params * 4);
    memcpy(final[run], tr.m->params_mem, tr.m->n_params * 4);
    if (run == 1)
      T_CHECK(!memcmp(final[0], final[1], tr.m->n_params * 4), "final parameters bitwise equal");
    trainer_free(&tr);
  }
  T_CHECK(!memcmp(losses[0], losses[1], sizeof losses[0]), "losses bitwise equal over 5 steps");
  T_CHECK(losses[0][4] < losses[0][0], "loss decreases over 5 steps (%g -> %g)",
          (double)losses[0][0], (double)losses[0][4]);
  free(final[0]);
  free(final[1]);
}

/* ---- overfit one batch ---- */
static void test_overfit(void) {
  bam_model_shape s = {.n_layers = 2,
                       .d_model = 32,
                       .n_heads = 4,
                       .n_kv_heads = 2,
                       .d_ff = 64,
                       .vocab_size = 64,
                       .seq_len = 16,
                       .tie_embeddings = 0,
                       .rope_base = 10000.0f,
                       .norm_eps = 1e-5f};
  const int B = 4, T = 16;
  /* Random sequences, targets = inputs shifted by one: memorising them needs the context
   * (a token's successor differs between its occurrences), so attention must work too. */
  int32_t seq[4 * 17], tok[64], tgt[64];
  random_ids(seq, B * (T + 1), s.vocab_size, 99);
  for (int b = 0; b < B; b++)
    for (int t = 0; t < T; t++) {
      tok[b * T + t] = seq[b * (T + 1) + t];
      tgt[b * T + t] = seq[b * (T + 1) + t + 1];
    }
  trainer tr;
  if (!trainer_init(&tr, &s, B, 42)) return;
  float first = NAN, loss = NAN;
  int step;
  const int max_steps = 300;
  for (step = 1; step <= max_steps; step++) {
    loss = trainer_step(&tr, tok, tgt, B, T, 1e-2f, step);
    if (step == 1) first = loss;
    if (loss < 0.1f) break;
  }
  printf("overfit: loss %.4f -> %.4f in %d steps\n", (double)first, (double)loss, step);
  T_CLOSE(first, log(64.0), 0.05, 0, "initial loss ~ ln V");
  T_CHECK(loss < 0.1f, "overfit one batch: loss %g after %d steps", (double)loss, max_steps);
  trainer_free(&tr);
}

int main(void) {
  test_determinism();
  test_overfit();
  BAM_TEST_END();
}
