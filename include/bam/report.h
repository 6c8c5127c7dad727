/* report: the study's report rebuilt from the artifacts of a jobs/pipeline.sh run folder
 * (docs/report.md describes every table, column and figure).
 *
 * Reads, and never writes, the run folder:
 *   seed/, experts/<domain>/, mix-<method>/, train-<method>-<dm|cm>/   stage folders (DONE,
 *       metrics.csv, eval.csv, summary.json, ckpt/); the checkpoints give steps, tokens and
 *       the config from which the forward FLOPs per token follow (training FLOPs = 3 x that
 *       x tokens)
 *   eval/<model>.txt, eval/<model>.routing.csv   the final evaluation of every model
 * and writes into the report folder: report.md, results.csv, the figures (PNG, drawn by
 * gnuplot) with their data files (.dat) and scripts (.gp).
 *
 * The seed, the branch stage (experts/DONE names the domains) and the eval stage are required;
 * each mixture training run (train-btx-dm, train-bam-dm, train-bam-cm, train-bam-shared-kv-dm,
 * train-bam-shared-kv-cm, and train-btx-cm if present) is optional and shown as absent when its
 * folder does not exist. A stage folder that exists must be complete (DONE, metrics.csv,
 * eval.csv, a checkpoint); errors name the folder or file (file:line for malformed lines).
 *
 * Everything is written into a fresh folder <out>.tmp-XXXXXX beside the report folder, which
 * then takes the place of <out> (atomically exchanged where the file system allows it), so a
 * failed or killed report never leaves a half-written one. An existing <out> is replaced only
 * if it is empty or was made by this function (it holds the marker file .bam-report). */
#ifndef BAM_REPORT_H
#define BAM_REPORT_H

#include "bam/core.h"

typedef struct {
  const char *run_dir;
  const char *out_dir; /* NULL: <run_dir>/report */
  const char *gnuplot; /* the gnuplot program (looked up in PATH); NULL: "gnuplot" */
} bam_report_opts;

/* Build and publish the report (serial; call it on one rank). If gnuplot is missing or fails,
 * the report (Markdown, CSV, data files and scripts) is still published, without the figures
 * that could not be drawn, and the function returns BAM_ERR_IO with a message naming them.
 * *out_path (if non-NULL) gets a malloc'd copy of the published folder's path. */
bam_status bam_report_build(const bam_report_opts *opts, char **out_path);

#endif
