#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

bam_status cli_value(cli_args *a, const char **out) {
  const char *opt = a->argv[a->i];
  if (a->i + 1 >= a->argc) BAM_FAIL(BAM_ERR_ARG, "option %s needs a value", opt);
  *out = a->argv[a->i + 1];
  a->i += 2;
  return BAM_OK;
}

bam_status cli_int(cli_args *a, long lo, long hi, int *out) {
  const char *opt = a->argv[a->i], *v = NULL;
  BAM_CHECK(cli_value(a, &v));
  char *end;
  errno = 0;
  long x = strtol(v, &end, 10);
  if (errno || end == v || *end || x < lo || x > hi)
    BAM_FAIL(BAM_ERR_ARG, "option %s: '%s' is not an integer in [%ld, %ld]", opt, v, lo, hi);
  *out = (int)x;
  return BAM_OK;
}

bam_status cli_float(cli_args *a, double lo, double hi, float *out) {
  const char *opt = a->argv[a->i], *v = NULL;
  BAM_CHECK(cli_value(a, &v));
  char *end;
  errno = 0;
  double x = strtod(v, &end);
  if (errno || end == v || *end || !(x >= lo && x <= hi))
    BAM_FAIL(BAM_ERR_ARG, "option %s: '%s' is not a number in [%g, %g]", opt, v, lo, hi);
  *out = (float)x;
  return BAM_OK;
}

int cli_config_option(cli_args *a, bam_config *cfg, int *have_config, bam_status *st) {
  const char *opt = a->argv[a->i], *v = NULL;
  if (strcmp(opt, "--config") && strcmp(opt, "--set")) return 0;
  *st = cli_value(a, &v);
  if (*st != BAM_OK) return 1;
  if (!strcmp(opt, "--config")) {
    *st = bam_config_load(cfg, v);
    *have_config = 1;
  } else {
    *st = bam_config_set(cfg, v);
  }
  return 1;
}
