#include <stdlib.h>
#include <string.h>

#include "bam/train.h"
#include "cli.h"

bam_status cmd_generate(cli_args *a, MPI_Comm comm) {
  (void)comm;
  const char *ckpt = NULL, *prompt = NULL, *data = NULL;
  bam_sample_opts o = {.max_new_tokens = 64, .temperature = 0.8f, .top_k = 40, .seed = 1};
  int seed = 1;
  while (a->i < a->argc) {
    const char *opt = a->argv[a->i];
    if (!strcmp(opt, "--checkpoint")) BAM_CHECK(cli_value(a, &ckpt));
    else if (!strcmp(opt, "--prompt")) BAM_CHECK(cli_value(a, &prompt));
    else if (!strcmp(opt, "--data")) BAM_CHECK(cli_value(a, &data));
    else if (!strcmp(opt, "--tokens")) BAM_CHECK(cli_int(a, 1, 1 << 20, &o.max_new_tokens));
    else if (!strcmp(opt, "--temperature")) BAM_CHECK(cli_float(a, 0, 100, &o.temperature));
    else if (!strcmp(opt, "--top-k")) BAM_CHECK(cli_int(a, 0, 1 << 20, &o.top_k));
    else if (!strcmp(opt, "--seed")) BAM_CHECK(cli_int(a, 0, 1 << 30, &seed));
    else if (!strcmp(opt, "--no-cache")) o.no_cache = 1, a->i++; /* full recompute per token */
    else if (!strcmp(opt, "--timing")) o.timing = 1, a->i++;     /* prefill ms, tokens/s */
    else BAM_FAIL(BAM_ERR_ARG, "generate: unknown option '%s' (see bam help)", opt);
  }
  if (!ckpt) BAM_FAIL(BAM_ERR_ARG, "generate: --checkpoint FILE is required");
  if (!prompt) BAM_FAIL(BAM_ERR_ARG, "generate: --prompt TEXT is required");
  o.seed = (uint64_t)seed;
  if (bam_log_rank() != 0) return BAM_OK; /* sampling is a one-rank job */

  bam_config cfg;
  char tok_id[64];
  bam_net net;
  BAM_CHECK(bam_net_load(&net, &cfg, tok_id, sizeof tok_id, ckpt, 1));
  if (data) bam_strlcpy(cfg.data_dir, data, sizeof cfg.data_dir);
  char vocab_path[BAM_PATH_MAX + 32];
  snprintf(vocab_path, sizeof vocab_path, "%s/tokenizer/spm.vocab", cfg.data_dir);
  bam_tokenizer *tok = NULL;
  int32_t *ids = NULL;
  bam_status st = BAM_OK;
  BAM_CHECK_GOTO(st, bam_tokenizer_load(&tok, vocab_path), done);
  if (strcmp(bam_tokenizer_id(tok), tok_id) != 0) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s is tokenizer '%s' but %s was trained with '%s' (pass --data)",
                       vocab_path, bam_tokenizer_id(tok), ckpt, tok_id);
    goto done;
  }
  size_t len = strlen(prompt), n = 0, cap = 3 * len + 1; /* encode needs at most 3 ids a byte */
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&ids, sizeof(int32_t) * cap, "prompt"), done);
  BAM_CHECK_GOTO(st, bam_tokenizer_encode(tok, prompt, len, ids, cap, &n), done);
  fputs(prompt, stdout);
  st = bam_generate(&net, tok, ids, (int)n, &o, stdout);
done:
  bam_free(ids);
  bam_net_free(&net);
  bam_tokenizer_free(&tok);
  return st;
}
