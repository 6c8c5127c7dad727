/* bam-test-ranks: 1 2 4
 *
 * Sharded checkpoints under P ranks: bitwise round trip of parameters, moments and metadata;
 * resharding (reading with the ranges of another rank count); `latest`, pruning, replacing a
 * step, stale temporary folders; a failure on one rank reported on all; single-file export,
 * inspect, legacy files; and every kind of damage refused on every rank with a message naming
 * the file and the tensor.
 *
 * Values are a formula of (buffer, element, step) so that Python can recompute them:
 *   value = ((i * 7 + b * 1000003 + step * 13) % 65521) * 0.125 - 4096   (exact in float32)
 * Extra modes (driven by the shell tests in this folder):
 *   BAM_CKPT_KEEP_DIR=<dir>   only save step 7 (with moments, keep 1) into <dir> and read it back
 *   BAM_CKPT_KILL_DIR=<dir>   save step 1, then save step 2 with a long test pause (to be killed)
 *   BAM_CKPT_CHECK_DIR=<dir>  after the kill: step 1 intact, then step 2 saves over the debris */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <hdf5.h>
#include <mpi.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bam/ckpt.h"
#include "bam/shard.h"
#include "test_util.h"

static int rank, world;
static char root[256];
static const char *const bufname[3] = {"params", "adam_m", "adam_v"};

typedef struct {
  bam_tensor_info t[BAM_MAX_TENSORS];
  int nt;
  size_t n;
  bam_model_shape shape;
} layout;

static bam_model_shape shape_of(int d, int tied) {
  return (bam_model_shape){.n_layers = 2, .d_model = d, .n_heads = 4, .n_kv_heads = 2,
                           .d_ff = 256, .vocab_size = 50, .seq_len = 8, .tie_embeddings = tied,
                           .rope_base = 10000, .norm_eps = 1e-5f};
}

static layout make_layout(int d, int tied) {
  layout L;
  memset(&L, 0, sizeof L);
  L.shape = shape_of(d, tied);
  L.nt = bam_model_tensors(&L.shape, L.t, &L.n);
  return L;
}

static const bam_tensor_info *find(const layout *L, const char *name) {
  for (int i = 0; i < L->nt; i++)
    if (!strcmp(L->t[i].name, name)) return &L->t[i];
  return NULL;
}

static float val(int b, size_t i, int64_t step) {
  return (float)((i * 7 + (size_t)b * 1000003 + (size_t)step * 13) % 65521) * 0.125f - 4096.0f;
}

/* A recognisable byte pattern inside w_up's parameters, to find and damage it in a shard. */
static const float marker[4] = {12345.5f, -23456.25f, 34567.125f, -45678.0625f};
static size_t marker_pos(const layout *L) {
  const bam_tensor_info *w = find(L, "w_up");
  return w->offset + w->numel / 2;
}

static void fill(float *buf[3], const layout *L, int64_t step, int with_marker) {
  for (int b = 0; b < 3; b++)
    for (size_t i = 0; i < L->n; i++) buf[b][i] = val(b, i, step);
  if (with_marker) memcpy(buf[0] + marker_pos(L), marker, sizeof marker);
}

static const char *config_text = "[model]\nd_model = 64\nn_layers = 2\n";
static const char *lineage_text = "seed = 42\nparent = none\n";

static bam_status save(const char *dir, int64_t step, int keep, int moments, const layout *L,
                       float *buf[3], char *out, size_t cap) {
  bam_range own = bam_partition(L->n, rank, world);
  int64_t loader = 100 + rank + step;
  uint64_t rng[4] = {(uint64_t)rank, (uint64_t)step, 0xdeadbeefcafef00dULL, UINT64_MAX - (uint64_t)rank};
  bam_ckpt_info info = {.step = step, .tokens_seen = step * 1000 + 7, .config_text = (char *)config_text,
                        .lineage_text = (char *)lineage_text, .world = world,
                        .loader_state = &loader, .rng_state = rng};
  bam_strlcpy(info.kind, "dense", sizeof info.kind);
  bam_strlcpy(info.tokenizer, "tok-0123abcd", sizeof info.tokenizer);
  return bam_ckpt_save_sharded(dir, &info, L->t, L->nt, L->n, own, buf[0] + own.lo,
                               moments ? buf[1] + own.lo : NULL, moments ? buf[2] + own.lo : NULL,
                               keep, MPI_COMM_WORLD, out, cap);
}

static void expect_error(bam_status st, const char *a, const char *b) {
  T_CHECK(st != BAM_OK, "rank %d: damage was not detected (expected '%s')", rank, a ? a : "");
  const char *msg = bam_error_message();
  if (getenv("BAM_TEST_VERBOSE") && rank == world - 1) printf("refused: %s\n", msg);
  T_CHECK(a == NULL || strstr(msg, a), "rank %d: message '%s' lacks '%s'", rank, msg, a);
  T_CHECK(b == NULL || strstr(msg, b), "rank %d: message '%s' lacks '%s'", rank, msg, b);
  bam_error_clear();
}

static void bam_mkdir_test(const char *path) {
  if (mkdir(path, 0755) != 0 && errno != EEXIST) fprintf(stderr, "mkdir %s: %s\n", path, strerror(errno));
}

static int exists(const char *path) {
  struct stat sb;
  return lstat(path, &sb) == 0;
}

