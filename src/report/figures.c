/* report: the figures. Each one is a gnuplot script (<name>.gp) over data files (.dat) that
 * are written into the report folder, so `gnuplot <name>.gp` there redraws <name>.png:
 *   loss-stages    training loss (metrics.csv) against the stage's tokens, one panel per model,
 *                  with the validation losses of eval.csv as points, one colour per domain
 *   loss-mixtures  every mixture run's training loss against tokens and against training FLOPs
 *   routing-ffn    share of each domain's FFN assignments per expert and layer (heat maps,
 *                  one panel per mixture run)
 *   routing-att    mean soft attention gate per domain, layer and expert (BAM runs), coloured
 *                  around the uniform 1/Ea */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "internal.h"

extern char **environ;

/* A gnuplot single-quoted string (no escapes inside; a quote is doubled). */
static void gp_str(rp_buf *b, const char *s) {
  rp_puts(b, "'");
  for (; *s; s++) {
    if (*s == '\'') rp_puts(b, "''");
    else if (*s == '\n' || *s == '\r') rp_puts(b, " ");
    else rp_printf(b, "%c", *s);
  }
  rp_puts(b, "'");
}

static void gp_header(rp_buf *b, const char *name, const char *what, int w, int h) {
  rp_printf(b, "# %s\n# Data: the .dat files beside this script. Redraw: gnuplot %s.gp\n", what, name);
  rp_printf(b,
            "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) {\n"
            "  set terminal pngcairo noenhanced size %d,%d font 'sans,9'\n"
            "} else {\n"
            "  set terminal png noenhanced size %d,%d\n"
            "}\n"
            "set output '%s.png'\n",
            w, h, w, h, name);
}

static bam_status write_text(const char *dir, const char *file, rp_buf *b) {
  BAM_CHECK(rp_buf_status(b, file));
  char *path = NULL;
  BAM_CHECK(rp_fmt(&path, "%s/%s", dir, file));
  bam_status st = rp_write_file(path, b->s ? b->s : "", b->len);
  free(path);
  return st;
}

static double tokens_per_step(const rp_model *m) {
  return m->steps > 0 ? (double)m->tokens / (double)m->steps : 0.0;
}

/* loss-train.dat and loss-valid.dat: one block (index) per present model, table order. */
static bam_status loss_data(const rp_run *run, const char *dir) {
  rp_buf tr = {0}, va = {0};
  rp_puts(&tr, "# training loss per logged step (metrics.csv), one block per model (gnuplot index)\n"
               "# columns: tokens of the stage, loss (nats/token), training FLOPs so far (3 x forward FLOPs/token x tokens)\n");
  rp_puts(&va, "# validation loss during each stage (eval.csv), one block per model (gnuplot index)\n"
               "# columns: tokens of the stage (step x tokens per step), domain, loss (nats/token)\n");
  int block = 0;
  for (int i = 0; i < run->n_models; i++) {
    const rp_model *m = &run->m[i];
    if (!m->present) continue;
    if (block) rp_puts(&tr, "\n\n"), rp_puts(&va, "\n\n");
    rp_printf(&tr, "# index %d: %s\n", block, m->name);
    rp_printf(&va, "# index %d: %s\n", block, m->name);
    for (int k = 0; k < m->n_train; k++)
      rp_printf(&tr, "%.0f %.9g %.6e\n", m->train[k].tokens, m->train[k].loss,
                3.0 * m->fpt * m->train[k].tokens);
    const double tps = tokens_per_step(m);
    for (int k = 0; k < m->n_valid; k++)
      rp_printf(&va, "%.0f %s %.6f\n", (double)m->valid[k].step * tps, run->vdom[m->valid[k].domain],
                m->valid[k].loss);
    block++;
  }
  bam_status st = write_text(dir, "loss-train.dat", &tr);
  if (st == BAM_OK) st = write_text(dir, "loss-valid.dat", &va);
  rp_buf_free(&tr), rp_buf_free(&va);
  return st;
}

