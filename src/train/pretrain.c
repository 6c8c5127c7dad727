#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "bam/ckpt.h"
#include "bam/optim.h"
#include "bam/train.h"

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

static void print_memory(const bam_model *m, int local_batch) {
  char a[32], b[32], c[32], d[32];
  double pb = (double)m->n_params * sizeof(float);
  bam_format_bytes(a, sizeof a, pb);
  bam_format_bytes(b, sizeof b, pb);
  bam_format_bytes(c, sizeof c, 2 * pb);
  bam_format_bytes(d, sizeof d, (double)m->act_bytes);
  bam_log("model: %zu parameters (%.2fM)\n", m->n_params, m->n_params / 1e6);
  bam_log("memory per rank: params %s, grads %s, adamw %s, activations %s (batch %d x %d)\n", a,
          b, c, d, local_batch, m->shape.seq_len);
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
  FILE *metrics; /* step,tokens,loss,lr,grad_norm,tokens_per_s */
  FILE *evals;   /* step,domain,tokens,loss,ppl,bpb */
} run_logs;

static bam_status run_eval(bam_model *m, const bam_config *cfg, const char *tok_id, int step,
                           int final, run_logs *logs, MPI_Comm comm) {
  bam_eval_result r[BAM_MAX_DOMAINS];
  int n = 0;
  double t0 = bam_now();
  BAM_CHECK(bam_evaluate(m, cfg, cfg->eval_domains, cfg->eval_max_tokens, cfg->eval_batch_size,
                         final, tok_id, r, &n, comm));
  bam_log("eval @ step %d (%.1fs):", step, bam_now() - t0);
  for (int i = 0; i < n; i++) bam_log(" %s %.4f", r[i].domain, r[i].loss);
  bam_log("\n");
  if (final && bam_log_rank() == 0) bam_eval_print(r, n, stdout);
  if (logs->evals) {
    for (int i = 0; i < n; i++)
      fprintf(logs->evals, "%d,%s,%lld,%.6f,%.4f,%.6f\n", step, r[i].domain,
              (long long)r[i].tokens, r[i].loss, r[i].ppl, r[i].bpb);
    fflush(logs->evals);
  }
  return BAM_OK;
}

