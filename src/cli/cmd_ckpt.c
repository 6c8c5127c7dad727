/* bam inspect / bam export: look into and consolidate checkpoints. */
#include <string.h>

#include "bam/shard.h"
#include "cli.h"

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
  return bam_ckpt_inspect(path, stdout);
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