static bam_status loss_stages_script(const rp_run *run, const char *dir, rp_figure *fig) {
  int n = 0;
  for (int i = 0; i < run->n_models; i++) n += run->m[i].present;
  fig->wanted = n > 0;
  const int cols = n < 3 ? n : 3, rows = (n + cols - 1) / (cols ? cols : 1);
  rp_buf b = {0};
  gp_header(&b, "loss-stages",
            "Training loss (line, metrics.csv) and validation loss (points, eval.csv) against the "
            "tokens of each stage, one panel per model",
            420 * (cols ? cols : 1), 330 * (rows ? rows : 1));
  rp_printf(&b, "set multiplot layout %d,%d\n", rows ? rows : 1, cols ? cols : 1);
  rp_puts(&b, "set grid\nset key below font ',8'\nset xlabel 'tokens of the stage'\n"
              "set ylabel 'loss (nats/token)'\nset format x '%.1s%c'\n"
              "set offsets graph 0.03, graph 0.03, graph 0.05, graph 0.05\n");
  int block = 0;
  for (int i = 0; i < run->n_models; i++) {
    const rp_model *m = &run->m[i];
    if (!m->present) continue;
    rp_puts(&b, "set title ");
    gp_str(&b, m->name);
    rp_printf(&b, "\nplot 'loss-train.dat' index %d using 1:2 with lines lw 2 lc rgb '#333333' title 'training'",
              block);
    for (int d = 0; d < run->n_vdom; d++) {
      int has = 0;
      for (int k = 0; k < m->n_valid && !has; k++) has = m->valid[k].domain == d;
      if (!has) continue;
      rp_printf(&b, ", \\\n     'loss-valid.dat' index %d using 1:(strcol(2) eq ", block);
      gp_str(&b, run->vdom[d]);
      rp_printf(&b, " ? $3 : NaN) with points pt 7 ps 1.1 lc %d title ", d + 1);
      rp_buf t = {0};
      rp_printf(&t, "validation %s", run->vdom[d]);
      if (!rp_buf_status(&t, "a title")) gp_str(&b, t.s);
      else rp_puts(&b, "'validation'");
      rp_buf_free(&t);
    }
    rp_puts(&b, "\n");
    block++;
  }
  rp_puts(&b, "unset multiplot\n");
  bam_status st = write_text(dir, "loss-stages.gp", &b);
  rp_buf_free(&b);
  return st;
}

static bam_status loss_mixtures_script(const rp_run *run, const char *dir, rp_figure *fig) {
  rp_buf b = {0};
  gp_header(&b, "loss-mixtures",
            "Training loss of every mixture run against tokens (left) and training FLOPs (right)",
            1100, 460);
  rp_puts(&b, "set multiplot layout 1,2\nset grid\nset key below font ',8'\nset format x '%.1s%c'\n"
              "set ylabel 'training loss (nats/token)'\n"
              "set offsets graph 0.03, graph 0.03, graph 0.05, graph 0.05\n");
  for (int panel = 0; panel < 2; panel++) {
    rp_printf(&b, "set title '%s'\nset xlabel '%s'\nplot ",
              panel ? "against training FLOPs (3 x forward)" : "against tokens",
              panel ? "training FLOPs" : "tokens of the stage");
    int block = 0, first = 1;
    for (int i = 0; i < run->n_models; i++) {
      const rp_model *m = &run->m[i];
      if (!m->present) continue;
      if (m->kind == RP_MIXTURE) {
        /* colour per method, dashed when compute-matched */
        const char *colour = !strcmp(m->method, "btx") ? "#444444"
                             : !strcmp(m->method, "bam") ? "#1f77b4" : "#d62728";
        rp_printf(&b, "%s'loss-train.dat' index %d using %d:2 with linespoints lw 2 dt %d pt %d lc rgb '%s' title ",
                  first ? "" : ", \\\n     ", block, panel ? 3 : 1, strcmp(m->matching, "cm") ? 1 : 2,
                  strcmp(m->matching, "cm") ? 7 : 6, colour);
        gp_str(&b, m->name);
        first = 0;
      }
      block++;
    }
    fig->wanted = !first;
    rp_puts(&b, first ? "NaN notitle\n" : "\n");
  }
  rp_puts(&b, "unset multiplot\n");
  bam_status st = write_text(dir, "loss-mixtures.gp", &b);
  rp_buf_free(&b);
  return st;
}

/* routing-<which>.dat: one block per mixture run that has such a router; rows of the heat map
 * are (domain, layer), columns the experts. */
