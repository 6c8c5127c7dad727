/* The bam command line: one file per subcommand, sharing argument helpers. */
#ifndef BAM_CLI_H
#define BAM_CLI_H

#include <mpi.h>

#include "bam/config.h"
#include "bam/core.h"

typedef struct {
  int argc;
  char **argv;
  int i; /* next argument */
} cli_args;

/* The value following argv[i] (option name in argv[i]); fails if missing. */
bam_status cli_value(cli_args *a, const char **out);
bam_status cli_int(cli_args *a, long lo, long hi, int *out);
bam_status cli_float(cli_args *a, double lo, double hi, float *out);
/* Handles --config/--set into cfg; returns 1 if argv[i] was one of them (and consumed). */
int cli_config_option(cli_args *a, bam_config *cfg, int *have_config, bam_status *st);

/* Exit code when a command succeeds (0 unless it says otherwise, e.g. interrupted). */
extern int cli_exit_code;

bam_status cmd_pretrain(cli_args *a, MPI_Comm comm);
bam_status cmd_branch(cli_args *a, MPI_Comm comm);
bam_status cmd_eval(cli_args *a, MPI_Comm comm);
bam_status cmd_generate(cli_args *a, MPI_Comm comm);
bam_status cmd_mix(cli_args *a, MPI_Comm comm);
bam_status cmd_train(cli_args *a, MPI_Comm comm);
bam_status cmd_inspect(cli_args *a, MPI_Comm comm);
bam_status cmd_export(cli_args *a, MPI_Comm comm);
bam_status cmd_report(cli_args *a, MPI_Comm comm);

#endif
