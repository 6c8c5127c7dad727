/* Branch: domain experts trained side by side from one seed (method.md section 1, step 2). */
#include <stdlib.h>
#include <string.h>

#include "bam/train.h"
#include "bam/upcycle.h"

bam_status bam_branch(const bam_config *cfg, const bam_branch_opts *o, MPI_Comm comm,
                      int *interrupted) {
  int rank, world;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &world);
  *interrupted = 0;
  bam_mix domains;
  BAM_CHECK(bam_mix_parse(&domains, o->domains));
  const int n = domains.n;
  if (o->general_share < 0 || o->general_share >= 1)
    BAM_FAIL(BAM_ERR_ARG, "branch: the general share %g must be in [0, 1)", o->general_share);
  if (!(o->lr_scale > 0)) BAM_FAIL(BAM_ERR_ARG, "branch: the learning-rate scale must be positive");
  for (int i = 0; i < n; i++)
    if (!strcmp(domains.name[i], "general"))
      BAM_FAIL(BAM_ERR_ARG, "branch: 'general' is the seed's domain, not an expert domain");
  /* One group per expert when there are enough ranks (an equal number each); otherwise every
   * rank is its own group and trains its experts one after another. */
  int n_groups = world >= n ? n : world;
  if (world >= n && world % n)
    BAM_FAIL(BAM_ERR_ARG, "branch: %d ranks cannot be split evenly into %d expert groups "
             "(use a multiple of %d ranks, or fewer ranks than experts)", world, n, n);
  const int group_size = world / n_groups, group = rank / group_size;

  char seed_id[64];
  BAM_CHECK(bam_ckpt_params_id(o->seed_path, seed_id, sizeof seed_id));
  MPI_Comm gcomm;
  if (MPI_Comm_split(comm, group, rank, &gcomm) != MPI_SUCCESS)
    BAM_FAIL(BAM_ERR_MPI, "branch: MPI_Comm_split into %d groups failed", n_groups);
  int grank;
  MPI_Comm_rank(gcomm, &grank);
  bam_log("branch: %d expert%s from %s (%s) on %d group%s of %d rank%s\n", n, n > 1 ? "s" : "",
          o->seed_path, seed_id, n_groups, n_groups > 1 ? "s" : "", group_size,
          group_size > 1 ? "s" : "");
  bam_status st = BAM_OK;
  bam_log_init(grank, group_size);
  for (int e = group; e < n && st == BAM_OK && !*interrupted; e += n_groups) {
    const char *d = domains.name[e];
    bam_config c = *cfg;
    if (o->general_share > 0)
      snprintf(c.train_mix, sizeof c.train_mix, "%s:%g,general:%g", d, 1 - o->general_share,
               o->general_share);
    else
      snprintf(c.train_mix, sizeof c.train_mix, "%s", d);
    c.lr = (float)(cfg->lr * o->lr_scale);
    c.seed = cfg->seed + 1000 * (e + 1); /* each expert reads its data in its own order */
    int len = snprintf(c.out_dir, sizeof c.out_dir, "%s/%s", cfg->out_dir, d);
    if (len >= (int)sizeof c.out_dir) {
      st = bam_error_set(BAM_ERR_ARG, __FILE__, __LINE__, "branch: output path too long for %s", d);
      break;
    }
    char lineage[1024];
    snprintf(lineage, sizeof lineage,
             "kind = expert\ndomain = %s\nseed_id = %s\nseed_path = %s\ngeneral_share = %g\n"
             "lr_scale = %g\n", d, seed_id, o->seed_path, o->general_share, o->lr_scale);
    char prefix[BAM_NAME_MAX + 4];
    snprintf(prefix, sizeof prefix, "[%s] ", d);
    bam_log_set_prefix(prefix);
    bam_log("expert %d/%d: %s, mix %s, peak lr %g, ranks %d-%d\n", e + 1, n, d, c.train_mix,
            (double)c.lr, group * group_size, (group + 1) * group_size - 1);
    bam_train_opts t = {.resume = o->resume, .init_from = o->seed_path, .lineage = lineage,
                        .eval_at_start = 1};
    st = bam_pretrain(&c, &t, gcomm, interrupted);
  }
  bam_log_set_prefix(NULL);
  bam_log_init(rank, world);
  MPI_Comm_free(&gcomm);
  return st;
}
