/* Dense data-parallel pretraining.
 *
 * One step: every rank runs grad_accum micro-batches of its share of the global batch
 * (forward, backward, gradients accumulated with scale 1/(grad_accum * world)); the gradient
 * buffer is reduce-scattered in rank order, so rank r holds the summed gradient of its slice
 * [lo, hi); the global norm is an ordered sum of per-slice sums of squares; each rank clips
 * and applies AdamW to its slice with its slice of the moments; the updated slices are
 * all-gathered. Same rank count: bitwise-identical runs. Other rank counts: the same sums in
 * another order (float rounding).
 *
 * An expert-sharded mixture (mixture.ep = G > 1) holds the replicated tensors and its own
 * experts' blocks: the flat buffers have two parts, each exchanged like the dense buffer
 * over its own communicator: the replicated part over all ranks, the expert part over the
 * P/G ranks that hold the same experts (expert_dp_comm). Checkpoints are written in the
 * global layout (bam_ckpt_save_pieces), so any rank count or ep can resume them. */
#include <errno.h>
#include <stdio.h>
#include <math.h>
#include <omp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "bam/ckpt.h"
#include "bam/kernels.h"
#include "bam/net.h"
#include "bam/optim.h"
#include "bam/parallel.h"
#include "bam/shard.h"
#include "bam/train.h"

static int omp_threads(void) { return omp_get_max_threads(); }

static volatile sig_atomic_t stop_signal = 0;
static void on_signal(int sig) { stop_signal = sig; }

/* mkdir -p */
static bam_status make_dirs(const char *path) {
  char buf[BAM_PATH_MAX];
  bam_strlcpy(buf, path, sizeof buf);
  for (char *p = buf + 1; *p; p++) {
    if (*p != '/') continue;
    *p = 0;
    if (mkdir(buf, 0755) != 0 && errno != EEXIST)
      BAM_FAIL(BAM_ERR_IO, "%s: cannot create folder: %s", buf, strerror(errno));
    *p = '/';
  }
  if (mkdir(buf, 0755) != 0 && errno != EEXIST)
    BAM_FAIL(BAM_ERR_IO, "%s: cannot create folder: %s", buf, strerror(errno));
  return BAM_OK;
}

static void format_eta(char *buf, size_t n, double seconds) {
  if (!(seconds >= 0) || seconds > 1e7) {
    snprintf(buf, n, "?");
    return;
  }
  int s = (int)(seconds + 0.5);
  if (s >= 3600) snprintf(buf, n, "%dh%02dm", s / 3600, (s / 60) % 60);
  else snprintf(buf, n, "%dm%02ds", s / 60, s % 60);
}

typedef struct {
  const bam_config *cfg;
  MPI_Comm comm;
  int rank, world;
  bam_net net;             /* the dense model or a mixture */
  MPI_Comm ep_comm;        /* expert-parallel group (mixture.ep > 1), else MPI_COMM_NULL */
  MPI_Comm edp_comm;       /* the ranks holding this rank's experts (sharded), else NULL */
  bam_tensor_info trained[BAM_MAX_TENSORS]; /* the tensors AdamW updates (frozen experts: not) */
  int n_trained;
  /* The parts of the flat buffers, each summed over its own ranks: [0] the replicated
   * tensors (all of a dense model) over comm; [1] an expert-sharded mixture's expert blocks
   * over edp_comm. This rank updates [base + lo, base + hi) of each, with AdamW moments at
   * adam_m[state ...]. */
  struct {
    bam_exchange *x;
    size_t base, lo, hi, state;
  } part[2];
  int n_parts;
  size_t n_state;          /* floats of adam_m, adam_v: the rank's slices of every part */
  float *adam_m, *adam_v;  /* AdamW moments of the slices only */
  /* Global positions: every local tensor (params) and the slices (optimizer state). */
  bam_ckpt_piece tensor_pieces[BAM_MAX_TENSORS], state_pieces[2 * BAM_MAX_TENSORS];
  int n_state_pieces;
  bam_loader *loader;
  int step;                /* optimizer steps done */
  int eval_batch;          /* sequences per rank in each evaluation batch */
  int64_t tokens_seen;
  char tok_id[64];
  char ckpt_dir[BAM_PATH_MAX + 16];
  int saved_step;          /* step of the newest checkpoint written or loaded */
  const char *lineage;     /* stored in every checkpoint */
  FILE *metrics, *evals;   /* rank 0 only */
} trainer;

