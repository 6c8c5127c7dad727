#include <string.h>

#include "bam/train.h"
#include "cli.h"

bam_status cmd_pretrain(cli_args *a, MPI_Comm comm) {
  bam_config cfg;
  bam_config_defaults(&cfg);
  bam_train_opts opts = {0};
  int have_config = 0;
  /* --config must come before --set so overrides win: apply in command-line order, but
   * read the file first if it appears later. */
  for (int j = a->i; j < a->argc - 1; j++)
    if (!strcmp(a->argv[j], "--config")) {
      BAM_CHECK(bam_config_load(&cfg, a->argv[j + 1]));
      have_config = 1;
    }
  while (a->i < a->argc) {
    const char *opt = a->argv[a->i];
    if (!strcmp(opt, "--config")) {
      a->i += 2; /* already read */
      continue;
    }
    if (!strcmp(opt, "--resume")) {
      opts.resume = 1;
      a->i++;
      if (a->i < a->argc && strncmp(a->argv[a->i], "--", 2) != 0) opts.resume_path = a->argv[a->i++];
      continue;
    }
    if (!strcmp(opt, "--stop-after")) {
      BAM_CHECK(cli_int(a, 1, 1 << 30, &opts.stop_after));
      continue;
    }
    bam_status st;
    if (cli_config_option(a, &cfg, &have_config, &st)) {
      BAM_CHECK(st);
      continue;
    }
    BAM_FAIL(BAM_ERR_ARG, "pretrain: unknown option '%s' (see bam help)", opt);
  }
  if (!have_config) BAM_FAIL(BAM_ERR_ARG, "pretrain: --config FILE is required");
  BAM_CHECK(bam_config_validate(&cfg, "--set"));
  bam_log("# resolved config\n");
  if (bam_log_rank() == 0) bam_config_write(&cfg, stdout);
  bam_log("\n");
  int interrupted = 0;
  BAM_CHECK(bam_pretrain(&cfg, &opts, comm, &interrupted));
  if (interrupted) cli_exit_code = 143; /* 128 + SIGTERM: stopped, checkpointed, resumable */
  return BAM_OK;
}
