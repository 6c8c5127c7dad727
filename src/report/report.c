/* report: read the run, write every output into a fresh folder beside the report folder, draw
 * the figures there, then put the folder in the report's place. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define MARKER ".bam-report"

/* An existing report folder is replaced only if it is empty or one of ours. */
static bam_status check_out(const char *out) {
  if (!rp_exists(out)) return BAM_OK;
  if (!rp_is_dir(out)) BAM_FAIL(BAM_ERR_IO, "report: %s exists and is not a folder", out);
  char *marker = NULL;
  BAM_CHECK(rp_fmt(&marker, "%s/" MARKER, out));
  const int ours = rp_exists(marker);
  free(marker);
  if (ours) return BAM_OK;
  DIR *d = opendir(out);
  if (!d) BAM_FAIL(BAM_ERR_IO, "report: %s: cannot list: %s", out, strerror(errno));
  int empty = 1;
  for (struct dirent *e; (e = readdir(d));)
    if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) empty = 0;
  closedir(d);
  if (!empty)
    BAM_FAIL(BAM_ERR_IO,
             "report: %s exists, is not empty and was not made by bam report (no " MARKER
             " inside): remove it or choose another --out",
             out);
  return BAM_OK;
}

static bam_status publish(const char *tmp, const char *out) {
  if (!rp_exists(out)) {
    if (rename(tmp, out) != 0) BAM_FAIL(BAM_ERR_IO, "report: cannot rename %s to %s: %s", tmp, out, strerror(errno));
    return BAM_OK;
  }
  if (renameat2(AT_FDCWD, tmp, AT_FDCWD, out, RENAME_EXCHANGE) == 0)
    return rp_remove_tree(tmp); /* tmp now holds the previous report */
  if (errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP)
    BAM_FAIL(BAM_ERR_IO, "report: cannot exchange %s with %s: %s", tmp, out, strerror(errno));
  /* no atomic exchange on this file system: move the old report aside, then the new in */
  char *old = NULL;
  BAM_CHECK(rp_fmt(&old, "%s.old-XXXXXX", out));
  bam_status st = BAM_OK;
  if (!mkdtemp(old) || rmdir(old) != 0) {
    st = bam_error_set(BAM_ERR_IO, __FILE__, __LINE__, "report: cannot make a name beside %s: %s", out,
                       strerror(errno));
  } else if (rename(out, old) != 0) {
    st = bam_error_set(BAM_ERR_IO, __FILE__, __LINE__, "report: cannot move %s aside: %s", out, strerror(errno));
  } else if (rename(tmp, out) != 0) {
    st = bam_error_set(BAM_ERR_IO, __FILE__, __LINE__, "report: cannot rename %s to %s: %s", tmp, out,
                       strerror(errno));
    rename(old, out);
  } else {
    st = rp_remove_tree(old);
  }
  free(old);
  return st;
}

static bam_status write_outputs(const rp_run *run, const char *dir, const char *gnuplot, rp_figure *figs) {
  BAM_CHECK(rp_write_figure_sources(run, dir, figs));
  rp_draw_figures(dir, gnuplot, figs);
  rp_buf csv = {0}, md = {0};
  char *path = NULL;
  bam_status st = BAM_OK;
  BAM_CHECK_GOTO(st, rp_write_results_csv(run, &csv), out);
  BAM_CHECK_GOTO(st, rp_write_markdown(run, figs, &md), out);
  BAM_CHECK_GOTO(st, rp_fmt(&path, "%s/results.csv", dir), out);
  BAM_CHECK_GOTO(st, rp_write_file(path, csv.s, csv.len), out);
  BAM_CHECK_GOTO(st, rp_fmt(&path, "%s/report.md", dir), out);
  BAM_CHECK_GOTO(st, rp_write_file(path, md.s, md.len), out);
  BAM_CHECK_GOTO(st, rp_fmt(&path, "%s/" MARKER, dir), out);
  {
    static const char text[] = "made by bam report: this folder is replaced as a whole when the report is rebuilt\n";
    BAM_CHECK_GOTO(st, rp_write_file(path, text, sizeof text - 1), out);
  }
out:
  rp_buf_free(&csv), rp_buf_free(&md);
  free(path);
  return st;
}

bam_status bam_report_build(const bam_report_opts *o, char **out_path) {
  if (out_path) *out_path = NULL;
  if (!o || !o->run_dir || !*o->run_dir) BAM_FAIL(BAM_ERR_ARG, "report: a run folder is required");
  const char *gnuplot = o->gnuplot && *o->gnuplot ? o->gnuplot : "gnuplot";
  char *out = NULL, *tmp = NULL;
  rp_run run = {0};
  rp_figure figs[RP_N_FIGS] = {
      {.file = "loss-stages.png", .title = "Training and validation loss of every stage"},
      {.file = "loss-mixtures.png", .title = "Training loss of the mixture runs against tokens and FLOPs"},
      {.file = "routing-ffn.png", .title = "FFN expert share per domain and layer"},
      {.file = "routing-att.png", .title = "Soft attention gate per domain and layer"},
  };
  bam_status st = BAM_OK;
  BAM_CHECK_GOTO(st, rp_collect(&run, o->run_dir), done);
  if (o->out_dir && *o->out_dir) BAM_CHECK_GOTO(st, rp_strdup(&out, o->out_dir), done);
  else BAM_CHECK_GOTO(st, rp_fmt(&out, "%s/report", run.run_dir), done);
  for (size_t n = strlen(out); n > 1 && out[n - 1] == '/';) out[--n] = 0;
  BAM_CHECK_GOTO(st, check_out(out), done);
  BAM_CHECK_GOTO(st, rp_fmt(&tmp, "%s.tmp-XXXXXX", out), done);
  if (!mkdtemp(tmp)) {
    st = bam_error_set(BAM_ERR_IO, __FILE__, __LINE__, "report: cannot create a folder beside %s: %s", out,
                       strerror(errno));
    free(tmp);
    tmp = NULL;
    goto done;
  }
  {
    const mode_t um = umask(0);
    umask(um);
    chmod(tmp, 0777 & ~um); /* mkdtemp makes it 0700 */
  }
  st = write_outputs(&run, tmp, gnuplot, figs);
  if (st == BAM_OK) st = publish(tmp, out);
  if (st != BAM_OK) {
    bam_error_trace(__FILE__, __LINE__, "write_outputs / publish");
    rp_remove_tree(tmp);
    goto done;
  }
  if (out_path) {
    *out_path = out;
    out = NULL;
  }
  /* Figures gnuplot could not draw: the report is published, the command still fails. */
  {
    rp_buf names = {0};
    const char *why = NULL;
    for (int i = 0; i < RP_N_FIGS; i++)
      if (figs[i].wanted && !figs[i].drawn) {
        rp_printf(&names, "%s%s", names.len ? ", " : "", figs[i].file);
        if (!why) why = figs[i].problem;
      }
    if (names.len && !names.failed)
      st = bam_error_set(BAM_ERR_IO, __FILE__, __LINE__,
                         "%s; figures not drawn: %s (report.md, results.csv and the figures' .gp and "
                         ".dat files were written to %s)",
                         why ? why : "gnuplot failed", names.s, out_path && *out_path ? *out_path : out);
    rp_buf_free(&names);
  }
done:
  for (int i = 0; i < RP_N_FIGS; i++) free(figs[i].problem);
  rp_run_free(&run);
  free(tmp);
  free(out);
  return st;
}
