/* Config parsing: values, --set overrides, and every kind of bad input gives a one-line
 * message naming the file, line and key. */
#include <string.h>
#include <unistd.h>

#include "bam/config.h"
#include "test_util.h"

static char tmpdir[] = "/tmp/bam-test-config-XXXXXX";

static const char *write_file(const char *name, const char *text) {
  static char path[256];
  snprintf(path, sizeof path, "%s/%s", tmpdir, name);
  FILE *f = fopen(path, "w");
  fputs(text, f);
  fclose(f);
  return path;
}

/* Expect failure with a message containing every fragment. */
static void expect_error(bam_status st, bam_status code, const char *a, const char *b) {
  T_CHECK(st == code, "status %s, expected %s", bam_status_str(st), bam_status_str(code));
  const char *msg = bam_error_message();
  T_CHECK(a == NULL || strstr(msg, a), "message '%s' lacks '%s'", msg, a);
  T_CHECK(b == NULL || strstr(msg, b), "message '%s' lacks '%s'", msg, b);
  T_CHECK(strchr(msg, '\n') == NULL, "message is not one line: '%s'", msg);
  bam_error_clear();
}

int main(void) {
  if (!mkdtemp(tmpdir)) return 1;
  bam_config c;

  /* a valid file, with comments, overrides defaults */
  bam_config_defaults(&c);
  const char *good = write_file("good.ini",
                                "; comment\n[model]\nn_layers = 3\nd_model = 96\nn_heads = 6\n"
                                "n_kv_heads = 2\ntie_embeddings = true\n[train]\nlr = 5e-4\n"
                                "seed = 12345678901\n[data]\ntrain_mix = general:0.9,code:0.1\n");
  T_OK(bam_config_load(&c, good));
  T_CHECK(c.model.n_layers == 3 && c.model.d_model == 96 && c.model.n_kv_heads == 2, "model");
  T_CHECK(c.model.tie_embeddings == 1, "bool");
  T_CLOSE(c.lr, 5e-4, 0, 1e-6, "lr");
  T_CHECK(c.seed == 12345678901LL, "64-bit seed %lld", (long long)c.seed);
  T_CHECK(!strcmp(c.train_mix, "general:0.9,code:0.1"), "string %s", c.train_mix);
  T_CHECK(c.model.d_ff == 512 || c.model.d_ff > 0, "untouched key keeps its default");

  /* --set */
  T_OK(bam_config_set(&c, "train.steps=177"));
  T_CHECK(c.steps == 177, "set steps %d", c.steps);
  expect_error(bam_config_set(&c, "train.nope=1"), BAM_ERR_CONFIG, "unknown key 'nope'", "[train]");
  expect_error(bam_config_set(&c, "bogus.steps=1"), BAM_ERR_CONFIG, "unknown section [bogus]", NULL);
  expect_error(bam_config_set(&c, "steps=1"), BAM_ERR_CONFIG, "section.key=value", NULL);
  expect_error(bam_config_set(&c, "train.steps=abc"), BAM_ERR_CONFIG, "train.steps", "integer");
  expect_error(bam_config_set(&c, "train.lr=-1"), BAM_ERR_CONFIG, "train.lr", "out of range");

  /* round trip: the written config reads back to the same values */
  char *text = bam_config_to_string(&c);
  bam_config back;
  bam_config_defaults(&back);
  T_OK(bam_config_load_string(&back, text, "round-trip"));
  T_CHECK(memcmp(&back, &c, sizeof c) == 0, "config round trip differs");
  free(text);

  /* bad files */
  bam_config_defaults(&c);
  expect_error(bam_config_load(&c, "/nonexistent/x.ini"), BAM_ERR_IO, "/nonexistent/x.ini", NULL);
  const char *p = write_file("unknown_key.ini", "[model]\nn_layers = 2\nwidth = 3\n");
  expect_error(bam_config_load(&c, p), BAM_ERR_CONFIG, "unknown_key.ini:3:", "unknown key 'width'");
  p = write_file("unknown_section.ini", "[model]\nn_layers = 2\n\n[optimizer]\nlr = 1\n");
  expect_error(bam_config_load(&c, p), BAM_ERR_CONFIG, "unknown_section.ini:5:", "[optimizer]");
  p = write_file("malformed.ini", "[model]\nn_layers 2\n");
  expect_error(bam_config_load(&c, p), BAM_ERR_CONFIG, "malformed.ini:2:", "malformed");
  p = write_file("range.ini", "[train]\nbeta2 = 1.5\n");
  expect_error(bam_config_load(&c, p), BAM_ERR_CONFIG, "range.ini:2:", "train.beta2");
  p = write_file("notanumber.ini", "[model]\nd_model = 12x\n");
  expect_error(bam_config_load(&c, p), BAM_ERR_CONFIG, "notanumber.ini:2:", "model.d_model");
  p = write_file("heads.ini", "[model]\nd_model = 100\nn_heads = 3\n");
  expect_error(bam_config_load(&c, p), BAM_ERR_CONFIG, "heads.ini", "divisible");
  bam_config_defaults(&c);
  p = write_file("kv.ini", "[model]\nn_heads = 4\nn_kv_heads = 3\n");
  expect_error(bam_config_load(&c, p), BAM_ERR_CONFIG, "kv.ini", "n_kv_heads");
  bam_config_defaults(&c);
  p = write_file("bool.ini", "[model]\ntie_embeddings = maybe\n");
  expect_error(bam_config_load(&c, p), BAM_ERR_CONFIG, "bool.ini:2:", "true or false");

  /* n_kv_heads = 0 resolves to n_heads */
  bam_config_defaults(&c);
  c.model.n_kv_heads = 0;
  T_CHECK(bam_config_shape(&c).n_kv_heads == c.model.n_heads, "kv default");

  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
  if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", tmpdir);
  BAM_TEST_END();
}
