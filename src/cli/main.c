/* bam: one program, one subcommand per pipeline step. Every rank runs main; a failure on any
 * rank prints its one-line message and aborts the whole MPI job, so no rank is left waiting
 * in a collective. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "bam/kernels.h"
#include "cli.h"

#define BAM_VERSION "0.1.0"

static const char *USAGE =
    "usage: bam <command> [options]\n"
    "\n"
    "commands:\n"
    "  pretrain  --config FILE [--set section.key=value ...] [--resume [CKPT]] [--stop-after N]\n"
    "            train the dense seed model (data parallel over the MPI ranks)\n"
    "  branch    --seed CKPT --domains a,b,... [--out DIR] [--config FILE] [--set ...]\n"
    "            [--general-share 0.1] [--lr-scale 0.5] [--resume]\n"
    "            train one domain expert per domain from the seed, side by side\n"
    "  eval      --checkpoint PATH [--domains a,b] [--max-tokens N] [--data DIR] [--routing CSV]\n"
    "            per-domain loss, perplexity and bits per byte (with a unigram baseline);\n"
    "            for mixtures also the routing per domain and layer\n"
    "  generate  --checkpoint PATH --prompt TEXT [--tokens N] [--temperature T] [--top-k K]\n"
    "            [--seed S] [--data DIR] [--no-cache] [--timing]   sample a continuation\n"
    "            (KV cache; --no-cache recomputes the context per token)\n"
    "  mix       --method btx|bam|bam-shared-kv --seed PATH --experts P1,P2,... --out DIR\n"
    "            [--ffn-top-k K] [--renormalize] [--att-top-k K] [--extra-ffn-experts N]\n"
    "            [--freeze-experts] [--router-seed N]   build a mixture from the seed and\n"
    "            the domain experts branched from it (writes DIR/ckpt)\n"
    "  train     --mixture CKPT [--config FILE] [--set ...] [--out DIR] [--resume] [--stop-after N]\n"
    "            train a mixture made by mix (data parallel over the MPI ranks)\n"
    "  inspect   PATH   print a checkpoint's tensors, shapes, step and config\n"
    "  export    PATH --out FILE [--with-moments]   write one consolidated checkpoint file\n"
    "  report    RUN_DIR [--out DIR]   the study's report (tables, figures) from a pipeline run\n"
    "  version   print the version, the OpenBLAS kernels (and where they came from) and the\n"
    "            OpenMP threads per rank\n"
    "\n"
    "A checkpoint PATH is a step folder, a run's ckpt/ folder (its latest step), or an export.\n"
    "\n"
    "Run under MPI with: mpirun -np P bam <command> ...  (threads per rank: OMP_NUM_THREADS)\n"
    "Set BAM_TRACE=1 to print the call trace of an error.\n";

int cli_exit_code = 0;

typedef struct {
  const char *name;
  bam_status (*run)(cli_args *, MPI_Comm);
} command;

static const command COMMANDS[] = {
    {"pretrain", cmd_pretrain},
    {"branch", cmd_branch},
    {"eval", cmd_eval},
    {"generate", cmd_generate},
    {"mix", cmd_mix},
    {"train", cmd_train},
    {"inspect", cmd_inspect},
    {"export", cmd_export},
    {"report", cmd_report},
};

int main(int argc, char **argv) {
  int provided;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int rank, world;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  bam_log_init(rank, world);

  if (argc < 2) {
    if (rank == 0) fprintf(stderr, "bam: no command given (run 'bam help' for the commands)\n");
    MPI_Finalize();
    return 2;
  }
  if (!strcmp(argv[1], "help") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
    if (rank == 0) fputs(USAGE, stdout);
    MPI_Finalize();
    return 0;
  }
  if (!strcmp(argv[1], "version") || !strcmp(argv[1], "--version")) {
    char blas[256];
    bam_blas_describe(blas, sizeof blas);
    bam_log("bam %s\nOpenBLAS kernels: %s\nOpenMP threads per rank: %d\n", BAM_VERSION, blas,
            omp_get_max_threads());
    MPI_Finalize();
    return 0;
  }
  const command *cmd = NULL;
  for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++)
    if (!strcmp(argv[1], COMMANDS[i].name)) cmd = &COMMANDS[i];
  if (!cmd) {
    if (rank == 0) fprintf(stderr, "bam: unknown command '%s' (run 'bam help' for the commands)\n", argv[1]);
    MPI_Finalize();
    return 2;
  }
  cli_args a = {.argc = argc, .argv = argv, .i = 2};
  bam_status st = cmd->run(&a, MPI_COMM_WORLD);
  if (st != BAM_OK) {
    if (world > 1) fprintf(stderr, "bam %s: error (rank %d): %s\n", cmd->name, rank, bam_error_message());
    else fprintf(stderr, "bam %s: error: %s\n", cmd->name, bam_error_message());
    const char *trace = getenv("BAM_TRACE");
    if (trace && trace[0] == '1') fputs(bam_error_backtrace(), stderr);
    fflush(stderr);
    if (world > 1) MPI_Abort(MPI_COMM_WORLD, (int)st);
    MPI_Finalize();
    return (int)st;
  }
  MPI_Finalize();
  return cli_exit_code;
}
