/* Strict option parsing shared by the bench programs (bam-bench, bam-latency): every option
 * takes one value, integers must parse whole and lie in range, names must be one of a list;
 * anything else is an error naming the option and the value, never a silent default. */
#ifndef BAM_BENCH_ARGS_H
#define BAM_BENCH_ARGS_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The value of option argv[*i] (advancing *i past it), or NULL after an error message. */
static const char *bench_value(const char *prog, int argc, char **argv, int *i) {
  if (*i + 1 >= argc) {
    fprintf(stderr, "%s: option %s needs a value\n", prog, argv[*i]);
    return NULL;
  }
  *i += 1;
  return argv[*i];
}

/* 1 and *out set when v is an integer in [lo, hi]; 0 after an error message. */
static int bench_int(const char *prog, const char *opt, const char *v, long lo, long hi,
                     int *out) {
  char *end;
  errno = 0;
  const long x = strtol(v, &end, 10);
  if (errno || end == v || *end || x < lo || x > hi) {
    fprintf(stderr, "%s: option %s: '%s' is not an integer in [%ld, %ld]\n", prog, opt, v, lo, hi);
    return 0;
  }
  *out = (int)x;
  return 1;
}

/* 1 when v is one of the NULL-terminated names; 0 after an error message listing them. */
static int bench_choice(const char *prog, const char *opt, const char *v,
                        const char *const *names) {
  for (int k = 0; names[k]; k++)
    if (!strcmp(v, names[k])) return 1;
  fprintf(stderr, "%s: option %s: '%s' is not one of", prog, opt, v);
  for (int k = 0; names[k]; k++) fprintf(stderr, " %s", names[k]);
  fputc('\n', stderr);
  return 0;
}

#endif
