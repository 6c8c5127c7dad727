#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bam/ckpt.h"
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

bam_status cli_config_from_checkpoint(const char *path, bam_config *cfg, char *tokenizer_id,
                                      size_t tok_cap) {
  bam_ckpt_meta meta;
  BAM_CHECK(bam_ckpt_read_meta(path, &meta));
  bam_config_defaults(cfg);
  char origin[BAM_PATH_MAX + 32];
  snprintf(origin, sizeof origin, "%s (stored config)", path);
  bam_status st = bam_config_load_string(cfg, meta.config_text, origin);
  if (tokenizer_id) bam_strlcpy(tokenizer_id, meta.tokenizer, tok_cap);
  bam_ckpt_meta_free(&meta);
  return st;
}