/* Rewrite a CSV keeping the header and the rows whose first field (a step) is <= max_step:
 * a resumed run continues the log of the run it resumes, without the steps it redoes. */
static FILE *open_log(const char *path, const char *header, int max_step) {
  FILE *f = fopen(path, "r");
  char *kept = NULL;
  size_t kept_len = 0;
  FILE *mem = open_memstream(&kept, &kept_len);
  if (f && mem && max_step > 0) {
    char line[1024];
    int first = 1;
    while (fgets(line, sizeof line, f)) {
      if (first) { first = 0; continue; }
      if (atoi(line) <= max_step) fputs(line, mem);
    }
  }
  if (f) fclose(f);
  if (mem) fclose(mem);
  f = fopen(path, "w");
  if (f) {
    fprintf(f, "%s\n", header);
    if (kept) fputs(kept, f);
    fflush(f);
  }
  free(kept);
  return f;
}

static bam_status open_logs(trainer *t) {
  if (t->rank != 0) return BAM_OK;
  const bam_config *cfg = t->cfg;
  char path[BAM_PATH_MAX + 32];
  snprintf(path, sizeof path, "%s/config.ini", cfg->out_dir);
  FILE *f = fopen(path, "w");
  if (!f) BAM_FAIL(BAM_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
  bam_config_write(cfg, f);
  fclose(f);
  snprintf(path, sizeof path, "%s/metrics.csv", cfg->out_dir);
  t->metrics = open_log(path, "step,tokens,loss,lr,grad_norm,tokens_per_s,comm_share,aux_loss", t->step);
  snprintf(path, sizeof path, "%s/eval.csv", cfg->out_dir);
  t->evals = open_log(path, "step,domain,tokens,loss,ppl,bpb", t->step);
  if (!t->metrics || !t->evals)
    BAM_FAIL(BAM_ERR_IO, "%s: cannot write logs: %s", cfg->out_dir, strerror(errno));
  return BAM_OK;
}

static bam_status run_eval(trainer *t, int final) {
  const bam_config *cfg = t->cfg;
  bam_eval_result r[BAM_MAX_DOMAINS];
  int n = 0;
  double t0 = bam_now();
  /* An expert-sharded mixture evaluates in lock step over its groups (bam_evaluate). */
  BAM_CHECK(bam_evaluate(&t->net, cfg, cfg->eval_domains, cfg->eval_max_tokens, t->eval_batch,
                         final, t->tok_id, r, &n, t->comm));
  bam_log("eval @ step %d (%.1fs):", t->step, bam_now() - t0);
  for (int i = 0; i < n; i++) bam_log(" %s %.4f", r[i].domain, r[i].loss);
  bam_log("\n");
  if (final && t->rank == 0) {
    bam_eval_print(r, n, stdout);
    bam_eval_print_routing(r, n, stdout);
  }
  if (t->evals) {
    for (int i = 0; i < n; i++)
      fprintf(t->evals, "%d,%s,%lld,%.6f,%.4f,%.6f\n", t->step, r[i].domain,
              (long long)r[i].tokens, r[i].loss, r[i].ppl, r[i].bpb);
    fflush(t->evals);
  }
  bam_eval_results_free(r, n);
  return BAM_OK;
}

static bam_status save_checkpoint(trainer *t) {
  const bam_config *cfg = t->cfg;
  double t0 = bam_now();
  char *cfg_text = bam_config_to_string(cfg);
  int64_t loader_pos = bam_loader_position(t->loader);
  uint64_t rng[4] = {0, 0, 0, 0}; /* dense training draws no random numbers after init */
  bam_ckpt_info info = {.step = t->step, .tokens_seen = t->tokens_seen, .config_text = cfg_text,
                        .lineage_text = (char *)t->lineage, .world = t->world,
                        .loader_state = &loader_pos, .rng_state = rng};
  bam_strlcpy(info.kind, t->net.kind, sizeof info.kind);
  bam_strlcpy(info.tokenizer, t->tok_id, sizeof info.tokenizer);
  char path[BAM_PATH_MAX + 64];
  bam_status st = bam_ckpt_save_pieces(t->ckpt_dir, &info, t->net.global_tensors,
                                       t->net.n_global_tensors, t->net.n_params_global,
                                       t->state_pieces, t->n_state_pieces, t->net.params, t->adam_m,
                                       t->adam_v, cfg->ckpt_keep, t->comm, path, sizeof path);
  free(cfg_text);
  BAM_CHECK(st);
  t->saved_step = t->step;
  bam_log("checkpoint %s (%.2f s)\n", path, bam_now() - t0);
  return BAM_OK;
}

static bam_status check_layout(trainer *t, bam_ckpt *c) {
  return bam_ckpt_check_layout(c, t->net.global_tensors, t->net.n_global_tensors,
                               t->net.n_params_global);
}

/* This rank's tensors (its expert blocks only, when sharded) from their global positions. */
static bam_status read_params(trainer *t, bam_ckpt *c) {
  for (int i = 0; i < t->net.n_tensors; i++) {
    const bam_ckpt_piece *p = &t->tensor_pieces[i];
    BAM_CHECK(bam_ckpt_read(c, "params", (bam_range){p->global, p->global + p->n},
                            t->net.params + p->local));
  }
  return BAM_OK;
}

/* Start from another checkpoint's parameters (a branch from its seed): fresh optimizer. */
static bam_status init_from(trainer *t, const char *path) {
  bam_ckpt *c = NULL;
  BAM_CHECK(bam_ckpt_open(&c, path));
  const bam_ckpt_info *info = bam_ckpt_get_info(c);
  bam_status st = BAM_OK;
  BAM_CHECK_GOTO(st, check_layout(t, c), done);
  if (strcmp(info->tokenizer, t->tok_id) != 0) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: trained with tokenizer '%s', the data uses '%s'", bam_ckpt_path(c),
                       info->tokenizer, t->tok_id);
    goto done;
  }
  BAM_CHECK_GOTO(st, read_params(t, c), done);
  bam_log("initialised from %s (step %lld, %lld tokens)\n", bam_ckpt_path(c), (long long)info->step,
          (long long)info->tokens_seen);
