/* bam train: train a mixture (BTX, BAM, BAM shared-KV) built by bam mix. Data parallel over
 * the ranks; with mixture.ep > 1 the experts' compute is divided inside groups of ep ranks
 * (expert parallelism, parameters still replicated: docs/design-expert-parallel.md). */
#include <string.h>

#include "bam/shard.h"
#include "bam/train.h"
#include "cli.h"

bam_status cmd_train(cli_args *a, MPI_Comm comm) {
  const char *mixture = NULL, *config_file = NULL, *out = NULL;
  for (int j = a->i; j < a->argc - 1; j++) {
    if (!strcmp(a->argv[j], "--mixture")) mixture = a->argv[j + 1];
    if (!strcmp(a->argv[j], "--config")) config_file = a->argv[j + 1];
  }
  if (!mixture) BAM_FAIL(BAM_ERR_ARG, "train: --mixture CKPT (made by bam mix) is required");
  /* Settings: --config FILE, else the mixture's stored config; --set overrides either. */
  bam_config cfg;
  bam_config_defaults(&cfg);
  if (config_file) {
    BAM_CHECK(bam_config_load(&cfg, config_file));
  } else {
    bam_ckpt *c = NULL;
    BAM_CHECK(bam_ckpt_open(&c, mixture));
    char origin[BAM_PATH_MAX + 32];
    snprintf(origin, sizeof origin, "%s (stored config)", bam_ckpt_path(c));
    const char *text = bam_ckpt_get_info(c)->config_text;
    bam_status st = bam_config_load_string(&cfg, text ? text : "", origin);
    bam_ckpt_close(&c);
    BAM_CHECK(st);
    /* the mixture's own folder holds its step-0 checkpoint: train next to it */
    size_t len = strlen(cfg.out_dir);
    if (len + 7 >= sizeof cfg.out_dir) BAM_FAIL(BAM_ERR_ARG, "train: run.out_dir is too long");
    memcpy(cfg.out_dir + len, "/train", 7);
  }
  bam_train_opts opts = {.init_from = mixture, .eval_at_start = 1};
  while (a->i < a->argc) {
    const char *opt = a->argv[a->i];
    if (!strcmp(opt, "--mixture") || !strcmp(opt, "--config")) a->i += 2;
    else if (!strcmp(opt, "--out")) BAM_CHECK(cli_value(a, &out));
    else if (!strcmp(opt, "--stop-after")) BAM_CHECK(cli_int(a, 1, 1 << 30, &opts.stop_after));
    else if (!strcmp(opt, "--resume")) {
      opts.resume = 1;
      a->i++;
      if (a->i < a->argc && strncmp(a->argv[a->i], "--", 2) != 0) opts.resume_path = a->argv[a->i++];
    } else if (!strcmp(opt, "--set")) {
      const char *v;
      BAM_CHECK(cli_value(a, &v));
      BAM_CHECK(bam_config_set(&cfg, v));
    } else BAM_FAIL(BAM_ERR_ARG, "train: unknown option '%s' (see bam help)", opt);
  }
  if (out) bam_strlcpy(cfg.out_dir, out, sizeof cfg.out_dir);
  if (!cfg.method[0])
    BAM_FAIL(BAM_ERR_CONFIG, "train: %s has no [mixture] method: train dense models with bam pretrain",
             config_file ? config_file : mixture);
  BAM_CHECK(bam_config_validate(&cfg, "train"));
  bam_log("# resolved config\n");
  if (bam_log_rank() == 0) bam_config_write(&cfg, stdout);
  bam_log("\n");
  int interrupted = 0;
  BAM_CHECK(bam_pretrain(&cfg, &opts, comm, &interrupted));
  if (interrupted) cli_exit_code = 143;
  return BAM_OK;
}
