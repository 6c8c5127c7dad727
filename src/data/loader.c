/* The training window loader (see bam/data.h for the contract).
 *
 * Global sample j (j = batch * global_batch + i) goes to the domain d whose cumulative weight
 * interval holds u = (hash64(seed ^ hash64(j)) >> 11) * 2^-53. It is the k-th sample domain d
 * serves, k counting the earlier global samples that went to d. Domain d's split has
 * n_slots = (n_tokens - T) / T non-overlapping slots of T tokens; sample k lies in epoch
 * e = k / n_slots and takes slot perm_e[k % n_slots], where perm_e (a Fisher-Yates shuffle)
 * and the epoch's offset off_e in [0, T) come from an RNG seeded by (seed, d, e). The window
 * is tokens[off_e + slot*T .. off_e + slot*T + T], T+1 tokens, always inside the split
 * because off_e + n_slots*T <= n_tokens - 1. (The slot count leaves room for the largest
 * offset, so it is the same every epoch and the epoch of k needs no history.)
 *
 * Every rank walks all global samples of each batch in order, to keep the per-domain counters
 * k, but materialises only its own [rank*B/P, (rank+1)*B/P). The state is the number of
 * batches consumed: the counters follow from it, so seek recomputes them by walking.
 *
 * The splits are streamed: a window is one hyperslab read of T+1 tokens from the open HDF5
 * file into a scratch row, so memory does not grow with the corpus (the whole-split copies
 * cost 4 bytes a token on every rank). A read costs about 35 us here (16 windows of 257
 * tokens: 0.56 ms a batch, from the page cache), against about a second for a training step
 * of the quick study. */
#include "bam/data.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  int64_t epoch; /* epoch whose permutation perm holds; -1 for none */
  int64_t off;   /* that epoch's token offset */
  uint32_t *perm; /* n_slots slot indices */
} perm_cache;

struct bam_loader {
  int n;                           /* domains */
  bam_split split[BAM_MAX_DOMAINS];
  double cum[BAM_MAX_DOMAINS];     /* cumulative normalised weights, cum[n-1] = 1 */
  int64_t n_slots[BAM_MAX_DOMAINS];
  int T, B, rank, world, lo, hi;   /* this rank serves samples [lo, hi) of each batch */
  uint64_t seed;
  int64_t pos;                     /* global batches consumed */
  int64_t count[BAM_MAX_DOMAINS];  /* samples each domain served in batches [0, pos) */
  perm_cache cache[BAM_MAX_DOMAINS];
  int32_t *window;                 /* T+1 tokens: the window being read */
};

/* Domain of global sample j. */
static inline int sample_domain(const bam_loader *l, int64_t j) {
  double u = (double)(bam_hash64(l->seed ^ bam_hash64((uint64_t)j)) >> 11) * 0x1.0p-53;
  for (int d = 0; d < l->n - 1; d++)
    if (u < l->cum[d]) return d;
  return l->n - 1;
}

/* Advance the per-domain counters over global samples [from, to). */
static void walk(const bam_loader *l, int64_t count[], int64_t from, int64_t to) {
  for (int64_t j = from; j < to; j++) count[sample_domain(l, j)]++;
}

/* Make c hold epoch e of domain d: its offset, then the shuffle, from one seeded stream. */
static void epoch_perm(const bam_loader *l, int d, int64_t e, perm_cache *c) {
  if (c->epoch == e) return;
  int64_t n = l->n_slots[d];
  bam_rng r;
  bam_rng_seed(&r, l->seed, ((uint64_t)(d + 1) << 56) ^ (uint64_t)e);
  c->off = (int64_t)bam_rng_below(&r, (uint64_t)l->T);
  for (int64_t i = 0; i < n; i++) c->perm[i] = (uint32_t)i;
  for (int64_t i = n - 1; i > 0; i--) {
    int64_t k = (int64_t)bam_rng_below(&r, (uint64_t)i + 1);
    uint32_t t = c->perm[i];
    c->perm[i] = c->perm[k];
    c->perm[k] = t;
  }
  c->epoch = e;
}

/* Token offset of the window of domain d's k-th sample. */
static int64_t window_start(const bam_loader *l, int d, int64_t k, perm_cache *c) {
  int64_t n = l->n_slots[d];
  epoch_perm(l, d, k / n, c);
  return c->off + (int64_t)c->perm[k % n] * l->T;
}