done:
  bam_ckpt_close(&c);
  return st;
}

static bam_status resume(trainer *t, const char *path_arg) {
  char path[BAM_PATH_MAX + 64];
  if (path_arg && path_arg[0]) {
    bam_strlcpy(path, path_arg, sizeof path);
  } else {
    int found = 0;
    BAM_CHECK(bam_ckpt_latest(t->ckpt_dir, path, sizeof path, &found));
    if (!found) {
      bam_log("resume: no checkpoint under %s, starting from the beginning\n", t->ckpt_dir);
      return BAM_OK;
    }
  }
  bam_ckpt *c = NULL;
  BAM_CHECK(bam_ckpt_open(&c, path));
  bam_status st = BAM_OK;
  const bam_ckpt_info *info = bam_ckpt_get_info(c);
  BAM_CHECK_GOTO(st, check_layout(t, c), done);
  if (strcmp(info->kind, t->net.kind) != 0) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: a '%s' checkpoint, this run trains a '%s' model",
                       bam_ckpt_path(c), info->kind, t->net.kind);
    goto done;
  }
  if (strcmp(info->tokenizer, t->tok_id) != 0) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s: trained with tokenizer '%s', the data uses '%s'", bam_ckpt_path(c),
                       info->tokenizer, t->tok_id);
    goto done;
  }
  if (!bam_ckpt_has_moments(c)) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                       "%s holds parameters only (an export?): it cannot resume training",
                       bam_ckpt_path(c));
    goto done;
  }
  BAM_CHECK_GOTO(st, read_params(t, c), done);
  for (int i = 0; i < t->n_state_pieces; i++) {
    const bam_ckpt_piece *p = &t->state_pieces[i];
    const bam_range r = {p->global, p->global + p->n};
    BAM_CHECK_GOTO(st, bam_ckpt_read(c, "adam_m", r, t->adam_m + p->state), done);
    BAM_CHECK_GOTO(st, bam_ckpt_read(c, "adam_v", r, t->adam_v + p->state), done);
  }
  t->step = (int)info->step;
  t->tokens_seen = info->tokens_seen;
  t->saved_step = t->step;
  /* The loader state is a count of global batches, the same on every rank and independent
   * of the rank count, so a checkpoint of P ranks resumes on any other P. */
  bam_loader_seek(t->loader, info->loader_state[0]);
  bam_log("resumed from %s: step %d, %lld tokens seen, written by %d rank%s\n", bam_ckpt_path(c),
          t->step, (long long)t->tokens_seen, info->world, info->world > 1 ? "s" : "");
