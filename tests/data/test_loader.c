/* Loader, split and mix tests on small token files this test writes itself (HDF5 C API, the
 * format of bam/data.h) in a temporary directory:
 *   alpha (3000 train tokens, variable-length string attributes, as h5py writes them),
 *   beta  (2000, fixed-length string attributes and int32 integers),
 *   gamma (5000, chunked and deflate-compressed), vocab 100, EOS 0, random ids; plus broken
 *   files for the error paths.
 * Checks: split contents and attributes; streamed reads (bam_split_read) equal to the split
 * loaded whole, and failing cleanly outside the split; the loader's batches equal, bitwise, to
 * the sampling contract of bam/data.h computed here from the loaded splits (P = 1, 2, 4);
 * a bad token far into a split failing bam_loader_next, not create; determinism in the seed;
 * windows in range with
 * targets = inputs shifted by one and equal to bam_loader_window's report; ranks (P = 1, 2,
 * 4) disjoint with a union equal, in order, to the P = 1 batch; no window repeats within a
 * domain's epoch and an epoch covers every slot; mixing frequencies within binomial bounds;
 * seek; and every error message naming the file and field. */
#include <hdf5.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "bam/data.h"
#include "test_util.h"

#define VOCAB 100
#define EOS 0

static char dir[64]; /* the temporary data directory */

/* ---- writing token files ---- */

typedef struct {
  const char *domain_attr; /* NULL: the domain */
  const char *tokenizer;   /* NULL: "feedc0ffee123456" */
  int vocab, eos;
  int fixed_strings;      /* fixed-length strings and int32 integers, not h5py's defaults */
  const char *omit;       /* an attribute left out */
  int64_t bad_index;      /* >= 0: this train token becomes bad_value */
  int bad_value;
  int chunked;            /* chunked datasets, deflate-compressed where the filter exists */
} file_opts;

static void attr_str(hid_t obj, const char *name, const char *value, int fixed) {
  hid_t type = H5Tcopy(H5T_C_S1), space = H5Screate(H5S_SCALAR);
  if (fixed) {
    H5Tset_size(type, strlen(value));
    H5Tset_strpad(type, H5T_STR_NULLPAD);
  } else {
    H5Tset_size(type, H5T_VARIABLE);
    H5Tset_cset(type, H5T_CSET_UTF8);
  }
  hid_t a = H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
  herr_t rc = fixed ? H5Awrite(a, type, value) : H5Awrite(a, type, &value);
  T_CHECK(a >= 0 && rc >= 0, "writing attribute %s", name);
  H5Aclose(a);
  H5Sclose(space);
  H5Tclose(type);
}

static void attr_int(hid_t obj, const char *name, int64_t value, int i32) {
  hid_t space = H5Screate(H5S_SCALAR);
  hid_t a = H5Acreate2(obj, name, i32 ? H5T_STD_I32LE : H5T_STD_I64LE, space, H5P_DEFAULT,
                       H5P_DEFAULT);
  herr_t rc = H5Awrite(a, H5T_NATIVE_INT64, &value);
  T_CHECK(a >= 0 && rc >= 0, "writing attribute %s", name);
  H5Aclose(a);
  H5Sclose(space);
}

/* Random ids in [1, VOCAB) with EOS every 20-80 tokens; deterministic in (domain, split). */
static uint16_t *make_tokens(const char *domain, const char *split, int64_t n, int64_t *docs) {
  uint16_t *t = malloc((size_t)n * sizeof *t);
  bam_rng r;
  bam_rng_seed(&r, bam_hash64((uint64_t)domain[0] * 31 + (uint64_t)strlen(domain)),
               (uint64_t)split[0]);
  int64_t next_eos = 20 + (int64_t)bam_rng_below(&r, 60);
  *docs = 0;
  for (int64_t i = 0; i < n; i++) {
    if (i == next_eos || i == n - 1) {
      t[i] = EOS;
      ++*docs;
      next_eos = i + 20 + (int64_t)bam_rng_below(&r, 60);
    } else {
      t[i] = (uint16_t)(1 + bam_rng_below(&r, VOCAB - 1));
    }
  }
  return t;
}

