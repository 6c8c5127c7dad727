#include <string.h>

#include "bam/shard.h"
#include "bam/train.h"

bam_status bam_net_load(bam_net *out, bam_config *cfg, char *tokenizer_id, size_t tok_cap,
                        const char *path, int max_batch) {
  memset(out, 0, sizeof *out);
  bam_ckpt *c = NULL;
  BAM_CHECK(bam_ckpt_open(&c, path));
  const bam_ckpt_info *info = bam_ckpt_get_info(c);
  bam_status st = BAM_OK;
  bam_net n = {0};
  char origin[BAM_PATH_MAX + 32];
  snprintf(origin, sizeof origin, "%s (stored config)", bam_ckpt_path(c));
  bam_config_defaults(cfg);
  BAM_CHECK_GOTO(st, bam_config_load_string(cfg, info->config_text ? info->config_text : "", origin), done);
  if (tokenizer_id) bam_strlcpy(tokenizer_id, info->tokenizer, tok_cap);
  BAM_CHECK_GOTO(st, bam_net_create(&n, cfg, max_batch), done);
  if (strcmp(info->kind, n.kind) != 0) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: checkpoint kind '%s' but its config describes a '%s' model",
                       bam_ckpt_path(c), info->kind, n.kind);
    goto done;
  }
  BAM_CHECK_GOTO(st, bam_ckpt_check_layout(c, n.tensors, n.n_tensors, n.n_params), done);
  BAM_CHECK_GOTO(st, bam_ckpt_read(c, "params", (bam_range){0, n.n_params}, n.params), done);
  *out = n;
  n = (bam_net){0};
done:
  bam_net_free(&n);
  bam_ckpt_close(&c);
  return st;
}