done:
  bam_ckpt_close(&c);
  return st;
}

/* One optimizer step; returns the mean token loss, the auxiliary (router) loss of a mixture
 * and the gradient norm before clipping. */
static bam_status train_step(trainer *t, int32_t *x, int32_t *y, int local_batch, double *loss_out,
                             double *aux_out, double *norm_out, float lr) {
  const bam_config *cfg = t->cfg;
  bam_net *n = &t->net;
  const int T = n->seq_len;
  bam_net_zero_grad(n);
  double sums[2] = {0, 0}; /* token loss, auxiliary loss */
  for (int micro = 0; micro < cfg->grad_accum; micro++) {
    BAM_CHECK(bam_loader_next(t->loader, x, y));
    float loss;
    BAM_CHECK(bam_net_forward(n, x, y, local_batch, T, &loss));
    BAM_CHECK(bam_net_backward(n, 1.0f / (float)(cfg->grad_accum * t->world)));
    const float token = bam_net_token_loss(n);
    sums[0] += token;
    sums[1] += (double)loss - token;
  }
  double sumsq = 0;
  for (int p = 0; p < t->n_parts; p++) {
    float *g = n->grads + t->part[p].base;
    BAM_CHECK(bam_reduce_scatter_ordered(t->part[p].x, g));
    sumsq += bam_sum_squares(g + t->part[p].lo, t->part[p].hi - t->part[p].lo);
  }
  /* Every element is in exactly one rank's slice of one part: the world-wide sum is the
   * squared norm of the whole gradient. */
  BAM_CHECK(bam_sum_ordered(&sumsq, t->comm));
  BAM_CHECK(bam_sum_ordered(&sums[0], t->comm));
  BAM_CHECK(bam_sum_ordered(&sums[1], t->comm));
  const double loss = sums[0] / (cfg->grad_accum * t->world), norm = sqrt(sumsq);
  if (!isfinite(loss) || !isfinite(norm))
    BAM_FAIL(BAM_ERR_NUMERIC, "training loss %g, gradient norm %g at step %d: lower train.lr or check the data",
             loss, norm, t->step + 1);
  const bam_adamw_hparams hp = {cfg->beta1, cfg->beta2, cfg->adam_eps, cfg->weight_decay};
  for (int p = 0; p < t->n_parts; p++) {
    const size_t lo = t->part[p].base + t->part[p].lo, hi = t->part[p].base + t->part[p].hi;
    if (cfg->grad_clip > 0 && norm > cfg->grad_clip)
      bam_scale(n->grads + lo, hi - lo, (float)(cfg->grad_clip / norm));
    /* the moments of [lo, hi) start at state; adamw indexes them from lo */
    bam_adamw_step_range(n->params, n->grads, t->adam_m + t->part[p].state,
                         t->adam_v + t->part[p].state, t->trained, t->n_trained, lo, hi, lr, &hp,
                         t->step + 1);
    BAM_CHECK(bam_allgather_slices(t->part[p].x, n->params + t->part[p].base));
  }
  *loss_out = loss;
  *aux_out = sums[1] / (cfg->grad_accum * t->world);
  *norm_out = norm;
  return BAM_OK;
}

/* Any rank's stop request stops every rank at the same step. */
static int agree_stop(trainer *t) {
  int s = stop_signal != 0;
  if (t->world > 1) MPI_Allreduce(MPI_IN_PLACE, &s, 1, MPI_INT, MPI_MAX, t->comm);
  return s;
}

