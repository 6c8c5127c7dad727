#include <string.h>

#include "bam/shard.h"
#include "bam/train.h"

bam_status bam_model_load(bam_model **out, bam_config *cfg, char *tokenizer_id, size_t tok_cap,
                          const char *path, int max_batch) {
  *out = NULL;
  bam_ckpt *c = NULL;
  BAM_CHECK(bam_ckpt_open(&c, path));
  const bam_ckpt_info *info = bam_ckpt_get_info(c);
  bam_status st = BAM_OK;
  bam_model *m = NULL;
  char origin[BAM_PATH_MAX + 32];
  snprintf(origin, sizeof origin, "%s (stored config)", bam_ckpt_path(c));
  bam_config_defaults(cfg);
  BAM_CHECK_GOTO(st, bam_config_load_string(cfg, info->config_text ? info->config_text : "", origin), done);
  if (tokenizer_id) bam_strlcpy(tokenizer_id, info->tokenizer, tok_cap);
  bam_model_shape shape = bam_config_shape(cfg);
  BAM_CHECK_GOTO(st, bam_model_create(&m, &shape, max_batch), done);
  BAM_CHECK_GOTO(st, bam_ckpt_check_layout(c, m->tensors, m->n_tensors, m->n_params), done);
  BAM_CHECK_GOTO(st, bam_ckpt_read(c, "params", (bam_range){0, m->n_params}, m->params_mem), done);
  *out = m;
  m = NULL;
done:
  bam_model_free(&m);
  bam_ckpt_close(&c);
  return st;
}