static bam_status routing_figure(const rp_run *run, const char *dir, rp_figure *fig, int att) {
  const char *name = att ? "routing-att" : "routing-ffn";
  rp_buf d = {0}, b = {0};
  rp_printf(&d, "# %s per domain, layer and expert (eval/<model>.routing.csv), one block per mixture run\n"
                "# columns: expert, row (= domain index x layers + layer), value\n",
            att ? "mean soft attention gate" : "share of the FFN assignments");
  int n = 0, maxE = 1, maxR = 1;
  for (int i = 0; i < run->n_models; i++) {
    const rp_model *m = &run->m[i];
    const int E = att ? m->Ea : m->Ef;
    if (!m->present || m->kind != RP_MIXTURE || E == 0) continue;
    if (E > maxE) maxE = E;
    if (run->n_dom * m->L > maxR) maxR = run->n_dom * m->L;
    n++;
  }
  fig->wanted = n > 0;
  const int panel_w = 90 * maxE + 190;
  gp_header(&b, name,
            att ? "Mean soft attention gate per domain and layer (rows) and attention expert (columns), "
                  "one panel per BAM run; white = uniform 1/Ea"
                : "Share of each domain's FFN assignments per layer (rows) and FFN expert (columns), one "
                  "panel per mixture run",
            panel_w * (n < 3 ? (n ? n : 1) : 3), (26 * maxR + 200) * ((n + 2) / 3 ? (n + 2) / 3 : 1));
  rp_printf(&b, "set multiplot layout %d,%d\nunset key\nset xtics rotate by -30 left\n",
            (n + 2) / 3 ? (n + 2) / 3 : 1, n < 3 ? (n ? n : 1) : 3);
  if (!att) rp_puts(&b, "set palette defined (0 '#ffffff', 1 '#08519c')\nset cbrange [0:1]\n");
  else rp_puts(&b, "set palette defined (0 '#b2182b', 0.5 '#ffffff', 1 '#2166ac')\n");
  int block = 0;
  for (int i = 0; i < run->n_models; i++) {
    const rp_model *m = &run->m[i];
    const int E = att ? m->Ea : m->Ef, L = m->L;
    if (!m->present || m->kind != RP_MIXTURE || E == 0) continue;
    const double *v = att ? m->att : m->ffn;
    if (block) rp_puts(&d, "\n\n");
    rp_printf(&d, "# index %d: %s\n", block, m->name);
    for (int dm = 0; dm < run->n_dom; dm++)
      for (int l = 0; l < L; l++) {
        for (int e = 0; e < E; e++)
          rp_printf(&d, "%d %d %.6f\n", e, dm * L + l, v[((size_t)dm * L + l) * E + e]);
        rp_puts(&d, "\n");
      }
    const int R = run->n_dom * L;
    rp_printf(&b, "set xrange [-0.5:%d.5]\nset yrange [%d.5:-0.5]\n", E - 1, R - 1);
    rp_puts(&b, "set ytics (");
    for (int dm = 0; dm < run->n_dom; dm++)
      for (int l = 0; l < L; l++) {
        rp_buf t = {0};
        rp_printf(&t, "%s L%d", run->dom[dm], l);
        if (!t.failed) gp_str(&b, t.s);
        rp_buf_free(&t);
        rp_printf(&b, " %d%s", dm * L + l, dm * L + l < R - 1 ? ", " : ")\n");
      }
    rp_puts(&b, "set xtics (");
    for (int e = 0; e < E; e++) {
      rp_buf t = {0};
      rp_printf(&t, "%d %s", e, m->expert_label[e]);
      if (!t.failed) gp_str(&b, t.s);
      rp_buf_free(&t);
      rp_printf(&b, " %d%s", e, e < E - 1 ? ", " : ")\n");
    }
    rp_buf t = {0}, dark = {0}, light = {0};
    if (att) {
      const double u = 1.0 / E;
      rp_printf(&b, "set cbrange [0:%.6f]\n", 2 * u);
      rp_printf(&t, "%s (uniform 1/%d = %.3f)", m->name, E, u);
      /* white labels on the scale's dark ends (more than 0.7/Ea from uniform) */
      rp_printf(&light, "abs($3 - %.6f) < %.6f", u, 0.7 * u);
      rp_printf(&dark, "abs($3 - %.6f) >= %.6f", u, 0.7 * u);
    } else {
      rp_printf(&t, "%s", m->name);
      rp_puts(&light, "$3 <= 0.6");
      rp_puts(&dark, "$3 > 0.6");
    }
    rp_puts(&b, "set title ");
    if (!t.failed) gp_str(&b, t.s);
    rp_printf(&b,
              "\nplot '%s.dat' index %d using 1:2:3 with image, \\\n"
              "     '' index %d using 1:2:(%s ? sprintf('%%.2f', $3) : '') with labels tc rgb 'black' font ',8', \\\n"
              "     '' index %d using 1:2:(%s ? sprintf('%%.2f', $3) : '') with labels tc rgb 'white' font ',8'\n",
              name, block, block, light.failed ? "1" : light.s, block, dark.failed ? "0" : dark.s);
    rp_buf_free(&t), rp_buf_free(&dark), rp_buf_free(&light);
    block++;
  }
  if (!n) rp_puts(&b, "plot NaN notitle\n");
  rp_puts(&b, "unset multiplot\n");
  char file[64];
  snprintf(file, sizeof file, "%s.dat", name);
  bam_status st = write_text(dir, file, &d);
  snprintf(file, sizeof file, "%s.gp", name);
  if (st == BAM_OK) st = write_text(dir, file, &b);
  rp_buf_free(&d), rp_buf_free(&b);
  return st;
}