static void print_memory(const trainer *t, int local_batch) {
  char a[32], b[32], c[32], d[32];
  const double pb = (double)t->net.n_params * sizeof(float);
  bam_format_bytes(a, sizeof a, pb);
  bam_format_bytes(b, sizeof b, pb);
  bam_format_bytes(c, sizeof c, 2.0 * (double)t->n_state * sizeof(float));
  bam_format_bytes(d, sizeof d, (double)t->net.act_bytes);
  bam_log("model: %s, %zu parameters (%.2fM)\n", t->net.kind, t->net.n_params_global,
          t->net.n_params_global / 1e6);
  if (t->n_parts > 1)
    bam_log("expert sharding: this rank holds %zu of them (%.2fM: %.2fM replicated, %.2fM of "
            "its experts)\n", t->net.n_params, t->net.n_params / 1e6, t->net.n_replicated / 1e6,
            (t->net.n_params - t->net.n_replicated) / 1e6);
  bam_log("memory per rank: params %s, grads %s, adamw %s (its slices), activations %s "
          "(batch %d x %d)\n", a, b, c, d, local_batch, t->net.seq_len);
}

/* The parts of the buffers, their exchanges, this rank's slices and their global pieces. */
static bam_status plan_parts(trainer *t) {
  const bam_net *n = &t->net;
  t->n_parts = n->n_replicated < n->n_params ? 2 : 1;
  t->n_state = 0;
  for (int p = 0; p < t->n_parts; p++) {
    const size_t base = p ? n->n_replicated : 0, len = p ? n->n_params - base : n->n_replicated;
    MPI_Comm c = p ? t->edp_comm : t->comm;
    int r;
    MPI_Comm_rank(c, &r);
    BAM_CHECK(bam_exchange_create(&t->part[p].x, len, c));
    t->part[p].base = base;
    bam_exchange_range(t->part[p].x, r, &t->part[p].lo, &t->part[p].hi);
    t->part[p].state = t->n_state;
    t->n_state += t->part[p].hi - t->part[p].lo;
  }
  for (int i = 0; i < n->n_tensors; i++)
    t->tensor_pieces[i] = (bam_ckpt_piece){.global = n->global_offset[i],
                                           .local = n->tensors[i].offset,
                                           .n = n->tensors[i].numel};
  t->n_state_pieces = 0;
  for (int p = 0; p < t->n_parts; p++) {
    const size_t lo = t->part[p].base + t->part[p].lo, hi = t->part[p].base + t->part[p].hi;
    for (int i = 0; i < n->n_tensors; i++) {
      const bam_tensor_info *ti = &n->tensors[i];
      const size_t a = ti->offset > lo ? ti->offset : lo;
      const size_t b = ti->offset + ti->numel < hi ? ti->offset + ti->numel : hi;
      if (a >= b) continue;
      t->state_pieces[t->n_state_pieces++] =
          (bam_ckpt_piece){.global = n->global_offset[i] + (a - ti->offset), .local = a,
                           .state = t->part[p].state + (a - lo), .n = b - a};
    }
  }
  return BAM_OK;
}

static double comm_seconds(const trainer *t) {
  double s = bam_net_comm_seconds(&t->net);
  for (int p = 0; p < t->n_parts; p++) s += bam_exchange_seconds(t->part[p].x);
  return s;
}


/* Median of v[skip..n) (all of v when fewer than skip + 1 values); sorts that part. */
static double median_after(double *v, int n, int skip) {
  if (n <= skip) skip = 0;
  return bam_median(v + skip, n - skip);
}

/* After the final evaluation (collective over t->comm): logs the peak resident memory per
 * rank (maximum over ranks) and rank 0 writes <out_dir>/summary.json with the medians over
 * the logged steps after the first two (warm-up) of tokens/s and communication share. */
