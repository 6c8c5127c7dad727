/* bam inspect / bam export: look into and consolidate checkpoints. */
#include <string.h>

#include "bam/mixture.h"
#include "bam/model.h"
#include "bam/shard.h"
#include "bam/upcycle.h"
#include "cli.h"

/* "flops_per_token_forward = N": forward FLOPs per token of the model the stored config
 * describes (dense or mixture, the paper's formulas at context seq_len; training = 3 x this),
 * for scripts (jobs/pipeline.sh sets the compute-matched step counts from it). */
static bam_status print_flops(const char *path, FILE *out) {
  bam_ckpt *c = NULL;
  BAM_CHECK(bam_ckpt_open(&c, path));
  char origin[BAM_PATH_MAX + 32];
  snprintf(origin, sizeof origin, "%s (stored config)", bam_ckpt_path(c));
  const char *text = bam_ckpt_get_info(c)->config_text;
  bam_config cfg;
  bam_config_defaults(&cfg);
  bam_status st = bam_config_load_string(&cfg, text ? text : "", origin);
  bam_ckpt_close(&c);
  BAM_CHECK(st);
  double f;
  if (!cfg.method[0]) {
    bam_model_shape s = bam_config_shape(&cfg);
    f = bam_model_flops_per_token(&s, s.seq_len);
  } else {
    bam_mixture_shape s;
    BAM_CHECK(bam_mixture_shape_from_config(&cfg, &s));
    f = bam_mixture_flops_per_token(&s, s.base.seq_len);
  }
  fprintf(out, "flops_per_token_forward = %.0f\n", f);
  return BAM_OK;
}

bam_status cmd_inspect(cli_args *a, MPI_Comm comm) {
  (void)comm;
  const char *path = NULL;
  while (a->i < a->argc) {
    const char *opt = a->argv[a->i];
    if (opt[0] != '-' && !path) {
      path = opt;
      a->i++;
    } else {
      BAM_FAIL(BAM_ERR_ARG, "inspect: unexpected argument '%s' (usage: bam inspect PATH)", opt);
    }
  }
  if (!path) BAM_FAIL(BAM_ERR_ARG, "inspect: a checkpoint PATH is required");
  if (bam_log_rank() != 0) return BAM_OK;
  BAM_CHECK(bam_ckpt_inspect(path, stdout));
  return print_flops(path, stdout);
}

bam_status cmd_export(cli_args *a, MPI_Comm comm) {
  (void)comm;
  const char *path = NULL, *out = NULL;
  int with_moments = 0;
  while (a->i < a->argc) {
    const char *opt = a->argv[a->i];
    if (!strcmp(opt, "--out")) BAM_CHECK(cli_value(a, &out));
    else if (!strcmp(opt, "--with-moments")) with_moments = 1, a->i++;
    else if (opt[0] != '-' && !path) path = opt, a->i++;
    else BAM_FAIL(BAM_ERR_ARG, "export: unexpected argument '%s' (usage: bam export PATH --out FILE)", opt);
  }
  if (!path) BAM_FAIL(BAM_ERR_ARG, "export: a checkpoint PATH is required");
  if (!out) BAM_FAIL(BAM_ERR_ARG, "export: --out FILE is required");
  if (bam_log_rank() != 0) return BAM_OK;
  BAM_CHECK(bam_ckpt_export(path, out, with_moments));
  bam_log("wrote %s\n", out);
  return BAM_OK;
}
