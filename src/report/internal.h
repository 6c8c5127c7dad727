/* report internals: the run as read from its folder (collect.c), text and file helpers
 * (text.c), figures (figures.c), Markdown and CSV (tables.c), orchestration (report.c). */
#ifndef BAM_REPORT_INTERNAL_H
#define BAM_REPORT_INTERNAL_H

#include <stdarg.h>
#include <stdint.h>

#include "bam/core.h"
#include "bam/report.h"

/* ---- growable text: every append is checked once at the end (rp_buf_status) ---- */
typedef struct {
  char *s;
  size_t len, cap;
  int failed; /* an allocation failed: s holds a prefix */
} rp_buf;
void rp_printf(rp_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void rp_puts(rp_buf *b, const char *s);
bam_status rp_buf_status(const rp_buf *b, const char *what);
void rp_buf_free(rp_buf *b);

/* A malloc'd formatted string in *out (freeing what *out held). */
bam_status rp_fmt(char **out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
bam_status rp_strdup(char **out, const char *s);

/* Files. */
int rp_exists(const char *path);
int rp_is_dir(const char *path);
/* Whole file into a malloc'd NUL-terminated string (*len its length, may be NULL). */
bam_status rp_read_file(const char *path, char **out, size_t *len);
/* Write text to path (created or truncated); errors name the file. */
bam_status rp_write_file(const char *path, const char *text, size_t len);
/* Remove a folder and everything under it (no symlinks followed). */
bam_status rp_remove_tree(const char *path);

/* Lines of a text: *line points into the text (the '\n' replaced by 0), lineno counts from 1.
 * Returns 0 at the end. */
typedef struct {
  char *p;
  int lineno;
} rp_lines;
int rp_next_line(rp_lines *it, char **line);
/* Split s in place at sep (',' for CSV; ' ' splits on runs of blanks and tabs). Returns the
 * number of fields (at most cap stored; *n_all gets the real count). */
int rp_split(char *s, char sep, char **fields, int cap, int *n_all);
/* A whole field as a finite number / integer; 0 if it is not one. */
int rp_parse_double(const char *s, double *out);
int rp_parse_i64(const char *s, int64_t *out);

/* ---- the run ---- */
typedef struct {
  double tokens, loss;
} rp_point;
typedef struct {
  int64_t step;
  int domain; /* index into rp_run.vdom */
  double loss;
} rp_valid;

typedef enum { RP_SEED = 0, RP_EXPERT = 1, RP_MIXTURE = 2 } rp_kind;

typedef struct {
  char *name;     /* seed, expert-code, btx-dm, bam-cm ... */
  rp_kind kind;
  char *method;   /* dense, btx, bam, bam-shared-kv */
  char *matching; /* "", dm, cm */
  char *dir;      /* stage folder */
  int present;    /* 0: an optional run absent from this run folder */
  int64_t steps, tokens;
  double fpt;          /* forward FLOPs per token */
  double flops;        /* training FLOPs: 3 x fpt x tokens */
  double tokens_per_s; /* median from summary.json; NaN when absent */
  double *ppl, *bpb, *loss; /* [n_dom] from eval/<name>.txt */
  rp_point *train;
  int n_train;
  rp_valid *valid;
  int n_valid;
  /* mixtures: routing from eval/<name>.routing.csv, [n_dom][L][E] */
  int L, Ef, Ea;
  double *ffn, *att;
  char **expert_label; /* max(Ef, Ea) labels: "seed", then the experts' domains */
} rp_model;

typedef struct {
  char *run_dir;
  char *run_name; /* basename of run_dir */
  char **dom;     /* result columns: general, the experts' domains (sorted), held-out domains */
  int n_dom;
  int n_avg;      /* the first n_avg columns make the paper's average */
  char **vdom;    /* domains in the stages' eval.csv files (validation curves) */
  int n_vdom;
  rp_model *m;
  int n_models;
  int64_t eval_max_tokens; /* from eval/DONE; -1 if not stated */
} rp_run;

bam_status rp_collect(rp_run *run, const char *run_dir);
void rp_run_free(rp_run *run);
double rp_avg(const rp_model *m, const double *v, int n_avg);

/* ---- outputs, written into dir ---- */
typedef struct {
  const char *file;  /* loss-stages.png */
  const char *title; /* alt text and caption */
  int drawn;         /* set by rp_draw_figures */
  int wanted;        /* there is something to draw */
  char *problem;     /* why it was not drawn (malloc'd) */
} rp_figure;
enum { RP_FIG_LOSS = 0, RP_FIG_LOSS_MIX = 1, RP_FIG_FFN = 2, RP_FIG_ATT = 3, RP_N_FIGS = 4 };
/* Writes the .dat and .gp files of every figure and runs gnuplot on each (in dir). */
bam_status rp_write_figure_sources(const rp_run *run, const char *dir, rp_figure *figs);
void rp_draw_figures(const char *dir, const char *gnuplot, rp_figure *figs);

bam_status rp_write_results_csv(const rp_run *run, rp_buf *out);
bam_status rp_write_markdown(const rp_run *run, const rp_figure *figs, rp_buf *out);

#endif