static bam_status write_summary(const trainer *t, double *tps, double *comm_share, int n_logged,
                                double flops_per_token) {
  double rss = bam_peak_rss_mib();
  if (t->world > 1) MPI_Allreduce(MPI_IN_PLACE, &rss, 1, MPI_DOUBLE, MPI_MAX, t->comm);
  const double med_tps = median_after(tps, n_logged, 2);
  const double med_comm = median_after(comm_share, n_logged, 2);
  const double gflops = 3.0 * flops_per_token * med_tps / 1e9;
  bam_log("peak resident memory per rank: %.0f MiB (maximum over %d rank%s)\n", rss, t->world,
          t->world > 1 ? "s" : "");
  if (t->rank != 0) return BAM_OK;
  char path[BAM_PATH_MAX + 32];
  snprintf(path, sizeof path, "%s/summary.json", t->cfg->out_dir);
  FILE *f = fopen(path, "w");
  if (!f) BAM_FAIL(BAM_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
  fprintf(f,
          "{\"kind\": \"%s\", \"ranks\": %d, \"threads\": %d, \"ep\": %d, \"steps_logged\": %d, "
          "\"tokens_per_s\": %.1f, \"comm_share\": %.4f, \"model_gflops\": %.2f, "
          "\"peak_rss_mib\": %.1f}\n",
          t->net.kind, t->world, omp_threads(), t->cfg->ep > 1 ? t->cfg->ep : 1, n_logged, med_tps,
          med_comm, gflops, rss);
  if (fclose(f) != 0) BAM_FAIL(BAM_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
  return BAM_OK;
}

bam_status bam_pretrain(const bam_config *cfg, const bam_train_opts *opts, MPI_Comm comm,
                        int *interrupted) {
  trainer t = {.cfg = cfg, .comm = comm, .saved_step = -1, .ep_comm = MPI_COMM_NULL,
               .edp_comm = MPI_COMM_NULL};
  MPI_Comm_rank(comm, &t.rank);
  MPI_Comm_size(comm, &t.world);
  *interrupted = 0;
  bam_model_shape shape = bam_config_shape(cfg);
  const int T = shape.seq_len;
  if (cfg->batch_size % t.world)
    BAM_FAIL(BAM_ERR_CONFIG, "train.batch_size (%d) must be divisible by the number of ranks (%d)",
             cfg->batch_size, t.world);
  const int local_batch = cfg->batch_size / t.world;
  if (cfg->ep > 1 && t.world % cfg->ep)
    BAM_FAIL(BAM_ERR_CONFIG,
             "mixture.ep = %d must divide the number of ranks (%d): expert-parallel groups are "
             "ep consecutive ranks", cfg->ep, t.world);
  snprintf(t.ckpt_dir, sizeof t.ckpt_dir, "%s/ckpt", cfg->out_dir);
  bam_status st = BAM_OK;

  bam_tokenizer *tok = NULL;
  char vocab_path[BAM_PATH_MAX + 32];
  snprintf(vocab_path, sizeof vocab_path, "%s/tokenizer/spm.vocab", cfg->data_dir);
  BAM_CHECK(bam_tokenizer_load(&tok, vocab_path));
  int vocab = bam_tokenizer_vocab_size(tok);
  bam_strlcpy(t.tok_id, bam_tokenizer_id(tok), sizeof t.tok_id);
  bam_tokenizer_free(&tok);
  if (vocab != shape.vocab_size)
    BAM_FAIL(BAM_ERR_CONFIG, "%s has %d pieces but model.vocab_size is %d", vocab_path, vocab,
             shape.vocab_size);

  bam_mix mix;
  BAM_CHECK(bam_mix_parse(&mix, cfg->train_mix));
  BAM_CHECK(bam_loader_create(&t.loader, cfg->data_dir, &mix, "train", T, cfg->batch_size, t.rank,
                              t.world, (uint64_t)cfg->seed, shape.vocab_size));
  int32_t *x = NULL, *y = NULL;
  double *log_tps = NULL, *log_comm = NULL; /* per logged step, for summary.json */
  int n_logged = 0;
  /* eval.batch_size is global like train.batch_size: each rank evaluates its share of every
   * batch, so the activations are sized for the larger of the two per-rank batches only */
  t.eval_batch = (cfg->eval_batch_size + t.world - 1) / t.world;
  const int max_batch = local_batch > t.eval_batch ? local_batch : t.eval_batch;
  if (cfg->ep > 1) {
    /* groups of ep consecutive ranks; the ranks at the same position of every group hold
     * the same experts */
    MPI_Comm_split(comm, t.rank / cfg->ep, t.rank, &t.ep_comm);
    MPI_Comm_split(comm, t.rank % cfg->ep, t.rank, &t.edp_comm);
  }
  BAM_CHECK_GOTO(st, bam_net_create_ep(&t.net, cfg, max_batch, t.ep_comm), done);
  bam_net_init(&t.net, (uint64_t)cfg->seed, cfg->init_std);
  if (cfg->ep > 1)
    bam_log("expert parallelism: %d group%s of %d ranks; rank r of a group holds and computes "
            "FFN experts [r %d/%d, (r+1) %d/%d)%s\n", t.world / cfg->ep,
            t.world / cfg->ep > 1 ? "s" : "", cfg->ep, t.net.mix->shape.n_ffn_experts, cfg->ep,
            t.net.mix->shape.n_ffn_experts, cfg->ep,
            t.net.mix->shape.method != BAM_METHOD_BTX ? " and the matching attention experts" : "");
  for (int i = 0; i < t.net.n_tensors; i++)
    if (!(cfg->freeze_experts && bam_net_is_expert_tensor(&t.net, &t.net.tensors[i])))
      t.trained[t.n_trained++] = t.net.tensors[i];
  if (t.n_trained < t.net.n_tensors)
    bam_log("frozen: %d expert tensors are not trained (mixture.freeze_experts)\n",
            t.net.n_tensors - t.n_trained);
  BAM_CHECK_GOTO(st, plan_parts(&t), done);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&t.adam_m, (t.n_state + 1) * sizeof(float), "AdamW m"), done);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&t.adam_v, (t.n_state + 1) * sizeof(float), "AdamW v"), done);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&x, sizeof(int32_t) * local_batch * T, "inputs"), done);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&y, sizeof(int32_t) * local_batch * T, "targets"), done);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&log_tps, sizeof(double) * (cfg->steps + 1), "step log"), done);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&log_comm, sizeof(double) * (cfg->steps + 1), "step log"), done);
  print_memory(&t, local_batch);
  if (t.rank == 0) st = make_dirs(cfg->out_dir);
  MPI_Bcast(&st, 1, MPI_INT, 0, comm);
  if (st != BAM_OK) {
    if (t.rank != 0) st = bam_error_set(st, __FILE__, __LINE__, "rank 0 could not create %s", cfg->out_dir);
    goto done;
  }
  t.lineage = opts ? opts->lineage : NULL;
  if (opts && opts->resume) BAM_CHECK_GOTO(st, resume(&t, opts->resume_path), done);
  if (t.saved_step < 0 && opts && opts->init_from) BAM_CHECK_GOTO(st, init_from(&t, opts->init_from), done);
  BAM_CHECK_GOTO(st, open_logs(&t), done);
  if (t.step == 0 && opts && opts->eval_at_start) BAM_CHECK_GOTO(st, run_eval(&t, 0), done);

  const int64_t tokens_per_step = (int64_t)cfg->batch_size * cfg->grad_accum * T;
  const double flops_per_step = 3.0 * bam_net_flops_per_token(&t.net, T) * (double)tokens_per_step;
  const int last = opts && opts->stop_after > 0 && opts->stop_after < cfg->steps ? opts->stop_after
                                                                                 : cfg->steps;
  if (t.step >= last) {
    bam_log("training: nothing left to train (step %d of %d done)\n", t.step, cfg->steps);
  } else {
    char blas[256];
    bam_blas_describe(blas, sizeof blas);
    bam_log("training: steps %d..%d of %d, %lld tokens a step (%d seq x %d micro-batches x %d "
            "tokens) on %d rank%s x %d thread%s\nOpenBLAS kernels: %s\n", t.step + 1, last,
            cfg->steps, (long long)tokens_per_step, cfg->batch_size, cfg->grad_accum, T, t.world,
            t.world > 1 ? "s" : "", omp_threads(), omp_threads() > 1 ? "s" : "", blas);
  }
  struct sigaction sa = {0}, old_term, old_int;
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, &old_term);
  sigaction(SIGINT, &sa, &old_int);
  stop_signal = 0;

  const int first = t.step;
  double t_start = bam_now(), t_window = t_start, comm_window = 0;
  int window_steps = 0;
  while (t.step < last) {
    const float lr = bam_lr_at(t.step, cfg->warmup_steps, cfg->steps, cfg->lr, cfg->min_lr_ratio);
    double loss = 0, aux = 0, norm = 0;
    /* communication: the gradient exchange and a mixture's expert-parallel exchanges */
    const double comm_before = comm_seconds(&t);
    BAM_CHECK_GOTO(st, train_step(&t, x, y, local_batch, &loss, &aux, &norm, lr), done_signals);
    comm_window += comm_seconds(&t) - comm_before;
    t.step++;
    t.tokens_seen += tokens_per_step;
    window_steps++;
    if (t.step % cfg->log_every == 0 || t.step == first + 1 || t.step == last) {
      const double now = bam_now(), dt = (now - t_window) / window_steps;
      const double tps = (double)tokens_per_step / dt, comm_share = comm_window / (now - t_window);
      char eta[32];
      format_eta(eta, sizeof eta, (now - t_start) / (t.step - first) * (last - t.step));
      char aux_text[32] = "";
      if (t.net.mix) snprintf(aux_text, sizeof aux_text, " | aux %.4f", aux);
      bam_log("step %5d/%d | loss %.4f%s | lr %.3e | grad norm %7.3f | %7.0f tok/s | %5.1f GFLOP/s"
              " | eta %s\n", t.step, cfg->steps, loss, aux_text, lr, norm, tps,
              flops_per_step / dt / 1e9, eta);
      if (t.world > 1) bam_log("           communication %.1f%% of step time\n", 100 * comm_share);
      if (n_logged <= cfg->steps) {
        log_tps[n_logged] = tps;
        log_comm[n_logged++] = comm_share;
      }
      if (t.metrics) {
        fprintf(t.metrics, "%d,%lld,%.17g,%.9g,%.9g,%.1f,%.4f,%.9g\n", t.step,
                (long long)t.tokens_seen, loss, lr, norm, tps, comm_share, aux);
        fflush(t.metrics);
      }
      t_window = now, comm_window = 0, window_steps = 0;
    }
    if (cfg->eval_every > 0 && t.step % cfg->eval_every == 0 && t.step != cfg->steps)
      BAM_CHECK_GOTO(st, run_eval(&t, 0), done_signals);
    int stop = agree_stop(&t);
    if ((cfg->ckpt_every > 0 && t.step % cfg->ckpt_every == 0) || stop || t.step == last)
      BAM_CHECK_GOTO(st, save_checkpoint(&t), done_signals);
    if (stop) {
      bam_log("stopping on signal %d after step %d; resume with --resume\n", (int)stop_signal, t.step);
      *interrupted = 1;
      goto done_signals;
    }
  }
  if (t.saved_step != t.step) BAM_CHECK_GOTO(st, save_checkpoint(&t), done_signals);
  if (t.step < cfg->steps) {
    bam_log("stopped after step %d of %d as asked; resume with --resume\n", t.step, cfg->steps);
    goto done_signals;
  }
  BAM_CHECK_GOTO(st, run_eval(&t, 1), done_signals);
  BAM_CHECK_GOTO(st, write_summary(&t, log_tps, log_comm, n_logged, bam_net_flops_per_token(&t.net, T)),
                 done_signals);
  if (t.rank == 0) {
    char latest[BAM_PATH_MAX + 64], final_path[BAM_PATH_MAX + 32];
    int found = 0;
    st = bam_ckpt_latest(t.ckpt_dir, latest, sizeof latest, &found);
    snprintf(final_path, sizeof final_path, "%s/final.h5", cfg->out_dir);
    if (st == BAM_OK) st = bam_ckpt_export(latest, final_path, 0);
    if (st == BAM_OK)
      bam_log("wrote %s (%.1f s, %lld tokens seen)\n", final_path, bam_now() - t_start,
              (long long)t.tokens_seen);
  }
done_signals:
  sigaction(SIGTERM, &old_term, NULL);
  sigaction(SIGINT, &old_int, NULL);
done:
  if (t.metrics) fclose(t.metrics);
  if (t.evals) fclose(t.evals);
  bam_free(x);
  bam_free(y);
  bam_free(log_tps);
  bam_free(log_comm);
  bam_free(t.adam_m);
  bam_free(t.adam_v);
  for (int p = 0; p < 2; p++) bam_exchange_free(&t.part[p].x);
  bam_net_free(&t.net);
  if (t.ep_comm != MPI_COMM_NULL) MPI_Comm_free(&t.ep_comm);
  if (t.edp_comm != MPI_COMM_NULL) MPI_Comm_free(&t.edp_comm);
  bam_loader_free(&t.loader);
  return st;
}
