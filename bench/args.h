/* Strict option parsing shared by the bench programs (bam-bench, bam-latency): every option
 * takes one value, integers must parse whole and lie in range, names must be one of a list;
 * anything else is an error naming the option and the value, never a silent default. */
#ifndef BAM_BENCH_ARGS_H
#define BAM_BENCH_ARGS_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The --shape and --kind names both programs take. */
static const char *const BENCH_SHAPES[] = {"quick", "paper-small", "all", NULL};
static const char *const BENCH_KINDS[] = {"dense", "btx", "bam", "bam-shared-kv", "all", NULL};

/* The option argv[*i] and its value, advancing *i to the value. 1 with *opt and *v set;
 * otherwise 0 with *rc the exit code: 0 after printing the usage for --help or -h, 2 after a
 * message for a stray argument (the usage follows) or a missing value. */
static inline int bench_option(const char *prog, int argc, char **argv, int *i,
                               int (*usage)(FILE *), const char **opt, const char **v, int *rc) {
  *opt = argv[*i];
  if (!strcmp(*opt, "--help") || !strcmp(*opt, "-h")) {
    *rc = usage(stdout);
    return 0;
  }
  if (strncmp(*opt, "--", 2)) {
    fprintf(stderr, "%s: unexpected argument '%s'\n", prog, *opt);
    *rc = usage(stderr);
    return 0;
  }
  if (*i + 1 >= argc) {
    fprintf(stderr, "%s: option %s needs a value\n", prog, *opt);
    *rc = 2;
    return 0;
  }
  *i += 1;
  *v = argv[*i];
  return 1;
}

/* 1 and *out set when v is an integer in [lo, hi]; 0 after an error message. */
static inline int bench_int(const char *prog, const char *opt, const char *v, long lo, long hi,
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
static inline int bench_choice(const char *prog, const char *opt, const char *v,
                               const char *const *names) {
  for (int k = 0; names[k]; k++)
    if (!strcmp(v, names[k])) return 1;
  fprintf(stderr, "%s: option %s: '%s' is not one of", prog, opt, v);
  for (int k = 0; names[k]; k++) fprintf(stderr, " %s", names[k]);
  fputc('\n', stderr);
  return 0;
}

#endif