static void write_split(hid_t file, const char *domain, const char *split, int64_t n,
                        const file_opts *o) {
  int64_t docs;
  uint16_t *tok = make_tokens(domain, split, n, &docs);
  if (!strcmp(split, "train") && o->bad_index >= 0) tok[o->bad_index] = (uint16_t)o->bad_value;
  hsize_t dims[1] = {(hsize_t)n};
  hid_t space = H5Screate_simple(1, dims, NULL);
  char name[32];
  snprintf(name, sizeof name, "/%s", split);
  hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
  if (o->chunked) { /* chunks smaller than a window, so windows straddle chunk boundaries */
    hsize_t chunk[1] = {13};
    H5Pset_chunk(dcpl, 1, chunk);
    if (H5Zfilter_avail(H5Z_FILTER_DEFLATE) > 0) H5Pset_deflate(dcpl, 4);
  }
  hid_t d = H5Dcreate2(file, name, H5T_STD_U16LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
  H5Pclose(dcpl);
  T_CHECK(d >= 0 && H5Dwrite(d, H5T_NATIVE_UINT16, H5S_ALL, H5S_ALL, H5P_DEFAULT, tok) >= 0,
          "writing %s %s", domain, name);
  if (!o->omit || strcmp(o->omit, "text_bytes")) attr_int(d, "text_bytes", 4 * n, o->fixed_strings);
  if (!o->omit || strcmp(o->omit, "n_docs")) attr_int(d, "n_docs", docs, o->fixed_strings);
  H5Dclose(d);
  H5Sclose(space);
  free(tok);
}

static void write_file(const char *domain, int64_t n_train, int64_t n_val, const file_opts *o) {
  char path[256];
  snprintf(path, sizeof path, "%s/tokens/%s.h5", dir, domain);
  hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  T_CHECK(f >= 0, "creating %s", path);
  attr_str(f, "domain", o->domain_attr ? o->domain_attr : domain, o->fixed_strings);
  if (!o->omit || strcmp(o->omit, "tokenizer"))
    attr_str(f, "tokenizer", o->tokenizer ? o->tokenizer : "feedc0ffee123456", o->fixed_strings);
  attr_int(f, "vocab_size", o->vocab, o->fixed_strings);
  attr_int(f, "eos_id", o->eos, o->fixed_strings);
  if (n_train >= 0) write_split(f, domain, "train", n_train, o);
  if (n_val >= 0) write_split(f, domain, "val", n_val, o);
  H5Fclose(f);
}

static file_opts defaults(void) {
  file_opts o = {NULL, NULL, VOCAB, EOS, 0, NULL, -1, 0, 0};
  return o;
}

/* ---- helpers ---- */

/* Create a loader or record a failure; NULL on failure. */
static bam_loader *make(const char *mix_spec, int T, int B, int rank, int world, uint64_t seed) {
  bam_mix mix;
  bam_loader *l = NULL;
  T_OK(bam_mix_parse(&mix, mix_spec));
  T_OK(bam_loader_create(&l, dir, &mix, "train", T, B, rank, world, seed, VOCAB));
  return l;
}

/* Expect status `want` with a message containing every non-NULL fragment. */
static void expect_error(bam_status got, bam_status want, const char *what, const char *frag1,
                         const char *frag2) {
  const char *m = bam_error_message();
  T_CHECK(got == want && (!frag1 || strstr(m, frag1)) && (!frag2 || strstr(m, frag2)),
          "%s: got %s \"%s\", expected %s with \"%s\" and \"%s\"", what, bam_status_str(got), m,
          bam_status_str(want), frag1 ? frag1 : "", frag2 ? frag2 : "");
  bam_error_clear();
}

static bam_split splits[3];
static const char *names[3] = {"alpha", "beta", "gamma"};

/* ---- tests ---- */

static void test_split(void) {
  for (int d = 0; d < 3; d++) T_OK(bam_split_load(&splits[d], dir, names[d], "train", VOCAB));
  for (int d = 0; d < 3; d++) {
    bam_split *s = &splits[d];
    int64_t want_n = d == 0 ? 3000 : d == 1 ? 2000 : 5000, docs;
    uint16_t *tok = make_tokens(names[d], "train", want_n, &docs);
    int same = s->n_tokens == want_n;
    for (int64_t i = 0; same && i < want_n; i++) same = s->tokens[i] == tok[i];
    free(tok);
    T_CHECK(same, "%s: %lld tokens read back differently", names[d], (long long)s->n_tokens);
    T_CHECK(!strcmp(s->domain, names[d]) && !strcmp(s->tokenizer, "feedc0ffee123456") &&
                s->vocab_size == VOCAB && s->eos_id == EOS && s->n_docs == docs &&
                s->text_bytes == 4 * want_n,
            "%s attributes: domain '%s' tokenizer '%s' vocab %d eos %d docs %lld bytes %lld",
            names[d], s->domain, s->tokenizer, s->vocab_size, s->eos_id, (long long)s->n_docs,
            (long long)s->text_bytes);
  }
  bam_split v;
  T_OK(bam_split_load(&v, dir, "beta", "val", 0)); /* expect_vocab 0: no check */
  T_CHECK(v.n_tokens == 500, "beta val: %lld tokens", (long long)v.n_tokens);
  bam_split_free(&v);
  T_CHECK(v.tokens == NULL && v.n_tokens == 0, "bam_split_free clears the split");
}

static void test_mix(void) {
  bam_mix m;
  T_OK(bam_mix_parse(&m, "general:0.9,code:0.1"));
  T_CHECK(m.n == 2 && !strcmp(m.name[0], "general") && !strcmp(m.name[1], "code") &&
              fabs(m.weight[0] - 0.9) < 1e-12 && fabs(m.weight[1] - 0.1) < 1e-12,
          "general:0.9,code:0.1 parsed as %d domains", m.n);
  T_OK(bam_mix_parse(&m, "code"));
  T_CHECK(m.n == 1 && !strcmp(m.name[0], "code") && m.weight[0] == 1.0, "code alone");
  T_OK(bam_mix_parse(&m, " a : 1 , b:3 "));
  T_CHECK(m.n == 2 && !strcmp(m.name[0], "a") && !strcmp(m.name[1], "b") &&
              fabs(m.weight[0] - 0.25) < 1e-12 && fabs(m.weight[1] - 0.75) < 1e-12,
          "blanks and normalisation");
  T_OK(bam_mix_parse(&m, "a,b.c-d_e:1e-3"));
  T_CHECK(m.n == 2 && fabs(m.weight[0] - 1 / 1.001) < 1e-12 && !strcmp(m.name[1], "b.c-d_e"),
          "a missing weight is 1");
  T_OK(bam_mix_parse(&m, "a,b,c,d,e,f,g,h"));
  T_CHECK(m.n == BAM_MAX_DOMAINS, "eight domains");

  struct {
    const char *spec, *frag;
  } bad[] = {{"", "no domains"},
             {"  ", "no domains"},
             {",", "item 1 has no domain name"},
             {"a,,b", "item 2 has no domain name"},
             {":0.5", "item 1 has no domain name"},
             {"a:", "is not a number"},
             {"a:x", "weight \"x\" of domain \"a\" is not a number"},
             {"a:0.5x", "is not a number"},
             {"a:nan", "is not a number"},
             {"a:1e999", "is not a number"},
             {"a:-1", "must be positive"},
             {"a:0", "must be positive"},
             {"a:1,b:2,a:3", "domain \"a\" appears twice"},
             {"a b:1", "may only hold"},
             {"x/y", "may only hold"},
             {"a,b,c,d,e,f,g,h,i", "more than 8 domains"}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    bam_status s = bam_mix_parse(&m, bad[i].spec);
    char what[64];
    snprintf(what, sizeof what, "mix \"%s\"", bad[i].spec);
    expect_error(s, BAM_ERR_CONFIG, what, bad[i].frag, bad[i].spec);
  }
}

/* Same seed: identical batches; another seed: different ones. */
static void test_determinism(void) {
  const int T = 16, B = 8, N = 20;
  bam_loader *a = make("alpha:0.5,beta:0.3,gamma:0.2", T, B, 0, 1, 42);
  bam_loader *b = make("alpha:0.5,beta:0.3,gamma:0.2", T, B, 0, 1, 42);
  bam_loader *c = make("alpha:0.5,beta:0.3,gamma:0.2", T, B, 0, 1, 43);
  if (!a || !b || !c) return;
  T_CHECK(bam_loader_local_batch(a) == B, "local batch %d", bam_loader_local_batch(a));
  size_t n = (size_t)B * T;
  int32_t *ia = malloc(n * 4), *ta = malloc(n * 4), *ib = malloc(n * 4), *tb = malloc(n * 4);
  int same = 1, differ = 0;
  for (int k = 0; k < N; k++) {
    T_OK(bam_loader_next(a, ia, ta));
    T_OK(bam_loader_next(b, ib, tb));
    same &= !memcmp(ia, ib, n * 4) && !memcmp(ta, tb, n * 4);
    T_OK(bam_loader_next(c, ib, tb));
    differ += memcmp(ia, ib, n * 4) != 0;
  }
  T_CHECK(same, "two loaders with seed 42 disagree");
  T_CHECK(differ == N, "seeds 42 and 43 gave %d identical batches of %d", N - differ, N);
  T_CHECK(bam_loader_position(a) == N, "position %lld", (long long)bam_loader_position(a));
  free(ia), free(ta), free(ib), free(tb);
  bam_loader_free(&a);
  bam_loader_free(&b);
  bam_loader_free(&c);
  T_CHECK(a == NULL, "bam_loader_free clears the pointer");
}

/* Every window is in range, matches bam_loader_window, and its targets are its inputs shifted
 * by one; within a domain's epoch no window repeats, all share the epoch's offset modulo T,
 * and a complete epoch covers every slot. Domain frequencies follow the weights. */
static void test_windows_epochs_mixing(void) {
  const int T = 16, B = 50, N = 400; /* 20000 samples: about 60 epochs of beta */
  const double w[3] = {0.5, 0.3, 0.2};
  bam_loader *l = make("alpha:0.5,beta:0.3,gamma:0.2", T, B, 0, 1, 7);
  if (!l) return;
  int64_t slots[3], count[3] = {0, 0, 0};
  uint8_t *seen[3];
  for (int d = 0; d < 3; d++) {
    slots[d] = (splits[d].n_tokens - T) / T;
    seen[d] = calloc((size_t)splits[d].n_tokens, 1);
  }
  int64_t epoch_off[3] = {-1, -1, -1};
  uint32_t offsets_used[3] = {0, 0, 0}; /* bit r: some epoch had offset r */
  int64_t in_range = 0, content = 0, shifted = 0, repeats = 0, residue = 0, incomplete = 0;
  size_t n = (size_t)B * T;
  int32_t *in = malloc(n * 4), *tg = malloc(n * 4);
  for (int b = 0; b < N; b++) {
    int dom[64];
    int64_t off[64];
    for (int i = 0; i < B; i++) T_OK(bam_loader_window(l, b, i, &dom[i], &off[i]));
    T_OK(bam_loader_next(l, in, tg));
    for (int i = 0; i < B; i++) {
      int d = dom[i];
      const bam_split *s = &splits[d];
      int ok = d >= 0 && d < 3 && off[i] >= 0 && off[i] + T + 1 <= s->n_tokens;
      in_range += ok;
      if (!ok) continue;
      const int32_t *row = in + (size_t)i * T, *trow = tg + (size_t)i * T;
      content += !memcmp(row, s->tokens + off[i], (size_t)T * 4) &&
                 !memcmp(trow, s->tokens + off[i] + 1, (size_t)T * 4);
      int sh = trow[T - 1] == s->tokens[off[i] + T];
      for (int t = 0; t + 1 < T; t++) sh &= trow[t] == row[t + 1];
      shifted += sh;
      /* epochs of this domain: sample k = count[d] is in epoch k / slots */
      int64_t k = count[d]++;
      if (k % slots[d] == 0) {
        if (k > 0) { /* the previous epoch must have covered every slot */
          int64_t covered = 0;
          for (int64_t p = 0; p < s->n_tokens; p++) covered += seen[d][p];
          incomplete += covered != slots[d];
        }
        memset(seen[d], 0, (size_t)s->n_tokens);
        epoch_off[d] = off[i] % T;
        offsets_used[d] |= 1u << epoch_off[d];
      }
      residue += off[i] % T != epoch_off[d];
      repeats += seen[d][off[i]];
      seen[d][off[i]] = 1;
    }
  }
  int64_t total = (int64_t)B * N;
  T_CHECK(in_range == total, "%lld of %lld windows out of range", (long long)(total - in_range),
          (long long)total);
  T_CHECK(content == in_range, "%lld windows differ from the tokens at their reported offset",
          (long long)(in_range - content));
  T_CHECK(shifted == in_range, "%lld windows' targets are not the inputs shifted by one",
          (long long)(in_range - shifted));
  T_CHECK(repeats == 0, "%lld windows repeat within an epoch", (long long)repeats);
  T_CHECK(residue == 0, "%lld windows off their epoch's offset grid", (long long)residue);
  T_CHECK(incomplete == 0, "%lld epochs did not cover every slot", (long long)incomplete);
  T_CHECK(__builtin_popcount(offsets_used[1]) >= 8,
          "beta's %lld epochs used only offsets %#x", (long long)(count[1] / slots[1]),
          offsets_used[1]);
  T_CHECK(count[1] > 10 * slots[1], "only %lld beta samples for %lld slots", (long long)count[1],
          (long long)slots[1]);
  for (int d = 0; d < 3; d++) {
    double mean = total * w[d], sd = sqrt(total * w[d] * (1 - w[d]));
    T_CHECK(fabs((double)count[d] - mean) <= 4 * sd,
            "domain %s drew %lld of %lld samples, expected %.0f +- %.0f", names[d],
            (long long)count[d], (long long)total, mean, 4 * sd);
    free(seen[d]);
  }
  printf("mixing over %lld samples: alpha %lld, beta %lld, gamma %lld (weights 0.5/0.3/0.2)\n",
         (long long)total, (long long)count[0], (long long)count[1], (long long)count[2]);
  free(in);
  free(tg);
  bam_loader_free(&l);
}

/* Ranks: the concatenation of ranks' local batches is exactly the P = 1 batch, and the
 * windows of different ranks are disjoint. */
static void test_ranks(void) {
  const int T = 16, B = 8, N = 40; /* 320 samples: several epoch boundaries in beta */
  const char *spec = "alpha:0.2,beta:0.5,gamma:0.3";
  bam_loader *one = make(spec, T, B, 0, 1, 99);
  if (!one) return;
  size_t n = (size_t)B * T;
  int32_t *ref_in = malloc(n * 4), *ref_tg = malloc(n * 4);
  int32_t *cat_in = malloc(n * 4), *cat_tg = malloc(n * 4);
  const int worlds[3] = {1, 2, 4};
  bam_loader *rank[4][4] = {{NULL}};
  for (int w = 0; w < 3; w++)
    for (int r = 0; r < worlds[w]; r++) rank[w][r] = make(spec, T, B, r, worlds[w], 99);
  int equal[3] = {0, 0, 0}, disjoint = 0, checked = 0;
  int64_t count[3] = {0, 0, 0};
  for (int b = 0; b < N; b++) {
    T_OK(bam_loader_next(one, ref_in, ref_tg));
    for (int w = 0; w < 3; w++) {
      int P = worlds[w], lb = B / P;
      for (int r = 0; r < P; r++) {
        if (!rank[w][r]) continue;
        T_CHECK(bam_loader_local_batch(rank[w][r]) == lb, "P=%d local batch %d", P,
                bam_loader_local_batch(rank[w][r]));
        T_OK(bam_loader_next(rank[w][r], cat_in + (size_t)r * lb * T,
                             cat_tg + (size_t)r * lb * T));
      }
      equal[w] += !memcmp(cat_in, ref_in, n * 4) && !memcmp(cat_tg, ref_tg, n * 4);
    }
    /* windows of different ranks (P = 4: two samples each; this covers P = 2) never
     * coincide within a domain's epoch (across an epoch boundary they may, legitimately) */
    int dom[64];
    int64_t off[64], epoch[64];
    for (int i = 0; i < B; i++) {
      T_OK(bam_loader_window(one, b, i, &dom[i], &off[i]));
      epoch[i] = count[dom[i]]++ / ((splits[dom[i]].n_tokens - T) / T);
    }
    for (int i = 0; i < B; i++)
      for (int j = i + 1; j < B; j++)
        if (i / 2 != j / 2) {
          checked++;
          disjoint += dom[i] != dom[j] || epoch[i] != epoch[j] || off[i] != off[j];
        }
  }
  for (int w = 0; w < 3; w++)
    T_CHECK(equal[w] == N, "P=%d: %d of %d batches equal the P=1 batch", worlds[w], equal[w], N);
  T_CHECK(disjoint == checked, "%d of %d cross-rank window pairs coincide", checked - disjoint,
          checked);
  for (int w = 0; w < 3; w++)
    for (int r = 0; r < worlds[w]; r++) bam_loader_free(&rank[w][r]);
  free(ref_in), free(ref_tg), free(cat_in), free(cat_tg);
  bam_loader_free(&one);
}

/* seek(k) then next() is the k-th batch, backwards and forwards, on every rank. */
static void test_seek(void) {
  const int T = 16, B = 8, N = 60;
  const char *spec = "alpha:0.4,beta:0.4,gamma:0.2";
  bam_loader *ref = make(spec, T, B, 1, 2, 5);
  bam_loader *l = make(spec, T, B, 1, 2, 5);
  if (!ref || !l) return;
  size_t n = (size_t)(B / 2) * T;
  int32_t *all_in = malloc((size_t)N * n * 4), *all_tg = malloc((size_t)N * n * 4);
  int32_t *in = malloc(n * 4), *tg = malloc(n * 4);
  for (int b = 0; b < N; b++) T_OK(bam_loader_next(ref, all_in + b * n, all_tg + b * n));
  const int64_t order[] = {37, 0, 59, 12, 12, 13, 45, 1};
  for (size_t i = 0; i < sizeof order / sizeof order[0]; i++) {
    int64_t k = order[i];
    bam_loader_seek(l, k);
    T_CHECK(bam_loader_position(l) == k, "position after seek(%lld) is %lld", (long long)k,
            (long long)bam_loader_position(l));
    T_OK(bam_loader_next(l, in, tg));
    T_CHECK(!memcmp(in, all_in + k * n, n * 4) && !memcmp(tg, all_tg + k * n, n * 4),
            "seek(%lld) then next differs from batch %lld", (long long)k, (long long)k);
  }
  bam_loader_seek(l, -3);
  T_CHECK(bam_loader_position(l) == 0, "seek(-3) gives position %lld",
          (long long)bam_loader_position(l));
  /* a fresh loader seeking straight to the end */
  bam_loader *fresh = make(spec, T, B, 1, 2, 5);
  if (fresh) {
    bam_loader_seek(fresh, N - 1);
    T_OK(bam_loader_next(fresh, in, tg));
    T_CHECK(!memcmp(in, all_in + (N - 1) * n, n * 4), "fresh seek(%d) differs", N - 1);
    bam_loader_free(&fresh);
  }
  free(all_in), free(all_tg), free(in), free(tg);
  bam_loader_free(&ref);
  bam_loader_free(&l);
}

/* bam_split_open reads no tokens; bam_split_read of any range equals the split loaded whole
 * (gamma is chunked and compressed); reads outside the split fail naming the file. */
static void test_streamed_read(void) {
  int32_t *buf = malloc(5000 * sizeof *buf);
  for (int d = 0; d < 3; d++) {
    const bam_split *ref = &splits[d];
    bam_split s;
    T_OK(bam_split_open(&s, dir, names[d], "train", VOCAB));
    T_CHECK(s.tokens == NULL && s.stream != NULL, "%s: open loaded tokens", names[d]);
    T_CHECK(s.n_tokens == ref->n_tokens && s.vocab_size == ref->vocab_size &&
                s.eos_id == ref->eos_id && s.n_docs == ref->n_docs &&
                s.text_bytes == ref->text_bytes && !strcmp(s.tokenizer, ref->tokenizer),
            "%s: open and load disagree on the attributes", names[d]);
    bam_rng r;
    bam_rng_seed(&r, 11, (uint64_t)d);
    int same = 0, tried = 0;
    for (int t = 0; t < 200; t++) {
      int64_t start = (int64_t)bam_rng_below(&r, (uint64_t)s.n_tokens + 1);
      int64_t count = (int64_t)bam_rng_below(&r, (uint64_t)(s.n_tokens - start) + 1);
      if (t == 0) start = 0, count = s.n_tokens;   /* everything */
      if (t == 1) start = s.n_tokens - 1, count = 1; /* the last token */
      memset(buf, 0xff, 5000 * sizeof *buf);
      tried++;
      if (bam_split_read(&s, start, count, buf) != BAM_OK) continue;
      same += !memcmp(buf, ref->tokens + start, (size_t)count * sizeof *buf) &&
              (count == s.n_tokens || buf[count] == -1); /* and nothing past count */
    }
    T_CHECK(same == tried, "%s: %d of %d streamed reads equal the loaded split", names[d], same,
            tried);
    char path[256], frag[128];
    snprintf(path, sizeof path, "%s/tokens/%s.h5", dir, names[d]);
    snprintf(frag, sizeof frag, "tokens [%lld, %lld) are outside dataset '/train' of %lld tokens",
             (long long)s.n_tokens - 5, (long long)s.n_tokens + 1, (long long)s.n_tokens);
    expect_error(bam_split_read(&s, s.n_tokens - 5, 6, buf), BAM_ERR_ARG, "read past the end",
                 path, frag);
    expect_error(bam_split_read(&s, -1, 2, buf), BAM_ERR_ARG, "read before the start", path,
                 "tokens [-1, 1) are outside");
    expect_error(bam_split_read(&s, 0, INT64_MAX, buf), BAM_ERR_ARG, "huge read", path,
                 "are outside dataset");
    T_OK(bam_split_read(&s, s.n_tokens, 0, buf)); /* an empty read at the end is fine */
    bam_split_free(&s);
    T_CHECK(s.stream == NULL && s.n_tokens == 0, "bam_split_free clears a streamed split");
  }
  expect_error(bam_split_read(&splits[0], 0, 1, buf), BAM_ERR_ARG, "read of a loaded split",
               "domain 'alpha' is not open", NULL);
  free(buf);
}

/* The sampling contract of bam/data.h, computed here from its text and the loaded splits:
 * the window start of domain d's k-th sample. Recomputes the epoch's permutation on every
 * call (no cache: slow and obviously so). */
static int64_t contract_start(uint64_t seed, int d, int64_t k, int64_t n_slots, int T,
                              uint32_t *perm) {
  int64_t e = k / n_slots;
  bam_rng r;
  bam_rng_seed(&r, seed, ((uint64_t)(d + 1) << 56) ^ (uint64_t)e);
  int64_t off = (int64_t)bam_rng_below(&r, (uint64_t)T);
  for (int64_t i = 0; i < n_slots; i++) perm[i] = (uint32_t)i;
  for (int64_t i = n_slots - 1; i > 0; i--) { /* Fisher-Yates, from the top */
    int64_t x = (int64_t)bam_rng_below(&r, (uint64_t)i + 1);
    uint32_t t = perm[i];
    perm[i] = perm[x];
    perm[x] = t;
  }
  return off + (int64_t)perm[k % n_slots] * T;
}

/* Every rank's streamed batch is bitwise the contract's windows of the loaded splits, for
 * P = 1, 2, 4, across several epochs of beta, and after a seek. */
static void test_contract(void) {
  const int T = 16, B = 8, N = 120; /* 960 samples: beta (124 slots) sees about 4 epochs */
  const char *spec = "alpha:1,beta:2,gamma:1";
  const double cum[3] = {0.25, 0.75, 1.0}; /* its cumulative normalised weights */
  const uint64_t seed = 2024;
  uint32_t *perm = malloc(5000 * sizeof *perm);
  size_t n = (size_t)B * T;
  int32_t *want_in = malloc((size_t)N * n * 4), *want_tg = malloc((size_t)N * n * 4);
  int32_t *in = malloc(n * 4), *tg = malloc(n * 4);
  int64_t count[3] = {0, 0, 0};
  for (int64_t j = 0; j < (int64_t)N * B; j++) {
    double u = (double)(bam_hash64(seed ^ bam_hash64((uint64_t)j)) >> 11) * 0x1.0p-53;
    int d = u < cum[0] ? 0 : u < cum[1] ? 1 : 2;
    const bam_split *s = &splits[d];
    int64_t start = contract_start(seed, d, count[d]++, (s->n_tokens - T) / T, T, perm);
    memcpy(want_in + j * T, s->tokens + start, (size_t)T * 4);
    memcpy(want_tg + j * T, s->tokens + start + 1, (size_t)T * 4);
  }
  const int worlds[3] = {1, 2, 4};
  for (int wi = 0; wi < 3; wi++) {
    int P = worlds[wi], lb = B / P;
    for (int r = 0; r < P; r++) {
      bam_loader *l = make(spec, T, B, r, P, seed);
      if (!l) continue;
      int equal = 0;
      for (int b = 0; b < N; b++) {
        T_OK(bam_loader_next(l, in, tg));
        size_t at = (size_t)b * n + (size_t)r * lb * T;
        equal += !memcmp(in, want_in + at, (size_t)lb * T * 4) &&
                 !memcmp(tg, want_tg + at, (size_t)lb * T * 4);
      }
      T_CHECK(equal == N, "P=%d rank %d: %d of %d batches follow the contract", P, r, equal, N);
      bam_loader_seek(l, 77);
      T_OK(bam_loader_next(l, in, tg));
      size_t at = (size_t)77 * n + (size_t)r * lb * T;
      T_CHECK(!memcmp(in, want_in + at, (size_t)lb * T * 4), "P=%d rank %d: seek(77) differs",
              P, r);
      bam_loader_free(&l);
    }
  }
  free(perm), free(want_in), free(want_tg), free(in), free(tg);
}

/* Token 77777 of latebad's 100000 is out of range. Create succeeds (it reads no tokens);
 * bam_loader_next fails at the first batch holding a window over it, on the rank that reads
 * that window, naming the file and the index, and leaves the position where it was. */
static void test_late_bad_token(void) {
  const int T = 16, B = 8;
  const int64_t bad = 77777;
  char path[256];
  snprintf(path, sizeof path, "%s/tokens/latebad.h5", dir);
  const char *msg = "token 150 at index 77777 of /train is out of range for vocab_size 100";
  bam_split s;
  expect_error(bam_split_load(&s, dir, "latebad", "train", VOCAB), BAM_ERR_DATA,
               "bad token, whole split", path, msg);
  bam_loader *ref = make("latebad", T, B, 0, 1, 8);
  if (!ref) return;
  /* the first batch with a window [off, off + T] over the bad token, and its samples that
   * hold it (two neighbouring windows share a token) */
  int64_t fail_b = -1;
  unsigned holders = 0;
  for (int64_t b = 0; b < 1000 && fail_b < 0; b++)
    for (int i = 0; i < B; i++) {
      int d;
      int64_t off;
      T_OK(bam_loader_window(ref, b, i, &d, &off));
      if (off <= bad && bad <= off + T) fail_b = b, holders |= 1u << i;
    }
  bam_loader_free(&ref);
  T_CHECK(fail_b > 10, "the bad token is read at batch %lld, expected later",
          (long long)fail_b);
  if (fail_b < 0) return;
  int32_t *in = malloc((size_t)B * T * 4), *tg = malloc((size_t)B * T * 4);
  for (int P = 1; P <= 2; P++)
    for (int r = 0; r < P; r++) {
      bam_loader *l = make("latebad", T, B, r, P, 8);
      if (!l) continue;
      int64_t ok = 0;
      while (ok < fail_b && bam_loader_next(l, in, tg) == BAM_OK) ok++;
      T_CHECK(ok == fail_b, "P=%d rank %d: batch %lld failed before batch %lld", P, r,
              (long long)ok, (long long)fail_b);
      bam_error_clear();
      int owner = 0;
      for (int i = r * B / P; i < (r + 1) * B / P; i++) owner |= (holders >> i) & 1;
      bam_status st = bam_loader_next(l, in, tg);
      if (owner) {
        char what[64];
        snprintf(what, sizeof what, "P=%d rank %d: the batch with the bad token", P, r);
        expect_error(st, BAM_ERR_DATA, what, path, msg);
        T_CHECK(bam_loader_position(l) == fail_b, "P=%d rank %d: a failed next moved to %lld", P,
                r, (long long)bam_loader_position(l));
        expect_error(bam_loader_next(l, in, tg), BAM_ERR_DATA, "the same batch again", path,
                     msg);
      } else {
        T_CHECK(st == BAM_OK, "P=%d rank %d does not read the bad window but failed: %s", P, r,
                bam_error_message());
        bam_error_clear();
      }
      bam_loader_free(&l);
    }
  free(in), free(tg);
}

static void test_errors(void) {
  bam_mix mix;
  bam_loader *l = NULL;
  bam_split s;
  char path[256];
  bam_status st;

  /* a missing file: the path and what to run */
  bam_mix_parse(&mix, "alpha:0.5,nosuch:0.5");
  st = bam_loader_create(&l, dir, &mix, "train", 16, 8, 0, 1, 1, VOCAB);
  snprintf(path, sizeof path, "%s/tokens/nosuch.h5", dir);
  expect_error(st, BAM_ERR_IO, "missing file", path, "no such file (run data/prepare.sh)");
  T_CHECK(l == NULL, "a failed create leaves no loader");

  /* the vocabulary differs from the model's */
  bam_mix_parse(&mix, "alpha");
  st = bam_loader_create(&l, dir, &mix, "train", 16, 8, 0, 1, 1, 4096);
  snprintf(path, sizeof path, "%s/tokens/alpha.h5", dir);
  expect_error(st, BAM_ERR_DATA, "vocab mismatch", path,
               "attribute 'vocab_size' is 100 but the config's model.vocab_size is 4096");

  /* a token outside the vocabulary */
  st = bam_split_load(&s, dir, "outofrange", "train", VOCAB);
  expect_error(st, BAM_ERR_DATA, "token out of range", "tokens/outofrange.h5",
               "token 150 at index 17 of /train is out of range for vocab_size 100");
  T_CHECK(s.tokens == NULL, "a failed load leaves no tokens");

  /* global_batch not divisible by the world size, and other bad arguments */
  bam_mix_parse(&mix, "alpha");
  st = bam_loader_create(&l, dir, &mix, "train", 16, 6, 0, 4, 1, VOCAB);
  expect_error(st, BAM_ERR_ARG, "indivisible batch", "global_batch 6",
               "not divisible by the world size 4");
  st = bam_loader_create(&l, dir, &mix, "train", 16, 8, 4, 4, 1, VOCAB);
  expect_error(st, BAM_ERR_ARG, "rank out of range", "rank 4", NULL);
  st = bam_loader_create(&l, dir, &mix, "train", 0, 8, 0, 1, 1, VOCAB);
  expect_error(st, BAM_ERR_ARG, "T = 0", "T = 0", NULL);

  /* too few tokens for T */
  st = bam_loader_create(&l, dir, &mix, "val", 400, 8, 0, 1, 1, VOCAB);
  expect_error(st, BAM_ERR_DATA, "short split", "alpha.h5: /val has 600 tokens", "T = 400");

  /* domains prepared with different tokenizers */
  bam_mix_parse(&mix, "alpha,othertok");
  st = bam_loader_create(&l, dir, &mix, "train", 16, 8, 0, 1, 1, VOCAB);
  expect_error(st, BAM_ERR_DATA, "tokenizer mismatch", "othertok.h5: attribute 'tokenizer'",
               "0123456789abcdef");

  /* malformed files */
  st = bam_split_load(&s, dir, "wrongdomain", "train", VOCAB);
  expect_error(st, BAM_ERR_DATA, "domain attribute", "wrongdomain.h5: attribute 'domain' is "
               "'alpha'", NULL);
  st = bam_split_load(&s, dir, "nodocs", "train", VOCAB);
  expect_error(st, BAM_ERR_DATA, "missing dataset attribute", "nodocs.h5",
               "attribute 'n_docs' of /train is missing");
  st = bam_split_load(&s, dir, "notok", "train", VOCAB);
  expect_error(st, BAM_ERR_DATA, "missing file attribute", "notok.h5",
               "attribute 'tokenizer' is missing");
  st = bam_split_load(&s, dir, "badeos", "train", VOCAB);
  expect_error(st, BAM_ERR_DATA, "eos out of range", "badeos.h5", "attribute 'eos_id' is 100");
  st = bam_split_load(&s, dir, "trainonly", "val", VOCAB);
  expect_error(st, BAM_ERR_DATA, "missing dataset", "trainonly.h5", "no dataset '/val'");
  st = bam_split_load(&s, dir, "garbage", "train", VOCAB);
  expect_error(st, BAM_ERR_HDF5, "not HDF5", "garbage.h5", "not a readable HDF5 file");

  /* bam_loader_window's arguments */
  l = make("alpha", 16, 8, 0, 1, 1);
  if (l) {
    int d;
    int64_t off;
    expect_error(bam_loader_window(l, 0, 8, &d, &off), BAM_ERR_ARG, "window i = B",
                 "no sample 8 of batch 0", NULL);
    expect_error(bam_loader_window(l, -1, 0, &d, &off), BAM_ERR_ARG, "window batch -1",
                 "batch -1", NULL);
    bam_loader_free(&l);
  }
}

int main(void) {
  H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
  snprintf(dir, sizeof dir, "/tmp/bam_test_loader_XXXXXX");
  if (!mkdtemp(dir)) {
    perror("mkdtemp");
    return 1;
  }
  char path[256];
  snprintf(path, sizeof path, "%s/tokens", dir);
  if (mkdir(path, 0755) != 0) {
    perror(path);
    return 1;
  }
  file_opts o = defaults();
  write_file("alpha", 3000, 600, &o);
  o.fixed_strings = 1;
  write_file("beta", 2000, 500, &o);
  o = defaults();
  o.chunked = 1;
  write_file("gamma", 5000, 800, &o);
  o = defaults();
  o.bad_index = 77777; /* far into the split: only the window holding it finds it */
  o.bad_value = 150;
  write_file("latebad", 100000, 100, &o);
  o.bad_index = 17;
  o.bad_value = 150;
  write_file("outofrange", 1000, 100, &o);
  o = defaults();
  o.tokenizer = "0123456789abcdef";
  write_file("othertok", 1000, 100, &o);
  o = defaults();
  o.domain_attr = "alpha";
  write_file("wrongdomain", 1000, 100, &o);
  o = defaults();
  o.omit = "n_docs";
  write_file("nodocs", 1000, 100, &o);
  o = defaults();
  o.omit = "tokenizer";
  write_file("notok", 1000, 100, &o);
  o = defaults();
  o.eos = VOCAB;
  write_file("badeos", 1000, 100, &o);
  o = defaults();
  write_file("trainonly", 1000, -1, &o);
  snprintf(path, sizeof path, "%s/tokens/garbage.h5", dir);
  FILE *f = fopen(path, "wb");
  if (f) {
    fputs("this is not an HDF5 file\n", f);
    fclose(f);
  }

  test_split();
  test_mix();
  test_determinism();
  test_windows_epochs_mixing();
  test_ranks();
  test_seek();
  test_streamed_read();
  test_contract();
  test_late_bad_token();
  test_errors();

  for (int d = 0; d < 3; d++) bam_split_free(&splits[d]);
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
  BAM_TEST_END();
}
