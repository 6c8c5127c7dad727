/* bam mix: build a BTX or BAM mixture checkpoint from a seed and its domain experts
 * (method.md section 4). Reading and writing checkpoints is serial work: under mpirun only
 * rank 0 mixes, the other ranks check the arguments and return. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bam/upcycle.h"
#include "cli.h"

#define MIX_MAX_EXPERTS 255 /* the seed plus these make at most 256 FFN experts */
#define MIX_USAGE                                                                              \
  "bam mix --method btx|bam|bam-shared-kv --seed PATH --experts P1,P2,... --out DIR "         \
  "[--ffn-top-k K] [--renormalize] [--att-top-k K] [--extra-ffn-experts N] [--freeze-experts] " \
  "[--router-seed N]"

/* Split "a,b,c" into at most `cap` non-empty paths pointing into `buf` (a writable copy). */
static bam_status split_experts(char *buf, const char **out, int cap, int *n) {
  *n = 0;
  for (char *p = buf;;) {
    char *comma = strchr(p, ',');
    if (comma) *comma = 0;
    if (!*p)
      BAM_FAIL(BAM_ERR_ARG, "mix: --experts has an empty entry (expected P1,P2,...)");
    if (*n == cap) BAM_FAIL(BAM_ERR_ARG, "mix: --experts lists more than %d checkpoints", cap);
    out[(*n)++] = p;
    if (!comma) break;
    p = comma + 1;
  }
  return BAM_OK;
}

static bam_status parse_u64(cli_args *a, uint64_t *out) {
  const char *opt = a->argv[a->i], *v = NULL;
  BAM_CHECK(cli_value(a, &v));
  char *end;
  errno = 0;
  unsigned long long x = strtoull(v, &end, 10);
  if (errno || end == v || *end || v[0] == '-')
    BAM_FAIL(BAM_ERR_ARG, "mix: option %s: '%s' is not a non-negative integer", opt, v);
  *out = (uint64_t)x;
  return BAM_OK;
}

bam_status cmd_mix(cli_args *a, MPI_Comm comm) {
  (void)comm;
  const char *method = NULL, *seed = NULL, *experts = NULL, *out = NULL;
  bam_mix_opts o = {.ffn_top_k = 1, .router_seed = 1};
  while (a->i < a->argc) {
    const char *opt = a->argv[a->i];
    if (!strcmp(opt, "--method")) BAM_CHECK(cli_value(a, &method));
    else if (!strcmp(opt, "--seed")) BAM_CHECK(cli_value(a, &seed));
    else if (!strcmp(opt, "--experts")) BAM_CHECK(cli_value(a, &experts));
    else if (!strcmp(opt, "--out")) BAM_CHECK(cli_value(a, &out));
    else if (!strcmp(opt, "--ffn-top-k")) BAM_CHECK(cli_int(a, 1, 256, &o.ffn_top_k));
    else if (!strcmp(opt, "--att-top-k")) BAM_CHECK(cli_int(a, 0, 256, &o.att_top_k));
    else if (!strcmp(opt, "--extra-ffn-experts")) BAM_CHECK(cli_int(a, 0, 255, &o.extra_ffn_experts));
    else if (!strcmp(opt, "--router-seed")) BAM_CHECK(parse_u64(a, &o.router_seed));
    else if (!strcmp(opt, "--renormalize")) o.ffn_renormalize = 1, a->i++;
    else if (!strcmp(opt, "--freeze-experts")) o.freeze_experts = 1, a->i++;
    else BAM_FAIL(BAM_ERR_ARG, "mix: unknown option '%s' (usage: " MIX_USAGE ")", opt);
  }
  if (!method) BAM_FAIL(BAM_ERR_ARG, "mix: --method btx|bam|bam-shared-kv is required");
  if (bam_method_parse(method, &o.method) != BAM_OK) {
    bam_error_clear(); /* this message names the option's values */
    BAM_FAIL(BAM_ERR_ARG, "mix: unknown method '%s' (btx, bam, bam-shared-kv)", method);
  }
  if (!seed) BAM_FAIL(BAM_ERR_ARG, "mix: --seed PATH is required (the dense seed checkpoint)");
  if (!experts) BAM_FAIL(BAM_ERR_ARG, "mix: --experts P1,P2,... is required (the domain experts)");
  if (!out) BAM_FAIL(BAM_ERR_ARG, "mix: --out DIR is required (the mixture goes to DIR/ckpt)");
  char *list = strdup(experts);
  if (!list) BAM_FAIL(BAM_ERR_NOMEM, "mix: out of memory");
  const char *paths[MIX_MAX_EXPERTS];
  int n = 0;
  bam_status st = split_experts(list, paths, MIX_MAX_EXPERTS, &n);
  if (st == BAM_OK && bam_log_rank() == 0) st = bam_upcycle_mix(seed, paths, n, &o, out, MPI_COMM_SELF);
  free(list);
  return st;
}
