#include "bam/core.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static int log_rank = 0;
static int log_world = 1;
static char log_prefix[64];
static int log_at_line_start = 1;

void bam_log_init(int rank, int world_size) {
  log_rank = rank;
  log_world = world_size;
}

int bam_log_rank(void) { return log_rank; }

void bam_log_set_prefix(const char *prefix) {
  bam_strlcpy(log_prefix, prefix ? prefix : "", sizeof log_prefix);
}

void bam_log(const char *fmt, ...) {
  if (log_rank != 0) return;
  char stack[1024], *buf = stack;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(stack, sizeof stack, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n >= sizeof stack && (buf = malloc((size_t)n + 1))) {
    va_start(ap, fmt);
    vsnprintf(buf, (size_t)n + 1, fmt, ap);
    va_end(ap);
  }
  if (!buf) buf = stack;
  /* the prefix (e.g. "[code] " in concurrent branch groups) starts every line */
  for (const char *p = buf; *p;) {
    if (log_at_line_start && log_prefix[0]) fputs(log_prefix, stdout);
    const char *nl = strchr(p, '\n');
    size_t len = nl ? (size_t)(nl - p) + 1 : strlen(p);
    fwrite(p, 1, len, stdout);
    log_at_line_start = nl != NULL;
    p += len;
  }
  if (buf != stack) free(buf);
  fflush(stdout);
}

void bam_warn(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  if (log_world > 1) fprintf(stderr, "[rank %d] ", log_rank);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fflush(stderr);
}

double bam_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

double bam_median(double *v, int n) {
  if (n <= 0) return 0;
  qsort(v, (size_t)n, sizeof *v, cmp_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double bam_peak_rss_mib(void) {
  FILE *f = fopen("/proc/self/status", "r");
  if (!f) return 0;
  char line[256];
  double kb = 0;
  while (fgets(line, sizeof line, f))
    if (strncmp(line, "VmHWM:", 6) == 0) {
      kb = strtod(line + 6, NULL);
      break;
    }
  fclose(f);
  return kb / 1024.0;
}

/* Buffers of at least BAM_HUGE_MIN bytes (parameters, gradients, optimizer moments, saved
 * activations) start on a 2 MiB boundary and their whole 2 MiB pieces are offered to
 * transparent huge pages before the first touch: a TLB entry then covers 512 times the
 * memory the GEMMs' packing, the AdamW sweep and the gradient norm read across, and the first
 * touch costs one page fault per 2 MiB instead of 512 (a paper-small BAM state: 960k faults
 * and ~10 s of kernel time at start-up before, 5k after). The tail past the last whole piece
 * stays on 4 KiB pages, so no buffer holds more resident memory than it asks for. Where THP
 * is off ("never") the advice is ignored. */
#define BAM_HUGE_PAGE ((size_t)2 << 20)
#define BAM_HUGE_MIN ((size_t)8 << 20)

void *bam_alloc(size_t bytes) {
  if (bytes == 0) bytes = 64;
  const size_t rounded = (bytes + 63) & ~(size_t)63;
  const int huge = rounded >= BAM_HUGE_MIN;
  void *p = NULL;
  if (posix_memalign(&p, huge ? BAM_HUGE_PAGE : 64, rounded) != 0) return NULL;
  if (huge) (void)madvise(p, rounded & ~(BAM_HUGE_PAGE - 1), MADV_HUGEPAGE);
  memset(p, 0, rounded);
  return p;
}

void bam_free(void *p) { free(p); }

bam_status bam_alloc_checked(void **out, size_t bytes, const char *what) {
  *out = bam_alloc(bytes);
  if (!*out) {
    char b[32];
    bam_format_bytes(b, sizeof b, (double)bytes);
    BAM_FAIL(BAM_ERR_NOMEM, "cannot allocate %s for %s", b, what);
  }
  return BAM_OK;
}

void bam_format_bytes(char *buf, size_t n, double bytes) {
  const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 4) {
    bytes /= 1024.0;
    u++;
  }
  snprintf(buf, n, u == 0 ? "%.0f %s" : "%.1f %s", bytes, units[u]);
}

/* ---- RNG ---- */
uint64_t bam_hash64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

void bam_rng_seed(bam_rng *r, uint64_t seed, uint64_t stream) {
  uint64_t x = bam_hash64(seed) ^ bam_hash64(stream + 0x632be59bd9b4e019ULL);
  for (int i = 0; i < 4; i++) {
    x += 0x9e3779b97f4a7c15ULL;
    r->s[i] = bam_hash64(x);
  }
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t bam_rng_u64(bam_rng *r) {
  uint64_t *s = r->s;
  uint64_t result = rotl(s[1] * 5, 7) * 9;
  uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return result;
}

double bam_rng_uniform(bam_rng *r) { return (double)(bam_rng_u64(r) >> 11) * 0x1.0p-53; }

uint64_t bam_rng_below(bam_rng *r, uint64_t n) {
  if (n <= 1) return 0;
  uint64_t limit = UINT64_MAX - UINT64_MAX % n;
  uint64_t x;
  do x = bam_rng_u64(r);
  while (x >= limit);
  return x % n;
}

float bam_rng_normal(bam_rng *r) {
  double u1 = bam_rng_uniform(r), u2 = bam_rng_uniform(r);
  if (u1 < 1e-300) u1 = 1e-300;
  return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
}

int bam_str_ends_with(const char *s, const char *suffix) {
  size_t a = strlen(s), b = strlen(suffix);
  return a >= b && strcmp(s + a - b, suffix) == 0;
}

size_t bam_strlcpy(char *dst, const char *src, size_t n) {
  size_t len = strlen(src);
  if (n) {
    size_t c = len < n - 1 ? len : n - 1;
    memcpy(dst, src, c);
    dst[c] = 0;
  }
  return len;
}
