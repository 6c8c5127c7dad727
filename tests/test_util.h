/* Minimal test helpers: every check prints what failed and where; main returns the verdict
 * through BAM_TEST_END, which prints "N passed, M failed". */
#ifndef BAM_TEST_UTIL_H
#define BAM_TEST_UTIL_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "bam/core.h"

static int bam_t_pass = 0, bam_t_fail = 0;

#define T_CHECK(cond, ...)                                                 \
  do {                                                                     \
    if (cond) {                                                            \
      bam_t_pass++;                                                        \
    } else {                                                               \
      bam_t_fail++;                                                        \
      fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);      \
      fprintf(stderr, __VA_ARGS__);                                        \
      fprintf(stderr, "\n");                                               \
    }                                                                      \
  } while (0)

/* |a-b| <= atol + rtol*|b| */
#define T_CLOSE(a, b, atol, rtol, what)                                            \
  T_CHECK(fabs((double)(a) - (double)(b)) <= (atol) + (rtol) * fabs((double)(b)), \
          "%s: got %.9g expected %.9g", (what), (double)(a), (double)(b))

#define T_OK(expr)                                                                      \
  do {                                                                                  \
    bam_status t_s_ = (expr);                                                           \
    T_CHECK(t_s_ == BAM_OK, "%s returned %s: %s", #expr, bam_status_str(t_s_),         \
            bam_error_message());                                                       \
    if (t_s_ != BAM_OK) bam_error_clear();                                              \
  } while (0)

/* max |a - b| over max |b|: the largest difference relative to b's scale (n floats). */
static inline double t_max_rel(const float *a, const float *b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    if (fabs((double)a[i] - b[i]) > num) num = fabs((double)a[i] - b[i]);
    if (fabs((double)b[i]) > den) den = fabs((double)b[i]);
  }
  return den > 0 ? num / den : num;
}

#define BAM_TEST_END()                                                     \
  do {                                                                     \
    printf("%d passed, %d failed\n", bam_t_pass, bam_t_fail);              \
    return bam_t_fail == 0 && bam_t_pass > 0 ? 0 : 1;                       \
  } while (0)

#endif