bam_status bam_pretrain(const bam_config *cfg, MPI_Comm comm) {
  int rank, world;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &world);
  bam_model_shape shape = bam_config_shape(cfg);
  const int T = shape.seq_len;
  if (cfg->batch_size % world)
    BAM_FAIL(BAM_ERR_CONFIG, "train.batch_size (%d) must be divisible by the number of ranks (%d)",
             cfg->batch_size, world);
  const int local_batch = cfg->batch_size / world;
  bam_status st = BAM_OK;

  bam_tokenizer *tok = NULL;
  char vocab_path[BAM_PATH_MAX + 32];
  snprintf(vocab_path, sizeof vocab_path, "%s/tokenizer/spm.vocab", cfg->data_dir);
  BAM_CHECK(bam_tokenizer_load(&tok, vocab_path));
  if (bam_tokenizer_vocab_size(tok) != shape.vocab_size) {
    int v = bam_tokenizer_vocab_size(tok);
    bam_tokenizer_free(&tok);
    BAM_FAIL(BAM_ERR_CONFIG, "%s has %d pieces but model.vocab_size is %d", vocab_path, v,
             shape.vocab_size);
  }
  char tok_id[64];
  bam_strlcpy(tok_id, bam_tokenizer_id(tok), sizeof tok_id);
  bam_tokenizer_free(&tok);

  bam_mix mix;
  BAM_CHECK(bam_mix_parse(&mix, cfg->train_mix));
  bam_loader *loader = NULL;
  BAM_CHECK(bam_loader_create(&loader, cfg->data_dir, &mix, "train", T, cfg->batch_size, rank,
                              world, (uint64_t)cfg->seed, shape.vocab_size));

  bam_model *m = NULL;
  float *adam_m = NULL, *adam_v = NULL;
  int32_t *x = NULL, *y = NULL;
  run_logs logs = {0};
  int max_batch = local_batch > cfg->eval_batch_size ? local_batch : cfg->eval_batch_size;
  BAM_CHECK_GOTO(st, bam_model_create(&m, &shape, max_batch), done);
  bam_model_init(m, (uint64_t)cfg->seed, cfg->init_std);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&adam_m, m->n_params * sizeof(float), "AdamW m"), done);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&adam_v, m->n_params * sizeof(float), "AdamW v"), done);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&x, sizeof(int32_t) * local_batch * T, "inputs"), done);
  BAM_CHECK_GOTO(st, bam_alloc_checked((void **)&y, sizeof(int32_t) * local_batch * T, "targets"), done);
  print_memory(m, local_batch);

  if (rank == 0) {
    BAM_CHECK_GOTO(st, make_dirs(cfg->out_dir), done);
    char path[BAM_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/config.ini", cfg->out_dir);
    FILE *f = fopen(path, "w");
    if (f) {
      bam_config_write(cfg, f);
      fclose(f);
    }
    snprintf(path, sizeof path, "%s/metrics.csv", cfg->out_dir);
    logs.metrics = fopen(path, "w");
    snprintf(path, sizeof path, "%s/eval.csv", cfg->out_dir);
    logs.evals = fopen(path, "w");
    if (!logs.metrics || !logs.evals) {
      st = bam_error_set(BAM_ERR_IO, __FILE__, __LINE__, "%s: cannot write logs: %s", cfg->out_dir,
                         strerror(errno));
      goto done;
    }
    fprintf(logs.metrics, "step,tokens,loss,lr,grad_norm,tokens_per_s\n");
    fprintf(logs.evals, "step,domain,tokens,loss,ppl,bpb\n");
  }

  const bam_adamw_hparams hp = {cfg->beta1, cfg->beta2, cfg->adam_eps, cfg->weight_decay};
  const int64_t tokens_per_step = (int64_t)cfg->batch_size * cfg->grad_accum * T;
  const double flops_per_step = 3.0 * bam_model_flops_per_token(&shape, T) * tokens_per_step;
  bam_log("training: %d steps x %lld tokens (%d seq x %d micro-batches x %d tokens) on %d rank%s\n",
          cfg->steps, (long long)tokens_per_step, cfg->batch_size, cfg->grad_accum, T, world,
          world > 1 ? "s" : "");
  double t_start = bam_now(), t_window = t_start;
  int64_t tokens_seen = 0;
  for (int step = 0; step < cfg->steps; step++) {
    bam_model_zero_grad(m);
    double loss_sum = 0;
    for (int micro = 0; micro < cfg->grad_accum; micro++) {
      BAM_CHECK_GOTO(st, bam_loader_next(loader, x, y), done);
      float loss;
      BAM_CHECK_GOTO(st, bam_model_forward(m, x, y, local_batch, T, &loss), done);
      BAM_CHECK_GOTO(st, bam_model_backward(m, 1.0f / (float)(cfg->grad_accum * world)), done);
      loss_sum += loss;
    }
    if (world > 1) {
      /* Every rank holds the gradient of its share of the batch, pre-scaled by 1/world. */
      MPI_Allreduce(MPI_IN_PLACE, m->grads_mem, (int)m->n_params, MPI_FLOAT, MPI_SUM, comm);
      MPI_Allreduce(MPI_IN_PLACE, &loss_sum, 1, MPI_DOUBLE, MPI_SUM, comm);
      loss_sum /= world;
    }
    double loss = loss_sum / cfg->grad_accum;
    if (!isfinite(loss)) {
      st = bam_error_set(BAM_ERR_NUMERIC, __FILE__, __LINE__,
                         "training loss is %f at step %d: lower train.lr or check the data",
                         loss, step + 1);
      goto done;
    }
    double gnorm = cfg->grad_clip > 0 ? bam_clip_grad(m->grads_mem, m->n_params, cfg->grad_clip)
                                      : bam_grad_norm(m->grads_mem, m->n_params);
    float lr = bam_lr_at(step, cfg->warmup_steps, cfg->steps, cfg->lr, cfg->min_lr_ratio);
    bam_adamw_step(m->params_mem, m->grads_mem, adam_m, adam_v, m->tensors, m->n_tensors, lr, &hp,
                   step + 1);
    tokens_seen += tokens_per_step;

    int done_steps = step + 1;
    if (done_steps % cfg->log_every == 0 || done_steps == 1 || done_steps == cfg->steps) {
      double now = bam_now();
      int window_steps = done_steps == 1 ? 1 : (done_steps % cfg->log_every ? done_steps % cfg->log_every : cfg->log_every);
      double dt = (now - t_window) / window_steps;
      t_window = now;
      double tps = tokens_per_step / dt;
      char eta[32];
      format_eta(eta, sizeof eta, (now - t_start) / done_steps * (cfg->steps - done_steps));
      bam_log("step %5d/%d | loss %.4f | lr %.3e | grad norm %7.3f | %8.0f tok/s | %5.1f GFLOP/s | eta %s\n",
              done_steps, cfg->steps, loss, lr, gnorm, tps, flops_per_step / dt / 1e9, eta);
      if (logs.metrics) {
        fprintf(logs.metrics, "%d,%lld,%.6f,%.6e,%.6f,%.1f\n", done_steps, (long long)tokens_seen,
                loss, lr, gnorm, tps);
        fflush(logs.metrics);
      }
    }
    if (cfg->eval_every > 0 && done_steps % cfg->eval_every == 0 && done_steps != cfg->steps)
      BAM_CHECK_GOTO(st, run_eval(m, cfg, tok_id, done_steps, 0, &logs, comm), done);
  }
  BAM_CHECK_GOTO(st, run_eval(m, cfg, tok_id, cfg->steps, 1, &logs, comm), done);

  if (rank == 0) {
    char path[BAM_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/final.h5", cfg->out_dir);
    char *cfg_text = bam_config_to_string(cfg);
    bam_ckpt_meta meta = {.step = cfg->steps, .tokens_seen = tokens_seen,
                          .loader_position = bam_loader_position(loader), .config_text = cfg_text};
    bam_strlcpy(meta.tokenizer, tok_id, sizeof meta.tokenizer);
    st = bam_ckpt_save(path, m, adam_m, adam_v, &meta);
    free(cfg_text);
    if (st == BAM_OK)
      bam_log("wrote %s (%.1f s total, %lld tokens)\n", path, bam_now() - t_start,
              (long long)tokens_seen);
  }
done:
  if (logs.metrics) fclose(logs.metrics);
  if (logs.evals) fclose(logs.evals);
  bam_free(x);
  bam_free(y);
  bam_free(adam_m);
  bam_free(adam_v);
  bam_model_free(&m);
  bam_loader_free(&loader);
  return st;
}
