/* bam report RUN_DIR [--out DIR]: rebuild the study's report (report.md, results.csv, figures)
 * from a jobs/pipeline.sh run folder (docs/report.md). Serial: under mpirun only rank 0 works,
 * the other ranks check the arguments and return. gnuplot draws the figures (BAM_GNUPLOT names
 * another program); without it the report is still written and the command fails naming the
 * figures it could not draw. */
#include <stdlib.h>
#include <string.h>

#include "bam/report.h"
#include "cli.h"

#define REPORT_USAGE "bam report RUN_DIR [--out DIR]"

bam_status cmd_report(cli_args *a, MPI_Comm comm) {
  (void)comm;
  bam_report_opts o = {0};
  while (a->i < a->argc) {
    const char *opt = a->argv[a->i];
    if (!strcmp(opt, "--out")) BAM_CHECK(cli_value(a, &o.out_dir));
    else if (opt[0] != '-' && !o.run_dir) o.run_dir = opt, a->i++;
    else BAM_FAIL(BAM_ERR_ARG, "report: unexpected argument '%s' (usage: " REPORT_USAGE ")", opt);
  }
  if (!o.run_dir) BAM_FAIL(BAM_ERR_ARG, "report: a RUN_DIR is required (usage: " REPORT_USAGE ")");
  if (o.out_dir && !*o.out_dir) BAM_FAIL(BAM_ERR_ARG, "report: --out needs a folder");
  if (bam_log_rank() != 0) return BAM_OK;
  o.gnuplot = getenv("BAM_GNUPLOT");
  char *out = NULL;
  bam_status st = bam_report_build(&o, &out);
  if (out) bam_log("report: wrote %s (report.md, results.csv, figures)\n", out);
  free(out);
  return st;
}