bam_status rp_write_figure_sources(const rp_run *run, const char *dir, rp_figure *figs) {
  BAM_CHECK(loss_data(run, dir));
  BAM_CHECK(loss_stages_script(run, dir, &figs[RP_FIG_LOSS]));
  BAM_CHECK(loss_mixtures_script(run, dir, &figs[RP_FIG_LOSS_MIX]));
  BAM_CHECK(routing_figure(run, dir, &figs[RP_FIG_FFN], 0));
  BAM_CHECK(routing_figure(run, dir, &figs[RP_FIG_ATT], 1));
  return BAM_OK;
}

/* ---- running gnuplot ---- */
static int png_ok(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return 0;
  unsigned char magic[8];
  size_t n = fread(magic, 1, 8, f);
  fseek(f, 0, SEEK_END);
  long size = ftell(f);
  fclose(f);
  return n == 8 && !memcmp(magic, "\x89PNG\r\n\x1a\n", 8) && size > 256;
}

static void set_problem(rp_figure *fig, const char *fmt, const char *a, const char *b) {
  if (rp_fmt(&fig->problem, fmt, a, b) != BAM_OK) bam_error_clear();
}

/* Runs `gnuplot NAME.gp` in dir (stdin /dev/null, stdout and stderr to a log read back on
 * failure). */
static void draw_one(const char *dir, const char *gnuplot, rp_figure *fig) {
  char base[64];
  bam_strlcpy(base, fig->file, sizeof base);
  char *dot = strrchr(base, '.');
  if (dot) *dot = 0;
  char *script = NULL, *log = NULL, *png = NULL, *text = NULL;
  if (rp_fmt(&script, "%s.gp", base) != BAM_OK || rp_fmt(&log, "%s/.%s.gnuplot-log", dir, base) != BAM_OK ||
      rp_fmt(&png, "%s/%s", dir, fig->file) != BAM_OK) {
    bam_error_clear();
    set_problem(fig, "out of memory%s%s", "", "");
    goto out;
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  posix_spawn_file_actions_addchdir_np(&fa, dir);
  char *argv[] = {(char *)gnuplot, script, NULL};
  pid_t pid;
  int rc = posix_spawnp(&pid, gnuplot, &fa, NULL, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) {
    if (rc == ENOENT)
      set_problem(fig, "gnuplot ('%s') was not found (it is looked up in PATH; Debian: apt-get install gnuplot-nox)%s",
                  gnuplot, "");
    else
      set_problem(fig, "gnuplot ('%s') could not be started: %s", gnuplot, strerror(rc));
    goto out;
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 127) {
    set_problem(fig, "gnuplot ('%s') was not found (it is looked up in PATH; Debian: apt-get install gnuplot-nox)%s", gnuplot, "");
  } else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    char first[512] = "";
    if (rp_read_file(log, &text, NULL) == BAM_OK) {
      /* the last non-empty line of gnuplot's output names the error */
      char *line, *save = NULL;
      for (line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
        if (line[strspn(line, " \t^")]) bam_strlcpy(first, line + strspn(line, " \t"), sizeof first);
    } else {
      bam_error_clear();
    }
    char why[600];
    if (WIFEXITED(status)) snprintf(why, sizeof why, "exit status %d", WEXITSTATUS(status));
    else snprintf(why, sizeof why, "killed by signal %d", WTERMSIG(status));
    if (first[0]) {
      size_t n = strlen(why);
      snprintf(why + n, sizeof why - n, ": %s", first);
    }
    set_problem(fig, "gnuplot %s failed (%s)", script, why);
  } else if (!png_ok(png)) {
    set_problem(fig, "gnuplot %s ran but %s is not a valid PNG", script, fig->file);
  } else {
    fig->drawn = 1;
  }
out:
  if (log) remove(log);
  if (!fig->drawn && png) remove(png);
  free(script), free(log), free(png), free(text);
}

void rp_draw_figures(const char *dir, const char *gnuplot, rp_figure *figs) {
  for (int i = 0; i < RP_N_FIGS; i++) {
    if (!figs[i].wanted) continue;
    draw_one(dir, gnuplot, &figs[i]);
  }
}