static void path_of(char *out, size_t cap, const char *a, const char *b) {
  if ((size_t)snprintf(out, cap, "%s/%s", a, b) >= cap) {
    fprintf(stderr, "path too long: %s/%s\n", a, b);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
}

static int count_tmp(const char *dir) {
  char cmd[512];
  snprintf(cmd, sizeof cmd, "ls -A %s | grep -c '^\\.tmp-' > /dev/null", dir);
  return system(cmd) == 0; /* 1 if any .tmp-* entry */
}

static int read_text(const char *path, char *buf, size_t cap) {
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  size_t n = fread(buf, 1, cap - 1, f);
  buf[n] = 0;
  fclose(f);
  return (int)n;
}

/* Every element of [r.lo, r.hi) of every buffer equals the formula (and the marker). */
static int check_range(bam_ckpt *c, bam_range r, int nbuf, const layout *L, int64_t step, int with_marker) {
  float *expect[3], *got = malloc((r.hi - r.lo + 1) * sizeof(float));
  for (int b = 0; b < 3; b++) expect[b] = malloc(L->n * sizeof(float));
  fill(expect, L, step, with_marker);
  int ok = 1;
  for (int b = 0; b < nbuf && ok; b++) {
    bam_status st = bam_ckpt_read(c, bufname[b], r, got);
    T_CHECK(st == BAM_OK, "rank %d: read %s [%zu, %zu): %s", rank, bufname[b], r.lo,
            r.hi, bam_error_message());
    if (st != BAM_OK) bam_error_clear(), ok = 0;
    else if (memcmp(got, expect[b] + r.lo, (r.hi - r.lo) * sizeof(float)) != 0) ok = 0;
    T_CHECK(ok, "rank %d: %s [%zu, %zu) differs from what was saved", rank, bufname[b],
            r.lo, r.hi);
  }
  for (int b = 0; b < 3; b++) free(expect[b]);
  free(got);
  return ok;
}

static void barrier(void) { MPI_Barrier(MPI_COMM_WORLD); }

/* ---- rank-0 tools that damage files -------------------------------------------------------- */

static long file_size(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0 ? (long)sb.st_size : -1;
}

static int flip_marker(const char *path) {
  FILE *f = fopen(path, "r+b");
  if (!f) return 0;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  unsigned char *buf = malloc((size_t)n);
  fseek(f, 0, SEEK_SET);
  int found = 0;
  if (fread(buf, 1, (size_t)n, f) == (size_t)n) {
    unsigned char *at = memmem(buf, (size_t)n, marker, sizeof marker);
    if (at) {
      at[5] ^= 0x40;
      fseek(f, (long)(at - buf), SEEK_SET);
      found = fwrite(at, 1, 8, f) == 8;
    }
  }
  free(buf);
  fclose(f);
  return found;
}

/* Rewrites one field of one row of an index table through a member-subset compound type. */
static int patch_index(const char *idx, const char *table, const char *field, int row,
                       hid_t field_type, const void *value) {
  hid_t f = H5Fopen(idx, H5F_ACC_RDWR, H5P_DEFAULT);
  if (f < 0) return 0;
  hid_t d = H5Dopen2(f, table, H5P_DEFAULT);
  size_t sz = H5Tget_size(field_type);
  hid_t mt = H5Tcreate(H5T_COMPOUND, sz);
  H5Tinsert(mt, field, 0, field_type);
  hsize_t start = (hsize_t)row, count = 1;
  hid_t fs = H5Dget_space(d), ms = H5Screate_simple(1, &count, NULL);
  H5Sselect_hyperslab(fs, H5S_SELECT_SET, &start, NULL, &count, NULL);
  herr_t e = H5Dwrite(d, mt, ms, fs, H5P_DEFAULT, value);
  H5Sclose(ms), H5Sclose(fs), H5Tclose(mt), H5Dclose(d), H5Fclose(f);
  return e >= 0;
}

static int row_of(const layout *L, const char *name) {
  for (int i = 0; i < L->nt; i++)
    if (!strcmp(L->t[i].name, name)) return i;
  return -1;
}

/* The tensor holding the first element of the last shard (the first one its messages name). */
static const char *first_of_last_shard(const layout *L) {
  size_t lo = bam_partition(L->n, world - 1, world).lo;
  for (int i = 0; i < L->nt; i++)
    if (lo >= L->t[i].offset && lo < L->t[i].offset + L->t[i].numel) return L->t[i].name;
  return "?";
}

static int shard_of(const layout *L, size_t pos) {
  for (int s = 0; s < world; s++) {
    bam_range r = bam_partition(L->n, s, world);
    if (pos >= r.lo && pos < r.hi) return s;
  }
  return -1;
}

/* ---- the tests ------------------------------------------------------------------------------ */

static void test_crc_and_partition(void) {
  T_CHECK(bam_crc32c(0, "123456789", 9) == 0xE3069283u, "CRC-32C check value 0x%08x",
          bam_crc32c(0, "123456789", 9));
  T_CHECK(bam_crc32c(0, "", 0) == 0, "CRC of nothing");
  /* against a bit-at-a-time reference, at every alignment and length up to 64 */
  unsigned char data[80];
  for (int i = 0; i < 80; i++) data[i] = (unsigned char)(i * 37 + 11);
  int ok = 1;
  for (int off = 0; off < 8; off++)
    for (int len = 0; len <= 64; len++) {
      uint32_t c = 0xFFFFFFFFu;
      for (int k = 0; k < len; k++) {
        c ^= data[off + k];
        for (int j = 0; j < 8; j++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      }
      ok &= bam_crc32c(0, data + off, (size_t)len) == ~c;
      ok &= bam_crc32c(bam_crc32c(0, data + off, (size_t)len / 3), data + off + len / 3,
                       (size_t)(len - len / 3)) == ~c;
    }
  T_CHECK(ok, "slice-by-8 CRC-32C differs from the bitwise reference");
  /* partitions: tile [0, n), boundaries multiples of 16, sizes within 16 of each other */
  size_t ns[] = {0, 1, 15, 16, 17, 1000, 129472, 1000003};
  for (size_t k = 0; k < sizeof ns / sizeof ns[0]; k++)
    for (int P = 1; P <= 9; P++) {
      size_t at = 0, mn = (size_t)-1, mx = 0;
      int good = 1;
      for (int r = 0; r < P; r++) {
        bam_range g = bam_partition(ns[k], r, P);
        good &= g.lo == at && g.hi >= g.lo && (g.lo % 16 == 0 || g.lo == ns[k]);
        at = g.hi;
        if (g.hi < ns[k]) mn = g.hi - g.lo < mn ? g.hi - g.lo : mn, mx = g.hi - g.lo > mx ? g.hi - g.lo : mx;
      }
      good &= at == ns[k] && (mx == 0 || mx - mn <= 16);
      T_CHECK(good, "bam_partition(%zu, *, %d) is not a balanced tiling", ns[k], P);
    }
}

/* bam_ckpt_save_pieces: every rank holds scattered chunks of the layout (as an expert-sharded
 * trainer does), compacted in its own buffers, moments at other offsets than parameters. The
 * checkpoint reads back as if one buffer had been saved; a gap in the pieces is refused on
 * every rank. */
static bam_status save_chunks(const char *dir, const layout *L, int drop_last, float *buf[3]) {
  const size_t chunk = 37;
  const size_t n_chunks = (L->n + chunk - 1) / chunk;
  bam_ckpt_piece *p = malloc(sizeof *p * n_chunks);
  float *lp = malloc(sizeof(float) * (L->n + 8)), *lm = malloc(sizeof(float) * (L->n + 8)),
        *lv = malloc(sizeof(float) * (L->n + 8));
  int np = 0;
  size_t used = 0;
  for (size_t k = 0; k < n_chunks; k++) {
    if ((int)((k * 3 + 1) % (size_t)world) != rank) continue;
    const size_t g = k * chunk, n = g + chunk <= L->n ? chunk : L->n - g;
    p[np++] = (bam_ckpt_piece){.global = g, .local = used, .state = used + 3, .n = n};
    memcpy(lp + used, buf[0] + g, n * sizeof(float));
    memcpy(lm + used + 3, buf[1] + g, n * sizeof(float));
    memcpy(lv + used + 3, buf[2] + g, n * sizeof(float));
    used += n;
  }
  if (drop_last && rank == 0 && np) np--;
  int64_t loader = 1;
  uint64_t rng[4] = {0, 0, 0, 0};
  bam_ckpt_info info = {.step = 20, .tokens_seen = 1, .config_text = (char *)config_text,
                        .world = world, .loader_state = &loader, .rng_state = rng};
  bam_strlcpy(info.kind, "btx", sizeof info.kind);
  bam_strlcpy(info.tokenizer, "tok-0123abcd", sizeof info.tokenizer);
  /* pieces given out of order: the function sorts them */
  for (int i = 0; i < np / 2; i++) {
    bam_ckpt_piece t = p[i];
    p[i] = p[np - 1 - i], p[np - 1 - i] = t;
  }
  bam_status st = bam_ckpt_save_pieces(dir, &info, L->t, L->nt, L->n, p, np, lp, lm, lv, 1,
                                       MPI_COMM_WORLD, NULL, 0);
  free(p), free(lp), free(lm), free(lv);
  return st;
}

static void test_pieces(const layout *L, float *buf[3]) {
  char dir[300];
  path_of(dir, sizeof dir, root, "pieces");
  fill(buf, L, 20, 0);
  T_OK(save_chunks(dir, L, 0, buf));
  bam_ckpt *c = NULL;
  T_OK(bam_ckpt_open(&c, dir));
  if (c) {
    check_range(c, (bam_range){0, L->n}, 3, L, 20, 0);
    T_CHECK(bam_ckpt_get_info(c)->world == world, "pieces: written by %d ranks",
            bam_ckpt_get_info(c)->world);
    bam_ckpt_close(&c);
  }
  char dir2[300];
  path_of(dir2, sizeof dir2, root, "pieces-gap");
  bam_status st = save_chunks(dir2, L, 1, buf);
  T_CHECK(st != BAM_OK, "rank %d: a gap in the pieces was accepted", rank);
  bam_error_clear();
  barrier();
}

static void test_roundtrip_and_reshard(const layout *L, float *buf[3]) {
  char dir[300], out[512], expect[512], text[64];
  path_of(dir, sizeof dir, root, "ckpt");
  fill(buf, L, 10, 1);
  T_OK(save(dir, 10, 2, 1, L, buf, out, sizeof out));
  path_of(expect, sizeof expect, dir, "step-000010");
  T_CHECK(!strcmp(out, expect), "out_path '%s'", out);
  char latest[512];
  path_of(latest, sizeof latest, dir, "latest");
  T_CHECK(read_text(latest, text, sizeof text) > 0 && !strcmp(text, "step-000010\n"), "latest '%s'", text);
  int found = 0;
  char got[512];
  T_OK(bam_ckpt_latest(dir, got, sizeof got, &found));
  T_CHECK(found && !strcmp(got, expect), "bam_ckpt_latest: %d '%s'", found, got);
  T_CHECK(!count_tmp(dir), "a .tmp-* entry is left in %s", dir);

  bam_ckpt *c = NULL;
  T_OK(bam_ckpt_open(&c, dir));
  if (!c) return;
  T_CHECK(!strcmp(bam_ckpt_path(c), expect), "resolved '%s'", bam_ckpt_path(c));
  T_OK(bam_ckpt_check_layout(c, L->t, L->nt, L->n));
  T_CHECK(bam_ckpt_has_moments(c), "moments");
  int nt = 0;
  size_t np = 0;
  const bam_tensor_info *st = bam_ckpt_tensors(c, &nt, &np);
  T_CHECK(nt == L->nt && np == L->n && !strcmp(st[nt - 1].name, L->t[nt - 1].name), "stored layout");
  /* this rank's own range of every buffer, and all parameters */
  check_range(c, bam_partition(L->n, rank, world), 3, L, 10, 1);
  check_range(c, (bam_range){0, L->n}, 1, L, 10, 1);
  const bam_ckpt_info *in = bam_ckpt_get_info(c);
  T_CHECK(!strcmp(in->kind, "dense") && in->step == 10 && in->tokens_seen == 10007, "kind/step/tokens");
  T_CHECK(!strcmp(in->tokenizer, "tok-0123abcd"), "tokenizer '%s'", in->tokenizer);
  T_CHECK(in->config_text && !strcmp(in->config_text, config_text), "config text");
  T_CHECK(in->lineage_text && !strcmp(in->lineage_text, lineage_text), "lineage text");
  T_CHECK(in->world == world, "world %d", in->world);
  int meta_ok = 1;
  for (int r = 0; r < world; r++) {
    meta_ok &= in->loader_state[r] == 100 + r + 10;
    meta_ok &= in->rng_state[4 * r] == (uint64_t)r && in->rng_state[4 * r + 1] == 10 &&
               in->rng_state[4 * r + 2] == 0xdeadbeefcafef00dULL &&
               in->rng_state[4 * r + 3] == UINT64_MAX - (uint64_t)r;
  }
  T_CHECK(meta_ok, "loader or RNG state of some rank differs");
  bam_ckpt_close(&c);

  /* Resharding: read with the ranges of other rank counts, ranks sharing the work; each
   * handle is fresh, so the partial first reads go through the whole-dataset CRC check. */
  int counts[] = {1, 3, 5, 7};
  for (size_t k = 0; k < sizeof counts / sizeof counts[0]; k++) {
    T_OK(bam_ckpt_open(&c, expect));
    if (!c) continue;
    int ok = 1;
    for (int q = rank; q < counts[k]; q += world)
      ok &= check_range(c, bam_partition(L->n, q, counts[k]), 3, L, 10, 1);
    T_CHECK(ok, "resharding to %d ranks", counts[k]);
    bam_ckpt_close(&c);
  }
  /* odd ranges across shard boundaries, single elements, and reads after verification */
  T_OK(bam_ckpt_open(&c, expect));
  if (c) {
    for (int s = 0; s < world; s++) {
      bam_range g = bam_partition(L->n, s, world);
      if (g.lo > 0) check_range(c, (bam_range){g.lo - 1, g.lo + 1}, 3, L, 10, 1);
      if (g.hi > g.lo) check_range(c, (bam_range){g.hi - 1, g.hi}, 3, L, 10, 1);
    }
    check_range(c, (bam_range){1, L->n - 1}, 3, L, 10, 1);
    check_range(c, (bam_range){L->n / 3, L->n / 3 + 100}, 3, L, 10, 1);
    float x;
    expect_error(bam_ckpt_read(c, "params", (bam_range){L->n, L->n + 1}, &x), "outside", NULL);
    expect_error(bam_ckpt_read(c, "adam_x", (bam_range){0, 1}, &x), "adam_x", NULL);
    bam_ckpt_close(&c);
  }
  barrier();
}

static void test_keep_replace_stale(const layout *L, float *buf[3]) {
  char dir[300], p[512], text[64];
  path_of(dir, sizeof dir, root, "ckpt");
  fill(buf, L, 20, 1);
  T_OK(save(dir, 20, 2, 1, L, buf, NULL, 0));
  fill(buf, L, 30, 1);
  T_OK(save(dir, 30, 2, 1, L, buf, NULL, 0));
  path_of(p, sizeof p, dir, "step-000010");
  T_CHECK(!exists(p), "step-000010 was not pruned (keep = 2)");
  path_of(p, sizeof p, dir, "step-000020");
  T_CHECK(exists(p), "step-000020 was pruned");
  bam_ckpt *c = NULL;
  T_OK(bam_ckpt_open(&c, p));
  if (c) check_range(c, bam_partition(L->n, rank, world), 3, L, 20, 1), bam_ckpt_close(&c);
  path_of(p, sizeof p, dir, "latest");
  T_CHECK(read_text(p, text, sizeof text) > 0 && !strcmp(text, "step-000030\n"), "latest '%s'", text);

  /* the same step saved again replaces it (other values), leaving nothing behind */
  barrier();
  fill(buf, L, 31, 1);
  T_OK(save(dir, 30, 2, 1, L, buf, NULL, 0));
  T_OK(bam_ckpt_open(&c, dir));
  if (c) {
    T_CHECK(bam_ckpt_get_info(c)->step == 30, "step");
    check_range(c, (bam_range){0, L->n}, 3, L, 31, 1);
    bam_ckpt_close(&c);
  }
  T_CHECK(!count_tmp(dir), "a .tmp-* entry is left after replacing a step");
  path_of(p, sizeof p, dir, "step-000020");
  T_CHECK(exists(p), "replacing step 30 pruned step 20");

  /* a stale temporary folder (a save killed before publication) is ignored by readers ... */
  barrier();
  char junk[512];
  if (rank == 0) {
    path_of(p, sizeof p, dir, ".tmp-step-000040");
    mkdir(p, 0755);
    path_of(junk, sizeof junk, p, "index.h5");
    FILE *f = fopen(junk, "w");
    if (f) fputs("not a checkpoint", f), fclose(f);
    path_of(p, sizeof p, dir, ".tmp-step-000099");
    mkdir(p, 0755);
  }
  barrier();
  int found = 0;
  char got[512];
  T_OK(bam_ckpt_latest(dir, got, sizeof got, &found));
  T_CHECK(found && strstr(got, "step-000030"), "latest with a stale .tmp: '%s'", got);
  T_OK(bam_ckpt_open(&c, dir));
  if (c) check_range(c, bam_partition(L->n, rank, world), 3, L, 31, 1), bam_ckpt_close(&c);
  barrier();
  /* ... and removed by the next save, which also writes over the stale folder of its step */
  fill(buf, L, 40, 1);
  T_OK(save(dir, 40, 2, 1, L, buf, NULL, 0));
  T_CHECK(!count_tmp(dir), "stale .tmp-* folders were not removed");
  path_of(p, sizeof p, dir, "step-000020");
  T_CHECK(!exists(p), "step-000020 was not pruned");
  T_OK(bam_ckpt_open(&c, dir));
  if (c) check_range(c, bam_partition(L->n, rank, world), 3, L, 40, 1), bam_ckpt_close(&c);
  barrier();
}

static void test_collective_failure(const layout *L, float *buf[3]) {
  char dir[300];
  path_of(dir, sizeof dir, root, "fail");
  /* the last rank passes no parameters for its non-empty range: every rank must fail */
  bam_range own = bam_partition(L->n, rank, world);
  bam_ckpt_info info = {.step = 3};
  bam_strlcpy(info.kind, "dense", sizeof info.kind);
  const float *p = rank == world - 1 ? NULL : buf[0] + own.lo;
  bam_status st = bam_ckpt_save_sharded(dir, &info, L->t, L->nt, L->n, own, p, NULL, NULL, 1,
                                        MPI_COMM_WORLD, NULL, 0);
  if (rank == world - 1) {
    expect_error(st, "passed no parameters", NULL);
  } else {
    char want[64];
    snprintf(want, sizeof want, "rank %d failed while writing the checkpoint", world - 1);
    expect_error(st, want, "passed no parameters");
  }
  /* ranges that do not tile [0, n): refused on every rank alike */
  bam_range bad = {own.lo, own.hi > own.lo ? own.hi - 1 : own.hi};
  if (rank == world - 1) bad.hi = own.hi - 16;
  st = bam_ckpt_save_sharded(dir, &info, L->t, L->nt, L->n, bad, buf[0] + own.lo, NULL, NULL, 1,
                             MPI_COMM_WORLD, NULL, 0);
  expect_error(st, "ranges", NULL);
  char p2[512];
  path_of(p2, sizeof p2, dir, "step-000003");
  T_CHECK(!exists(p2), "a failed save left a step folder");
  T_CHECK(!exists(dir) || !count_tmp(dir), "a failed save left a .tmp-* folder");
  /* failures of rank 0 alone in later phases: the checkpoint folder is a file (phase C), and
   * `latest` cannot be replaced (phase E, after the step folder is published) */
  char notdir[300], fail2[300], latest_dir[512];
  path_of(notdir, sizeof notdir, root, "not-a-folder");
  path_of(fail2, sizeof fail2, root, "fail2");
  path_of(latest_dir, sizeof latest_dir, fail2, "latest");
  if (rank == 0) {
    FILE *f = fopen(notdir, "w");
    if (f) fclose(f);
    bam_mkdir_test(fail2);
    bam_mkdir_test(latest_dir);
  }
  barrier();
  fill(buf, L, 4, 0);
  st = save(notdir, 4, 1, 0, L, buf, NULL, 0);
  expect_error(st, rank == 0 ? "exists and is not a folder" : "rank 0 failed while writing the checkpoint",
               "not-a-folder");
  st = save(fail2, 4, 1, 0, L, buf, NULL, 0);
  expect_error(st, rank == 0 ? "latest" : "rank 0 failed while writing the checkpoint", "latest");
  barrier();
  /* and the next save works: nobody was left behind in a collective */
  fill(buf, L, 3, 0);
  T_OK(save(dir, 3, 1, 0, L, buf, NULL, 0));
  bam_ckpt *c = NULL;
  T_OK(bam_ckpt_open(&c, dir));
  if (c) {
    T_CHECK(!bam_ckpt_has_moments(c), "a parameters-only save has moments");
    float x;
    expect_error(bam_ckpt_read(c, "adam_m", (bam_range){0, 1}, &x), "parameters only", NULL);
    check_range(c, (bam_range){0, L->n}, 1, L, 3, 0);
    bam_ckpt_close(&c);
  }
  barrier();
}

/* A fresh checkpoint in <root>/<name>, for one damage test. */
static void fresh(const char *name, int64_t step, const layout *L, float *buf[3], char *step_dir,
                  size_t cap) {
  char dir[300];
  path_of(dir, sizeof dir, root, name);
  fill(buf, L, step, 1);
  T_OK(save(dir, step, 1, 1, L, buf, step_dir, cap));
}

/* Shards of several verification pieces (bam_ckpt_read checks a dataset's CRC-32C on first
 * touch, streaming it in pieces of about 2^20 floats): reads of a few floats across a piece
 * boundary and across shards, each the first touch of a freshly opened checkpoint, give the
 * saved values, and the streamed CRC matches the index. */
static void test_large_shards(void) {
  layout L = make_layout(1024, 0);
  float *big[3];
  for (int b = 0; b < 3; b++) big[b] = malloc(L.n * sizeof(float));
  char dir[300], sd[512];
  path_of(dir, sizeof dir, root, "large");
  fill(big, &L, 9, 0);
  T_OK(save(dir, 9, 1, 0, &L, big, sd, sizeof sd));
  const size_t piece = (size_t)1 << 20;
  for (int s = 0; s < world; s++) {
    bam_range sh = bam_partition(L.n, s, world);
    T_CHECK(sh.hi - sh.lo > piece + 8, "shard %d holds %zu floats, not two pieces", s,
            sh.hi - sh.lo);
    bam_range rs[2] = {{sh.lo + piece - 3, sh.lo + piece + 5},
                       {sh.hi - 7, sh.hi + 9 < L.n ? sh.hi + 9 : L.n}};
    for (int k = 0; k < 2; k++) {
      bam_ckpt *c = NULL;
      T_OK(bam_ckpt_open(&c, sd));
      if (c) check_range(c, rs[k], 1, &L, 9, 0);
      bam_ckpt_close(&c);
    }
  }
  for (int b = 0; b < 3; b++) free(big[b]);
  barrier();
}

static void test_damage(const layout *L, float *buf[3]) {
  char sd[512], shard[512], name[64], idx[512];
  bam_ckpt *c = NULL;

  /* a truncated shard: refused at open, before anything is read */
  fresh("d-trunc", 5, L, buf, sd, sizeof sd);
  snprintf(name, sizeof name, "shard-%05d-of-%05d.h5", world - 1, world);
  path_of(shard, sizeof shard, sd, name);
  if (rank == 0) T_CHECK(truncate(shard, file_size(shard) / 2) == 0, "truncate");
  barrier();
  expect_error(bam_ckpt_open(&c, sd), name, "truncated?");
  expect_error(bam_ckpt_open(&c, sd), first_of_last_shard(L), NULL);
  barrier();

  /* a flipped byte inside w_up: Fletcher32 refuses the chunk, the message names w_up only */
  fresh("d-flip", 5, L, buf, sd, sizeof sd);
  int s = shard_of(L, marker_pos(L));
  snprintf(name, sizeof name, "shard-%05d-of-%05d.h5", s, world);
  path_of(shard, sizeof shard, sd, name);
  if (rank == 0) T_CHECK(flip_marker(shard), "marker not found in %s", shard);
  barrier();
  T_OK(bam_ckpt_open(&c, sd)); /* same size: only reading finds it */
  if (c) {
    float *all = malloc(L->n * sizeof(float));
    bam_status st = bam_ckpt_read(c, "params", (bam_range){0, L->n}, all);
    const char *msg = bam_error_message();
    T_CHECK(!strstr(msg, "w_gate") && !strstr(msg, "w_down"), "rank %d: '%s' names more than w_up", rank, msg);
    expect_error(st, name, "w_up");
    /* the other datasets of that shard are intact and still readable */
    T_OK(bam_ckpt_read(c, "adam_m", (bam_range){0, L->n}, all));
    free(all);
    bam_ckpt_close(&c);
  }
  barrier();

  /* a missing shard */
  fresh("d-missing", 5, L, buf, sd, sizeof sd);
  snprintf(name, sizeof name, "shard-%05d-of-%05d.h5", 0, world);
  path_of(shard, sizeof shard, sd, name);
  if (rank == 0) T_CHECK(unlink(shard) == 0, "unlink");
  barrier();
  char want[600];
  snprintf(want, sizeof want, "%s: missing (checkpoint incomplete?)", shard);
  expect_error(bam_ckpt_open(&c, sd), want, "wte");
  barrier();

  /* a CRC-32C that does not match (bytes that pass Fletcher32 but are not those saved) */
  fresh("d-crc", 5, L, buf, sd, sizeof sd);
  path_of(idx, sizeof idx, sd, "index.h5");
  if (rank == 0) {
    uint32_t wrong = 12345;
    T_CHECK(patch_index(idx, "shards", "crc32c_adam_v", world - 1, H5T_NATIVE_UINT32, &wrong), "patch");
  }
  barrier();
  T_OK(bam_ckpt_open(&c, sd));
  if (c) {
    snprintf(name, sizeof name, "shard-%05d-of-%05d.h5", world - 1, world);
    float x;
    expect_error(bam_ckpt_read(c, "adam_v", (bam_range){L->n - 1, L->n}, &x), name, "CRC-32C");
    expect_error(bam_ckpt_read(c, "adam_v", (bam_range){L->n - 1, L->n}, &x), first_of_last_shard(L), NULL);
    T_OK(bam_ckpt_read(c, "adam_m", (bam_range){L->n - 1, L->n}, &x));
    bam_ckpt_close(&c);
  }
  barrier();

  /* an index naming a tensor the model does not have */
  fresh("d-name", 5, L, buf, sd, sizeof sd);
  path_of(idx, sizeof idx, sd, "index.h5");
  if (rank == 0) {
    char bogus[64] = "w_bogus";
    hid_t str = H5Tcopy(H5T_C_S1);
    H5Tset_size(str, 64);
    T_CHECK(patch_index(idx, "tensors", "name", row_of(L, "w_head"), str, bogus), "patch");
    H5Tclose(str);
  }
  barrier();
  T_OK(bam_ckpt_open(&c, sd));
  if (c) {
    expect_error(bam_ckpt_check_layout(c, L->t, L->nt, L->n),
                 "index names tensor 'w_bogus' which the model does not have", NULL);
    bam_ckpt_close(&c);
  }
  /* ... and one whose pieces table disagrees with its tensors table */
  barrier();
  if (rank == 0) {
    int64_t off = 1;
    T_CHECK(patch_index(idx, "pieces", "tensor_offset", 0, H5T_NATIVE_INT64, &off), "patch");
  }
  barrier();
  expect_error(bam_ckpt_open(&c, sd), "index.h5", "pieces table");
  barrier();

  /* checkpoints of another model shape, and of a model without a tensor */
  path_of(sd, sizeof sd, root, "ckpt");
  T_OK(bam_ckpt_open(&c, sd));
  if (c) {
    layout small = make_layout(32, 0), tied = make_layout(64, 1);
    expect_error(bam_ckpt_check_layout(c, small.t, small.nt, small.n),
                 "tensor wte has shape (50, 64), the model expects (50, 32) (a checkpoint of "
                 "another model shape?)", NULL);
    expect_error(bam_ckpt_check_layout(c, tied.t, tied.nt, tied.n),
                 "index names tensor 'w_head' which the model does not have", NULL);
    bam_ckpt_close(&c);
  }
  {
    layout tied = make_layout(64, 1);
    char dir[300];
    path_of(dir, sizeof dir, root, "d-tied");
    fill(buf, &tied, 5, 0);
    T_OK(save(dir, 5, 1, 1, &tied, buf, sd, sizeof sd));
    T_OK(bam_ckpt_open(&c, sd));
    if (c) {
      expect_error(bam_ckpt_check_layout(c, L->t, L->nt, L->n),
                   "the model's tensor 'w_head' is not in the checkpoint", NULL);
      bam_ckpt_close(&c);
    }
  }
  barrier();

  /* a shard copied in from another checkpoint */
  char other[512];
  fresh("d-mix-a", 6, L, buf, other, sizeof other);
  fresh("d-mix-b", 7, L, buf, sd, sizeof sd);
  snprintf(name, sizeof name, "shard-%05d-of-%05d.h5", 0, world);
  if (rank == 0) {
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "cp %s/%s %s/%s", other, name, sd, name);
    T_CHECK(system(cmd) == 0, "cp");
  }
  barrier();
  bam_status st = bam_ckpt_open(&c, sd);
  if (st == BAM_OK) {
    float x;
    st = bam_ckpt_read(c, "params", (bam_range){0, 1}, &x);
    bam_ckpt_close(&c);
  }
  expect_error(st, name, NULL);

  /* a `latest` that does not name a step folder, and one that names a removed folder */
  char dir[300], p[512];
  path_of(dir, sizeof dir, root, "d-mix-b");
  if (rank == 0) {
    path_of(p, sizeof p, dir, "latest");
    FILE *f = fopen(p, "w");
    if (f) fputs("../../etc\n", f), fclose(f);
  }
  barrier();
  int found = 0;
  char got[512];
  expect_error(bam_ckpt_latest(dir, got, sizeof got, &found), "not the name of a step folder", NULL);
  path_of(dir, sizeof dir, root, "d-mix-a");
  if (rank == 0) {
    path_of(p, sizeof p, dir, "step-000006/index.h5");
    unlink(p);
  }
  barrier();
  expect_error(bam_ckpt_latest(dir, got, sizeof got, &found), "has no index.h5", NULL);
  expect_error(bam_ckpt_open(&c, other), "no index.h5", NULL);
  path_of(dir, sizeof dir, root, "nowhere");
  T_OK(bam_ckpt_latest(dir, got, sizeof got, &found));
  T_CHECK(!found, "a checkpoint in a folder that does not exist");
  barrier();
}

/* Export, single-file reading, inspect, and files without offsets (older bam). Rank 0 only:
 * none of this is collective. */
static void test_export(const layout *L, float *buf[3]) {
  if (rank != 0) return;
  char dir[300], file[512], legacy[512];
  path_of(dir, sizeof dir, root, "ckpt");
  path_of(file, sizeof file, root, "export.h5");
  path_of(legacy, sizeof legacy, root, "legacy.h5");
  T_OK(bam_ckpt_export(dir, file, 1));
  bam_ckpt *c = NULL;
  T_OK(bam_ckpt_open(&c, file));
  if (c) {
    T_OK(bam_ckpt_check_layout(c, L->t, L->nt, L->n));
    T_CHECK(bam_ckpt_has_moments(c), "export with moments");
    check_range(c, (bam_range){0, L->n}, 3, L, 40, 1);
    check_range(c, (bam_range){5, L->n / 2 + 3}, 3, L, 40, 1);
    const bam_ckpt_info *in = bam_ckpt_get_info(c);
    T_CHECK(in->world == world && in->step == 40 && in->loader_state[world - 1] == 100 + world - 1 + 40 &&
                in->rng_state[4 * (world - 1) + 3] == UINT64_MAX - (uint64_t)(world - 1),
            "export metadata");
    T_CHECK(!strcmp(in->lineage_text, lineage_text) && !strcmp(in->config_text, config_text), "export texts");
    bam_ckpt_close(&c);
  }
  /* the file is still what bam_ckpt_load and bam_ckpt_read_meta read */
  bam_model *m = NULL;
  T_OK(bam_model_create(&m, &L->shape, 1));
  if (m) {
    T_OK(bam_ckpt_load(file, m, NULL, NULL));
    fill(buf, L, 40, 1);
    T_CHECK(memcmp(m->params_mem, buf[0], L->n * sizeof(float)) == 0, "bam_ckpt_load of an export");
    bam_model_free(&m);
  }
  bam_ckpt_meta meta;
  T_OK(bam_ckpt_read_meta(file, &meta));
  T_CHECK(meta.step == 40 && meta.loader_position == 140 && !strcmp(meta.tokenizer, "tok-0123abcd"), "meta");
  bam_ckpt_meta_free(&meta);

  /* parameters only; then strip the offsets, as written by an older bam */
  T_OK(bam_ckpt_export(dir, legacy, 0));
  hid_t f = H5Fopen(legacy, H5F_ACC_RDWR, H5P_DEFAULT);
  for (int i = 0; i < L->nt; i++) {
    char name[128];
    snprintf(name, sizeof name, "/params/%s", L->t[i].name);
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    H5Adelete(d, "offset");
    H5Adelete(d, "decay");
    H5Dclose(d);
  }
  H5Adelete(f, "n_params");
  H5Fclose(f);
  T_OK(bam_ckpt_open(&c, legacy));
  if (c) {
    T_OK(bam_ckpt_check_layout(c, L->t, L->nt, L->n));
    T_CHECK(!bam_ckpt_has_moments(c), "params-only export has moments");
    check_range(c, (bam_range){0, L->n}, 1, L, 40, 1);
    bam_ckpt_close(&c);
  }

  /* inspect, sharded and single */
  char *text = NULL;
  size_t len = 0;
  FILE *mem = open_memstream(&text, &len);
  T_OK(bam_ckpt_inspect(dir, mem));
  fclose(mem);
  char want[64];
  snprintf(want, sizeof want, "sharded (%d shard", world);
  T_CHECK(text && strstr(text, want) && strstr(text, "(2, 256, 64)") && strstr(text, "w_up") &&
              strstr(text, "d_model = 64") && strstr(text, "seed = 42") && strstr(text, "step        40"),
          "inspect output:\n%s", text ? text : "");
  free(text);
  mem = open_memstream(&text, &len);
  T_OK(bam_ckpt_inspect(file, mem));
  fclose(mem);
  T_CHECK(text && strstr(text, "single file") && strstr(text, "w_head"), "inspect of an export:\n%s", text ? text : "");
  free(text);
  expect_error(bam_ckpt_export(legacy, file, 1), "no AdamW moments", NULL);
}

/* ---- modes for the shell tests ------------------------------------------------------------------ */

static int keep_mode(const char *dir, const layout *L, float *buf[3]) {
  fill(buf, L, 7, 0);
  T_OK(save(dir, 7, 1, 1, L, buf, NULL, 0));
  bam_ckpt *c = NULL;
  T_OK(bam_ckpt_open(&c, dir));
  if (c) check_range(c, (bam_range){0, L->n}, 3, L, 7, 0), bam_ckpt_close(&c);
  return 0;
}

static int kill_mode(const char *dir, const layout *L, float *buf[3]) {
  char p[512], ck[512];
  snprintf(p, sizeof p, "%s/pid-%d", dir, rank);
  FILE *f = fopen(p, "w");
  if (f) fprintf(f, "%d\n", (int)getpid()), fclose(f);
  path_of(ck, sizeof ck, dir, "ckpt");
  fill(buf, L, 1, 0);
  T_OK(save(ck, 1, 2, 1, L, buf, NULL, 0));
  setenv("BAM_CKPT_TEST_PAUSE_S", "120", 1);
  fill(buf, L, 2, 0);
  barrier();
  save(ck, 2, 2, 1, L, buf, NULL, 0); /* killed during the pause */
  T_CHECK(0, "the save of step 2 was not killed");
  return 1;
}

static int check_mode(const char *dir, const layout *L, float *buf[3]) {
  char ck[512], p[512], got[512];
  path_of(ck, sizeof ck, dir, "ckpt");
  path_of(p, sizeof p, ck, ".tmp-step-000002");
  T_CHECK(exists(p), "the killed save left no temporary folder (killed too late?)");
  int found = 0;
  T_OK(bam_ckpt_latest(ck, got, sizeof got, &found));
  T_CHECK(found && strstr(got, "step-000001"), "latest after the kill: '%s'", got);
  bam_ckpt *c = NULL;
  T_OK(bam_ckpt_open(&c, ck));
  if (c) check_range(c, (bam_range){0, L->n}, 3, L, 1, 0), bam_ckpt_close(&c);
  barrier();
  fill(buf, L, 2, 0);
  T_OK(save(ck, 2, 2, 1, L, buf, NULL, 0));
  T_CHECK(!exists(p) && !count_tmp(ck), "the debris of the killed save is still there");
  T_OK(bam_ckpt_open(&c, ck));
  if (c) check_range(c, (bam_range){0, L->n}, 3, L, 2, 0), bam_ckpt_close(&c);
  return 0;
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  bam_log_init(rank, world);
  layout L = make_layout(64, 0);
  float *buf[3];
  for (int b = 0; b < 3; b++) buf[b] = malloc(L.n * sizeof(float));

  const char *keep = getenv("BAM_CKPT_KEEP_DIR"), *kill = getenv("BAM_CKPT_KILL_DIR"),
             *check = getenv("BAM_CKPT_CHECK_DIR");
  int own_root = 0;
  if (keep && *keep) keep_mode(keep, &L, buf);
  else if (kill && *kill) kill_mode(kill, &L, buf);
  else if (check && *check) check_mode(check, &L, buf);
  else {
    if (rank == 0) {
      bam_strlcpy(root, "/tmp/bam-test-shard-XXXXXX", sizeof root);
      if (!mkdtemp(root)) root[0] = 0;
    }
    MPI_Bcast(root, sizeof root, MPI_CHAR, 0, MPI_COMM_WORLD);
    own_root = 1;
    if (!root[0]) {
      fprintf(stderr, "cannot create a temporary folder\n");
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
    double t0 = MPI_Wtime();
    test_crc_and_partition();
    test_roundtrip_and_reshard(&L, buf);
    test_pieces(&L, buf);
    test_keep_replace_stale(&L, buf);
    test_collective_failure(&L, buf);
    test_damage(&L, buf);
    test_large_shards();
    test_export(&L, buf);
    if (rank == 0) printf("%d ranks, %.2f s\n", world, MPI_Wtime() - t0);
  }
  barrier();
  if (own_root && rank == 0) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", root);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", root);
  }
  for (int b = 0; b < 3; b++) free(buf[b]);
  int counts[2] = {bam_t_pass, bam_t_fail}, total[2];
  MPI_Allreduce(counts, total, 2, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Finalize();
  if (rank == 0) printf("%d passed, %d failed\n", total[0], total[1]);
  return total[1] == 0 && total[0] > 0 ? 0 : 1;
}
