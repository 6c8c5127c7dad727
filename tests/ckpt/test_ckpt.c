/* Checkpoint files: exact round trip of parameters, moments and metadata; every kind of
 * damage is refused with a message naming the file and the tensor, never read as zeros. */
#include <string.h>
#include <unistd.h>

#include "bam/ckpt.h"
#include "test_util.h"

static char dir[] = "/tmp/bam-test-ckpt-XXXXXX";

static bam_model_shape tiny(int d) {
  return (bam_model_shape){.n_layers = 2, .d_model = d, .n_heads = 4, .n_kv_heads = 2, .d_ff = 48,
                           .vocab_size = 50, .seq_len = 8, .rope_base = 10000, .norm_eps = 1e-5f};
}

static long read_all(const char *path, unsigned char **buf) {
  FILE *f = fopen(path, "rb");
  if (!f) return -1;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  *buf = malloc((size_t)n);
  if (fread(*buf, 1, (size_t)n, f) != (size_t)n) n = -1;
  fclose(f);
  return n;
}

static void write_all(const char *path, const unsigned char *buf, long n) {
  FILE *f = fopen(path, "wb");
  fwrite(buf, 1, (size_t)n, f);
  fclose(f);
}

static void expect_error(bam_status st, const char *a, const char *b) {
  T_CHECK(st != BAM_OK, "damage was not detected");
  const char *msg = bam_error_message();
  T_CHECK(a == NULL || strstr(msg, a), "message '%s' lacks '%s'", msg, a);
  T_CHECK(b == NULL || strstr(msg, b), "message '%s' lacks '%s'", msg, b);
  bam_error_clear();
}

int main(void) {
  if (!mkdtemp(dir)) return 1;
  char path[256], bad[256];
  snprintf(path, sizeof path, "%s/model.h5", dir);
  snprintf(bad, sizeof bad, "%s/bad.h5", dir);

  bam_model_shape s = tiny(32);
  bam_model *a = NULL, *b = NULL;
  T_OK(bam_model_create(&a, &s, 1));
  T_OK(bam_model_create(&b, &s, 1));
  bam_model_init(a, 42, 0.02f);
  /* a recognisable byte pattern inside wte, to find and damage it in the file */
  const float marker[4] = {1234.5f, -2345.25f, 3456.125f, -4567.0625f};
  memcpy(a->params.wte, marker, sizeof marker);
  float *m1 = calloc(a->n_params, 4), *v1 = calloc(a->n_params, 4);
  float *m2 = calloc(a->n_params, 4), *v2 = calloc(a->n_params, 4);
  for (size_t i = 0; i < a->n_params; i++) m1[i] = (float)i * 1e-3f, v1[i] = (float)i * 1e-6f;

  bam_ckpt_meta meta = {.step = 17, .tokens_seen = 123456789012LL, .loader_position = 34,
                        .config_text = "[train]\nsteps = 17\n"};
  bam_strlcpy(meta.tokenizer, "0123456789abcdef", sizeof meta.tokenizer);
  T_OK(bam_ckpt_save(path, a, m1, v1, &meta));
  char tmp[300];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  T_CHECK(access(tmp, F_OK) != 0, "temporary file left behind");

  /* exact round trip */
  T_OK(bam_ckpt_load(path, b, m2, v2));
  T_CHECK(memcmp(a->params_mem, b->params_mem, a->n_params * 4) == 0, "params differ");
  T_CHECK(memcmp(m1, m2, a->n_params * 4) == 0 && memcmp(v1, v2, a->n_params * 4) == 0,
          "moments differ");
  bam_ckpt_meta back;
  T_OK(bam_ckpt_read_meta(path, &back));
  T_CHECK(back.step == 17 && back.tokens_seen == 123456789012LL && back.loader_position == 34,
          "meta numbers");
  T_CHECK(!strcmp(back.tokenizer, meta.tokenizer), "tokenizer '%s'", back.tokenizer);
  T_CHECK(back.config_text && !strcmp(back.config_text, meta.config_text), "config text");
  bam_ckpt_meta_free(&back);

  /* a missing file */
  char missing[300];
  snprintf(missing, sizeof missing, "%s/none.h5", dir);
  expect_error(bam_ckpt_load(missing, b, NULL, NULL), "none.h5", "no such checkpoint");

  /* a flipped byte inside a tensor: the Fletcher32 checksum refuses it */
  unsigned char *buf = NULL;
  long n = read_all(path, &buf);
  long at = -1;
  for (long i = 0; i + 16 <= n; i++)
    if (!memcmp(buf + i, marker, sizeof marker)) at = i;
  T_CHECK(at >= 0, "marker not found in the file");
  if (at >= 0) {
    buf[at + 5] ^= 0x40;
    write_all(bad, buf, n);
    buf[at + 5] ^= 0x40;
    expect_error(bam_ckpt_load(bad, b, NULL, NULL), "bad.h5", "/params/wte");
  }
  /* a truncated file */
  write_all(bad, buf, n / 2);
  expect_error(bam_ckpt_load(bad, b, NULL, NULL), "bad.h5", NULL);
  /* not a checkpoint at all */
  write_all(bad, (const unsigned char *)"hello", 5);
  expect_error(bam_ckpt_load(bad, b, NULL, NULL), "bad.h5", "not an HDF5 file");
  free(buf);

  /* a checkpoint of another shape: names the tensor and the dimension */
  bam_model_shape s2 = tiny(48);
  bam_model *c = NULL;
  T_OK(bam_model_create(&c, &s2, 1));
  expect_error(bam_ckpt_load(path, c, NULL, NULL), "model.h5", "/params/wte");
  bam_model_free(&c);

  /* a model with a tensor the file lacks (tied -> untied head) */
  bam_model_shape tied = s;
  tied.tie_embeddings = 1;
  bam_model *t = NULL;
  T_OK(bam_model_create(&t, &tied, 1));
  bam_ckpt_meta tm = meta;
  snprintf(bad, sizeof bad, "%s/tied.h5", dir);
  T_OK(bam_ckpt_save(bad, t, NULL, NULL, &tm));
  expect_error(bam_ckpt_load(bad, b, NULL, NULL), "tied.h5", "w_head is missing");
  bam_model_free(&t);

  /* saving over an existing checkpoint replaces it atomically */
  a->params.ln_f[0] = 7.0f;
  T_OK(bam_ckpt_save(path, a, NULL, NULL, &meta));
  T_OK(bam_ckpt_load(path, b, NULL, NULL));
  T_CHECK(b->params.ln_f[0] == 7.0f, "overwritten checkpoint not updated");

  bam_model_free(&a);
  bam_model_free(&b);
  free(m1), free(v1), free(m2), free(v2);
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
  if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", dir);
  BAM_TEST_END();
}
