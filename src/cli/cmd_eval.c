#include <string.h>

#include "bam/train.h"
#include "cli.h"

bam_status cmd_eval(cli_args *a, MPI_Comm comm) {
  const char *ckpt = NULL, *domains = NULL, *data = NULL, *routing = NULL;
  int max_tokens = -1;
  while (a->i < a->argc) {
    const char *opt = a->argv[a->i];
    if (!strcmp(opt, "--checkpoint")) BAM_CHECK(cli_value(a, &ckpt));
    else if (!strcmp(opt, "--domains")) BAM_CHECK(cli_value(a, &domains));
    else if (!strcmp(opt, "--data")) BAM_CHECK(cli_value(a, &data));
    else if (!strcmp(opt, "--routing")) BAM_CHECK(cli_value(a, &routing));
    else if (!strcmp(opt, "--max-tokens")) BAM_CHECK(cli_int(a, 0, 1 << 30, &max_tokens));
    else BAM_FAIL(BAM_ERR_ARG, "eval: unknown option '%s' (see bam help)", opt);
  }
  if (!ckpt) BAM_FAIL(BAM_ERR_ARG, "eval: --checkpoint FILE is required");
  bam_config cfg;
  char tok_id[64];
  bam_net net;
  BAM_CHECK(bam_net_load(&net, &cfg, tok_id, sizeof tok_id, ckpt, 8));
  if (data) bam_strlcpy(cfg.data_dir, data, sizeof cfg.data_dir);
  if (!domains) domains = cfg.eval_domains;
  if (max_tokens < 0) max_tokens = cfg.eval_max_tokens;
  bam_eval_result r[BAM_MAX_DOMAINS];
  int n = 0;
  if (max_tokens) bam_log("evaluating %s on %s (at most %d tokens per domain)\n", ckpt, domains, max_tokens);
  else bam_log("evaluating %s on %s (whole validation splits)\n", ckpt, domains);
  bam_status st = bam_evaluate(&net, &cfg, domains, max_tokens, net.max_batch, 1, tok_id, r, &n, comm);
  if (st == BAM_OK && bam_log_rank() == 0) {
    bam_eval_print(r, n, stdout);
    bam_eval_print_routing(r, n, stdout);
    if (routing) {
      FILE *f = fopen(routing, "w");
      if (!f) st = bam_error_set(BAM_ERR_IO, __FILE__, __LINE__, "%s: cannot write", routing);
      else {
        bam_eval_write_routing_csv(r, n, f);
        if (fclose(f) != 0) st = bam_error_set(BAM_ERR_IO, __FILE__, __LINE__, "%s: write failed", routing);
      }
    }
  }
  if (st == BAM_OK) bam_eval_results_free(r, n);
  bam_net_free(&net);
  return st;
}
