#include <stdlib.h>
#include <string.h>

#include "bam/train.h"
#include "cli.h"

bam_status cmd_branch(cli_args *a, MPI_Comm comm) {
  bam_branch_opts o = {.general_share = 0.1, .lr_scale = 0.5};
  bam_config cfg;
  const char *config_file = NULL, *out = NULL;
  float share = 0.1f, scale = 0.5f;
  /* Settings come from --config, else the seed's stored config; --set overrides either. */
  for (int j = a->i; j < a->argc - 1; j++) {
    if (!strcmp(a->argv[j], "--config")) config_file = a->argv[j + 1];
    if (!strcmp(a->argv[j], "--seed")) o.seed_path = a->argv[j + 1];
  }
  if (!o.seed_path) BAM_FAIL(BAM_ERR_ARG, "branch: --seed PATH (the seed checkpoint) is required");
  if (config_file) {
    bam_config_defaults(&cfg);
    BAM_CHECK(bam_config_load(&cfg, config_file));
  } else {
    char tok[64];
    bam_net net;
    BAM_CHECK(bam_net_load(&net, &cfg, tok, sizeof tok, o.seed_path, 1));
    bam_net_free(&net);
  }
  while (a->i < a->argc) {
    const char *opt = a->argv[a->i];
    if (!strcmp(opt, "--config") || !strcmp(opt, "--seed")) a->i += 2;
    else if (!strcmp(opt, "--domains")) BAM_CHECK(cli_value(a, &o.domains));
    else if (!strcmp(opt, "--out")) BAM_CHECK(cli_value(a, &out));
    else if (!strcmp(opt, "--general-share")) BAM_CHECK(cli_float(a, 0, 0.99, &share));
    else if (!strcmp(opt, "--lr-scale")) BAM_CHECK(cli_float(a, 1e-6, 100, &scale));
    else if (!strcmp(opt, "--resume")) o.resume = 1, a->i++;
    else if (!strcmp(opt, "--set")) {
      const char *v;
      BAM_CHECK(cli_value(a, &v));
      BAM_CHECK(bam_config_set(&cfg, v));
    } else BAM_FAIL(BAM_ERR_ARG, "branch: unknown option '%s' (see bam help)", opt);
  }
  if (!o.domains) BAM_FAIL(BAM_ERR_ARG, "branch: --domains a,b,... is required");
  if (out) bam_strlcpy(cfg.out_dir, out, sizeof cfg.out_dir);
  o.general_share = share;
  o.lr_scale = scale;
  BAM_CHECK(bam_config_validate(&cfg, "branch"));
  int interrupted = 0;
  BAM_CHECK(bam_branch(&cfg, &o, comm, &interrupted));
  if (interrupted) cli_exit_code = 143;
  return BAM_OK;
}
