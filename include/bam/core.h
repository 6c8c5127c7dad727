/* core: error codes and propagation, rank-aware logging, RNG, timers, aligned allocation.
 *
 * Every fallible function returns a bam_status. The first failure records a one-line message
 * (naming the file, field or tensor at fault) with BAM_FAIL; callers propagate it with
 * BAM_CHECK, which appends "at file:line" frames to a trace printed when BAM_TRACE=1. Library
 * code never exits: the command line turns a failure into MPI_Abort so no rank is left
 * waiting in a collective. */
#ifndef BAM_CORE_H
#define BAM_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef enum {
  BAM_OK = 0,
  BAM_ERR_ARG = 1,      /* bad command-line argument or API misuse */
  BAM_ERR_CONFIG = 2,   /* bad config file, key or value */
  BAM_ERR_IO = 3,       /* a file could not be opened, read or written */
  BAM_ERR_DATA = 4,     /* data present but wrong: format, vocabulary, shape, checksum */
  BAM_ERR_NOMEM = 5,    /* allocation failed */
  BAM_ERR_HDF5 = 6,     /* the HDF5 library reported an error */
  BAM_ERR_MPI = 7,      /* the MPI library reported an error */
  BAM_ERR_NUMERIC = 8,  /* NaN or Inf where a finite number is needed */
  BAM_ERR_INTERNAL = 9  /* a broken invariant: a bug */
} bam_status;

const char *bam_status_str(bam_status s);

/* Record a failure (the first one wins until bam_error_clear) and return its code. */
bam_status bam_error_set(bam_status code, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void bam_error_trace(const char *file, int line, const char *expr);
const char *bam_error_message(void); /* one line, no trailing newline; "" when none */
const char *bam_error_backtrace(void);
void bam_error_clear(void);

#define BAM_FAIL(code, ...) return bam_error_set((code), __FILE__, __LINE__, __VA_ARGS__)
#define BAM_CHECK(expr)                                  \
  do {                                                   \
    bam_status bam_s_ = (expr);                          \
    if (bam_s_ != BAM_OK) {                              \
      bam_error_trace(__FILE__, __LINE__, #expr);        \
      return bam_s_;                                     \
    }                                                    \
  } while (0)
/* For cleanup paths: record the status in `st` and jump to `label`. */
#define BAM_CHECK_GOTO(st, expr, label)                  \
  do {                                                   \
    (st) = (expr);                                       \
    if ((st) != BAM_OK) {                                \
      bam_error_trace(__FILE__, __LINE__, #expr);        \
      goto label;                                        \
    }                                                    \
  } while (0)

/* ---- logging: only the rank given to bam_log_init prints through bam_log (rank 0) ---- */
void bam_log_init(int rank, int world_size);
int bam_log_rank(void);
void bam_log_set_prefix(const char *prefix); /* written at the start of every bam_log line */
void bam_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));     /* rank 0, stdout */
void bam_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));    /* any rank, stderr */

/* ---- time ---- */
double bam_now(void); /* monotonic seconds */
/* Median of v[0..n) (0 when n <= 0); sorts v in place, ascending. */
double bam_median(double *v, int n);
/* Peak resident memory of this process in MiB (VmHWM of /proc/self/status; 0 if unknown). */
double bam_peak_rss_mib(void);

/* ---- memory: 64-byte aligned, zeroed; bam_free(NULL) is fine ---- */
void *bam_alloc(size_t bytes);
void bam_free(void *p);
bam_status bam_alloc_checked(void **out, size_t bytes, const char *what);
void bam_format_bytes(char *buf, size_t n, double bytes); /* "12.3 MiB" */

/* ---- RNG: splitmix64 seeding + xoshiro256**; reproducible on every platform ---- */
typedef struct {
  uint64_t s[4];
} bam_rng;
void bam_rng_seed(bam_rng *r, uint64_t seed, uint64_t stream);
uint64_t bam_rng_u64(bam_rng *r);
double bam_rng_uniform(bam_rng *r);          /* [0, 1) */
uint64_t bam_rng_below(bam_rng *r, uint64_t n); /* [0, n), unbiased */
float bam_rng_normal(bam_rng *r);            /* standard normal (Box-Muller, exact pairs) */
uint64_t bam_hash64(uint64_t x);             /* splitmix64 finaliser */

/* ---- small string helpers ---- */
int bam_str_ends_with(const char *s, const char *suffix);
size_t bam_strlcpy(char *dst, const char *src, size_t n);

#endif