bam_status bam_loader_create(bam_loader **out, const char *data_dir, const bam_mix *mix,
                             const char *split, int T, int global_batch, int rank, int world,
                             uint64_t seed, int expect_vocab) {
  *out = NULL;
  if (mix->n < 1 || mix->n > BAM_MAX_DOMAINS)
    BAM_FAIL(BAM_ERR_ARG, "loader: the mix has %d domains (1 to %d allowed)", mix->n,
             BAM_MAX_DOMAINS);
  if (T < 1) BAM_FAIL(BAM_ERR_ARG, "loader: sequence length T = %d must be positive", T);
  if (global_batch < 1)
    BAM_FAIL(BAM_ERR_ARG, "loader: global_batch %d must be positive", global_batch);
  if (world < 1 || rank < 0 || rank >= world)
    BAM_FAIL(BAM_ERR_ARG, "loader: rank %d is outside a world of %d", rank, world);
  if (global_batch % world != 0)
    BAM_FAIL(BAM_ERR_ARG, "loader: global_batch %d is not divisible by the world size %d",
             global_batch, world);
  double sum = 0;
  for (int d = 0; d < mix->n; d++) {
    if (!(mix->weight[d] > 0))
      BAM_FAIL(BAM_ERR_ARG, "loader: weight of domain '%s' must be positive", mix->name[d]);
    sum += mix->weight[d];
  }

  bam_loader *l = calloc(1, sizeof *l);
  if (!l) BAM_FAIL(BAM_ERR_NOMEM, "loader: out of memory");
  l->n = mix->n;
  l->T = T;
  l->B = global_batch;
  l->rank = rank;
  l->world = world;
  l->lo = (int)((int64_t)rank * global_batch / world);
  l->hi = (int)((int64_t)(rank + 1) * global_batch / world);
  l->seed = seed;
  double acc = 0;
  for (int d = 0; d < l->n; d++) {
    acc += mix->weight[d] / sum;
    l->cum[d] = acc;
    l->cache[d].epoch = -1;
  }
  l->cum[l->n - 1] = 1.0;

  bam_status st = BAM_OK;
  for (int d = 0; d < l->n; d++) {
    bam_split *s = &l->split[d];
    BAM_CHECK_GOTO(st, bam_split_open(s, data_dir, mix->name[d], split, expect_vocab), fail);
    if (d > 0 && strcmp(s->tokenizer, l->split[0].tokenizer) != 0) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                         "%s/tokens/%s.h5: attribute 'tokenizer' is '%s' but %s.h5 has '%s' "
                         "(prepare all domains with one tokenizer)",
                         data_dir, s->domain, s->tokenizer, l->split[0].domain,
                         l->split[0].tokenizer);
      goto fail;
    }
    if (d > 0 && s->vocab_size != l->split[0].vocab_size) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                         "%s/tokens/%s.h5: attribute 'vocab_size' is %d but %s.h5 has %d",
                         data_dir, s->domain, s->vocab_size, l->split[0].domain,
                         l->split[0].vocab_size);
      goto fail;
    }
    int64_t slots = (s->n_tokens - T) / T;
    if (s->n_tokens < 2 * (int64_t)T || slots < 1) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                         "%s/tokens/%s.h5: /%s has %" PRId64 " tokens, fewer than the %" PRId64
                         " that windows of T = %d with a random offset need",
                         data_dir, s->domain, split, s->n_tokens, 2 * (int64_t)T, T);
      goto fail;
    }
    if (slots > (int64_t)UINT32_MAX) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                         "%s/tokens/%s.h5: /%s has too many windows (%" PRId64 ") for T = %d",
                         data_dir, s->domain, split, slots, T);
      goto fail;
    }
    l->n_slots[d] = slots;
    BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&l->cache[d].perm,
                                         (size_t)slots * sizeof(uint32_t), "loader permutation"),
                   fail);
  }
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&l->window, ((size_t)T + 1) * sizeof(int32_t),
                                       "loader window"),
                 fail);
  *out = l;
  return BAM_OK;
fail:
  bam_loader_free(&l);
  return st;
}

void bam_loader_free(bam_loader **lp) {
  bam_loader *l = *lp;
  if (!l) return;
  for (int d = 0; d < BAM_MAX_DOMAINS; d++) {
    bam_split_free(&l->split[d]);
    bam_free(l->cache[d].perm);
  }
  bam_free(l->window);
  free(l);
  *lp = NULL;
}

int bam_loader_local_batch(const bam_loader *l) { return l->hi - l->lo; }
int64_t bam_loader_position(const bam_loader *l) { return l->pos; }

bam_status bam_loader_next(bam_loader *l, int32_t *inputs, int32_t *targets) {
  const int64_t base = l->pos * l->B;
  const size_t T = (size_t)l->T;
  int64_t count0[BAM_MAX_DOMAINS]; /* to leave the state as it was if a read fails */
  memcpy(count0, l->count, sizeof count0);
  bam_status st = BAM_OK;
  for (int i = 0; i < l->B; i++) {
    int d = sample_domain(l, base + i);
    int64_t k = l->count[d]++;
    if (i < l->lo || i >= l->hi) continue;
    const int32_t *w = l->window;
    BAM_CHECK_GOTO(st, bam_split_read(&l->split[d], window_start(l, d, k, &l->cache[d]),
                                      (int64_t)T + 1, l->window),
                   fail);
    size_t row = (size_t)(i - l->lo) * T;
    memcpy(inputs + row, w, T * sizeof *w);
    memcpy(targets + row, w + 1, T * sizeof *w);
  }
  l->pos++;
  return BAM_OK;
fail:
  memcpy(l->count, count0, sizeof count0);
  return st;
}

void bam_loader_seek(bam_loader *l, int64_t batches) {
  if (batches < 0) batches = 0;
  if (batches < l->pos) { /* walk from the start; forward seeks continue from here */
    memset(l->count, 0, sizeof l->count);
    l->pos = 0;
  }
  walk(l, l->count, l->pos * l->B, batches * l->B);
  l->pos = batches;
}

bam_status bam_loader_window(const bam_loader *l, int64_t batch, int i, int *domain,
                             int64_t *offset) {
  if (batch < 0 || i < 0 || i >= l->B)
    BAM_FAIL(BAM_ERR_ARG, "loader: no sample %d of batch %" PRId64 " (global_batch %d)", i,
             batch, l->B);
  int64_t count[BAM_MAX_DOMAINS] = {0}, from = 0;
  if (batch >= l->pos) {
    memcpy(count, l->count, sizeof count);
    from = l->pos * l->B;
  }
  int64_t j = batch * l->B + i;
  walk(l, count, from, j);
  int d = sample_domain(l, j);
  perm_cache c = {.epoch = -1};
  bam_status st = bam_alloc_checked((void **)&c.perm, (size_t)l->n_slots[d] * sizeof(uint32_t),
                                    "loader permutation");
  if (st != BAM_OK) return st;
  *domain = d;
  *offset = window_start(l, d, count[d], &c);
  bam_free(c.perm);
  return BAM_OK;
}
