/* The C dense model against an independent PyTorch implementation (llm.c test_gpt2 style).
 *
 * For each case (multi-head untied; grouped-query tied, run with seq_len > T and
 * max_batch > B) this runs
 *     $BAM_PYTHON $BAM_SOURCE_DIR/tests/reference/make_reference.py --out FILE --case NAME
 * which writes parameters, a batch, and PyTorch's logits, loss, per-token losses, logit
 * gradient, every parameter gradient, and ten AdamW steps' losses, gradient norms and final
 * parameters. The C model is built with the same shape, loaded with the same parameters, and
 * compared.
 *
 * Tolerances. The reference is computed in float64 from float32-exact parameters, so every
 * difference measured here is the C model's own float32 rounding (summation order, BLAS
 * blocking, expf/logf): PyTorch's own float32 run differs from the float64 one by <= 7e-7
 * abs on the logits (|logits| ~ 2) and by <= 6e-7 of a tensor's largest entry on every
 * gradient (relative norm error <= 5e-7). The bounds below leave ~100x headroom for a
 * different but sound float32 order of operations, while still catching real mistakes
 * (e.g. eps inside vs outside the square root moves gradients by ~1e-3 relative):
 *   logits, dlogits     |c - t| <= 1e-5 + 1e-4 |t|      per element
 *   loss                |c - t| <= 1e-5 |t|;  per-token losses 1e-5 + 1e-5 |t|
 *   each gradient       max |c - t| <= 1e-4 max|t|  and  ||c - t|| / ||t|| <= 1e-4
 *   10 AdamW losses     |c - t| <= 1e-4 |t|;  pre-clip gradient norms likewise
 *   params after 10     ||c - t|| / ||t|| <= 1e-3 (Adam's m/sqrt(v) amplifies the rounding of
 *                       near-zero gradients: torch float32 vs float64 already differ by 4e-6)
 * Every tensor's errors are printed as a table whether or not it passes. */
#include <hdf5.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bam/model.h"
#include "bam/optim.h"
#include "reference_util.h"
#include "test_util.h"

#define TOL_LOGITS_ABS 1e-5
#define TOL_LOGITS_REL 1e-4
#define TOL_LOSS_REL 1e-5
#define TOL_GRAD_MAX 1e-4   /* max |c-t| / max |t| */
#define TOL_GRAD_NORM 1e-4  /* ||c-t|| / ||t|| */
#define TOL_TRAIN_REL 1e-4
#define TOL_PARAMS10_NORM 1e-3

/* ---- HDF5 helpers: each returns 0 on success and prints what went wrong otherwise ---- */

/* Read dataset `name` (converted to `type`), checking it has exactly `n` elements; when
 * `shape` is given also check its rank and dimensions. */
static int h5_read(hid_t f, const char *name, hid_t type, void *out, size_t n, int ndim,
                   const int64_t *shape) {
  if (H5Lexists(f, name, H5P_DEFAULT) <= 0) {
    fprintf(stderr, "reference file has no dataset '%s'\n", name);
    return -1;
  }
  hid_t d = H5Dopen(f, name, H5P_DEFAULT);
  if (d < 0) return -1;
  hid_t sp = H5Dget_space(d);
  int rank = H5Sget_simple_extent_ndims(sp);
  hsize_t dims[8] = {0};
  if (rank >= 0 && rank <= 8) H5Sget_simple_extent_dims(sp, dims, NULL);
  hssize_t npts = H5Sget_simple_extent_npoints(sp);
  H5Sclose(sp);
  int bad = npts < 0 || (size_t)npts != n;
  if (shape) {
    bad |= rank != ndim;
    for (int i = 0; !bad && i < ndim; i++) bad |= (int64_t)dims[i] != shape[i];
  }
  if (bad) {
    fprintf(stderr, "dataset '%s': rank %d, %lld elements; expected rank %d, %zu elements",
            name, rank, (long long)npts, ndim, n);
    if (shape) {
      fprintf(stderr, " (");
      for (int i = 0; i < ndim; i++) fprintf(stderr, "%s%lld", i ? "," : "", (long long)shape[i]);
      fprintf(stderr, ")");
    }
    fprintf(stderr, "\n");
    H5Dclose(d);
    return -1;
  }
  herr_t e = H5Dread(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out);
  H5Dclose(d);
  if (e < 0) fprintf(stderr, "cannot read dataset '%s'\n", name);
  return e < 0 ? -1 : 0;
}

static void print_row(const char *what, const char *shape, cmp_stats s, int ok) {
  printf("  %-16s %-12s %10.3e %10.3e %10.3e %10.3e  %s\n", what, shape, s.max_ref, s.max_abs,
         s.max_ref > 0 ? s.max_abs / s.max_ref : s.max_abs, s.rel_norm, ok ? "ok" : "FAIL");
}

static void run_case(const char *python, const char *srcdir, const char *cname) {
  printf("\n=== case %s ===\n", cname);
  char path[] = "bam_reference_XXXXXX";
  int fd = mkstemp(path);
  T_CHECK(fd >= 0, "cannot create a temporary file in the working directory");
  if (fd < 0) return;
  close(fd);
  char cmd[4096];
  snprintf(cmd, sizeof cmd,
           "'%s' '%s/tests/reference/make_reference.py' --out '%s' --case %s", python, srcdir,
           path, cname);
  printf("%s\n", cmd);
  fflush(stdout);
  int rc = system(cmd);
  rc = rc == -1 ? -1 : (WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc));
  T_CHECK(rc == 0, "make_reference.py failed (exit status %d) for case %s", rc, cname);
  if (rc != 0) {
    remove(path);
    return;
  }

  hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
  T_CHECK(f >= 0, "cannot open reference file %s", path);
  if (f < 0) {
    remove(path);
    return;
  }

  bam_model_shape shape;
  memset(&shape, 0, sizeof shape);
  int B = 0, T = 0, max_batch = 0, steps = 0;
  double rope_base = 0, norm_eps = 0, lr = 0, b1 = 0, b2 = 0, eps = 0, wd = 0, clip = 0;
  int bad = 0;
  bad |= h5_attr(f, "n_layers", H5T_NATIVE_INT, &shape.n_layers);
  bad |= h5_attr(f, "d_model", H5T_NATIVE_INT, &shape.d_model);
  bad |= h5_attr(f, "n_heads", H5T_NATIVE_INT, &shape.n_heads);
  bad |= h5_attr(f, "n_kv_heads", H5T_NATIVE_INT, &shape.n_kv_heads);
  bad |= h5_attr(f, "d_ff", H5T_NATIVE_INT, &shape.d_ff);
  bad |= h5_attr(f, "vocab_size", H5T_NATIVE_INT, &shape.vocab_size);
  bad |= h5_attr(f, "seq_len", H5T_NATIVE_INT, &shape.seq_len);
  bad |= h5_attr(f, "tie_embeddings", H5T_NATIVE_INT, &shape.tie_embeddings);
  bad |= h5_attr(f, "rope_base", H5T_NATIVE_DOUBLE, &rope_base);
  bad |= h5_attr(f, "norm_eps", H5T_NATIVE_DOUBLE, &norm_eps);
  bad |= h5_attr(f, "B", H5T_NATIVE_INT, &B);
  bad |= h5_attr(f, "T", H5T_NATIVE_INT, &T);
  bad |= h5_attr(f, "max_batch", H5T_NATIVE_INT, &max_batch);
  bad |= h5_attr(f, "steps", H5T_NATIVE_INT, &steps);
  bad |= h5_attr(f, "lr", H5T_NATIVE_DOUBLE, &lr);
  bad |= h5_attr(f, "beta1", H5T_NATIVE_DOUBLE, &b1);
  bad |= h5_attr(f, "beta2", H5T_NATIVE_DOUBLE, &b2);
  bad |= h5_attr(f, "eps", H5T_NATIVE_DOUBLE, &eps);
  bad |= h5_attr(f, "weight_decay", H5T_NATIVE_DOUBLE, &wd);
  bad |= h5_attr(f, "clip_norm", H5T_NATIVE_DOUBLE, &clip);
  T_CHECK(!bad, "reference file %s lacks attributes", path);
  if (bad) goto close_file;
  shape.rope_base = (float)rope_base;
  shape.norm_eps = (float)norm_eps;
  printf("shape: L=%d d=%d H=%d Hkv=%d f=%d V=%d seq_len=%d tied=%d; batch B=%d T=%d "
         "(max_batch %d)\n",
         shape.n_layers, shape.d_model, shape.n_heads, shape.n_kv_heads, shape.d_ff,
         shape.vocab_size, shape.seq_len, shape.tie_embeddings, B, T, max_batch);

  bam_model *m = NULL;
  T_OK(bam_model_create(&m, &shape, max_batch));
  if (!m) goto close_file;

  const size_t BT = (size_t)B * T, V = (size_t)shape.vocab_size;
  int32_t *tokens = calloc(BT, sizeof *tokens), *targets = calloc(BT, sizeof *targets);
  double *r_logits = dalloc(BT * V), *r_dlogits = dalloc(BT * V), *r_tok = dalloc(BT);
  double *r_grads = dalloc(m->n_params), *r_params10 = dalloc(m->n_params);
  double *r_losses = dalloc((size_t)steps), *r_norms = dalloc((size_t)steps), r_loss = 0;
  float *grads1 = calloc(m->n_params ? m->n_params : 1, sizeof(float));
  float *params0 = calloc(m->n_params ? m->n_params : 1, sizeof(float));
  float *adam_m = calloc(m->n_params ? m->n_params : 1, sizeof(float));
  float *adam_v = calloc(m->n_params ? m->n_params : 1, sizeof(float));
  T_CHECK(tokens && targets && r_logits && r_dlogits && r_tok && r_grads && r_params10 &&
              r_losses && r_norms && grads1 && params0 && adam_m && adam_v,
          "out of memory");

  /* ---- the tensor table must match the reference's names, shapes and decay flags ---- */
  {
    H5G_info_t gi;
    hid_t g = H5Gopen(f, "params", H5P_DEFAULT);
    int ng = -1;
    if (g >= 0 && H5Gget_info(g, &gi) >= 0) ng = (int)gi.nlinks;
    if (g >= 0) H5Gclose(g);
    T_CHECK(ng == m->n_tensors, "C tensor table has %d tensors, reference has %d", m->n_tensors,
            ng);
  }
  for (int i = 0; i < m->n_tensors; i++) {
    const bam_tensor_info *ti = &m->tensors[i];
    char name[128];
    int is_norm = strcmp(ti->name, "ln") == 0 || strcmp(ti->name, "ln_f") == 0;
    T_CHECK(ti->decay == !is_norm, "tensor %s: decay flag %d, expected %d", ti->name, ti->decay,
            !is_norm);
    T_CHECK(ti->offset + ti->numel <= m->n_params, "tensor %s overruns the buffer", ti->name);
    snprintf(name, sizeof name, "params/%s", ti->name);
    int e = h5_read(f, name, H5T_NATIVE_FLOAT, m->params_mem + ti->offset, ti->numel, ti->ndim,
                    ti->shape);
    snprintf(name, sizeof name, "grads/%s", ti->name);
    e |= h5_read(f, name, H5T_NATIVE_DOUBLE, r_grads + ti->offset, ti->numel, ti->ndim,
                 ti->shape);
    snprintf(name, sizeof name, "params_10/%s", ti->name);
    e |= h5_read(f, name, H5T_NATIVE_DOUBLE, r_params10 + ti->offset, ti->numel, ti->ndim,
                 ti->shape);
    T_CHECK(e == 0, "tensor %s (#%d) of the C table does not match the reference", ti->name, i);
    bad |= e;
  }
  {
    int64_t bt[2] = {B, T}, btv[3] = {B, T, (int64_t)V}, ns[1] = {steps};
    bad |= h5_read(f, "tokens", H5T_NATIVE_INT32, tokens, BT, 2, bt);
    bad |= h5_read(f, "targets", H5T_NATIVE_INT32, targets, BT, 2, bt);
    bad |= h5_read(f, "logits", H5T_NATIVE_DOUBLE, r_logits, BT * V, 3, btv);
    bad |= h5_read(f, "dlogits", H5T_NATIVE_DOUBLE, r_dlogits, BT * V, 3, btv);
    bad |= h5_read(f, "token_losses", H5T_NATIVE_DOUBLE, r_tok, BT, 0, NULL);
    bad |= h5_read(f, "loss", H5T_NATIVE_DOUBLE, &r_loss, 1, 0, NULL);
    bad |= h5_read(f, "losses_10", H5T_NATIVE_DOUBLE, r_losses, (size_t)steps, 1, ns);
    bad |= h5_read(f, "grad_norms_10", H5T_NATIVE_DOUBLE, r_norms, (size_t)steps, 1, ns);
  }
  T_CHECK(!bad, "reading the reference file failed (see above)");
  if (bad) goto free_all;
  memcpy(params0, m->params_mem, m->n_params * sizeof(float));

  /* ---- forward: logits, loss, per-token losses ---- */
  float loss = NAN;
  bam_model_zero_grad(m);
  T_OK(bam_model_forward(m, tokens, targets, B, T, &loss));
  printf("\n  %-16s %-12s %10s %10s %10s %10s\n", "quantity", "shape", "max|ref|", "max|err|",
         "err/max", "rel-norm");
  {
    char sh[32];
    snprintf(sh, sizeof sh, "%dx%dx%d", B, T, (int)V);
    cmp_stats s = compare(bam_model_logits(m), r_logits, BT * V, TOL_LOGITS_ABS, TOL_LOGITS_REL);
    print_row("logits", sh, s, s.max_scaled <= 1.0);
    T_CHECK(s.max_scaled <= 1.0, "case %s logits: max |err| %.3g (%.3g of the bound)", cname,
            s.max_abs, s.max_scaled);
    float lf = loss;
    cmp_stats sl = compare(&lf, &r_loss, 1, 0.0, TOL_LOSS_REL);
    print_row("loss", "1", sl, sl.max_scaled <= 1.0);
    T_CLOSE(loss, r_loss, 0.0, TOL_LOSS_REL, "loss");
    snprintf(sh, sizeof sh, "%d", (int)BT);
    const float *tl = bam_model_token_losses(m);
    T_CHECK(tl != NULL, "bam_model_token_losses returned NULL");
    if (tl) {
      /* Ignored positions: the reference holds 0; the C value there is unspecified. */
      float *tlc = malloc(BT * sizeof *tlc);
      for (size_t i = 0; i < BT; i++) tlc[i] = targets[i] < 0 ? 0.0f : tl[i];
      cmp_stats st = compare(tlc, r_tok, BT, 1e-5, 1e-5);
      print_row("token_losses", sh, st, st.max_scaled <= 1.0);
      T_CHECK(st.max_scaled <= 1.0, "case %s token losses: max |err| %.3g", cname, st.max_abs);
      free(tlc);
    }
  }

  /* ---- backward: logit gradient and every parameter gradient ---- */
  T_OK(bam_model_backward(m, 1.0f));
  {
    char sh[32];
    snprintf(sh, sizeof sh, "%dx%dx%d", B, T, (int)V);
    /* dlogits are ~1/(#targets) in size: scale the absolute bound with them. */
    cmp_stats s = compare(bam_model_logits(m), r_dlogits, BT * V, 1e-6, TOL_LOGITS_REL);
    print_row("dlogits", sh, s, s.max_scaled <= 1.0);
    T_CHECK(s.max_scaled <= 1.0, "case %s logit gradient: max |err| %.3g", cname, s.max_abs);
  }
  memcpy(grads1, m->grads_mem, m->n_params * sizeof(float));
  double worst_grad = 0;
  for (int i = 0; i < m->n_tensors; i++) {
    const bam_tensor_info *ti = &m->tensors[i];
    char sh[32], what[64];
    shape_str(sh, sizeof sh, ti);
    snprintf(what, sizeof what, "grad %s", ti->name);
    cmp_stats s = compare(m->grads_mem + ti->offset, r_grads + ti->offset, ti->numel, 0, 0);
    double scaled = s.max_ref > 0 ? s.max_abs / s.max_ref : s.max_abs;
    int ok = scaled <= TOL_GRAD_MAX && s.rel_norm <= TOL_GRAD_NORM;
    print_row(what, sh, s, ok);
    T_CHECK(ok, "case %s gradient of %s: max|err| %.3g = %.3g of max|ref| %.3g, rel-norm %.3g",
            cname, ti->name, s.max_abs, scaled, s.max_ref, s.rel_norm);
    if (!(scaled <= worst_grad)) worst_grad = scaled;
  }
  printf("  worst gradient error: %.3e of the tensor's largest entry (bound %.0e)\n", worst_grad,
         TOL_GRAD_MAX);

  /* ---- backward accumulates, scaled by grad_scale: 0.25 g + 0.75 g == g ---- */
  {
    bam_model_zero_grad(m);
    float l2 = NAN;
    T_OK(bam_model_forward(m, tokens, targets, B, T, &l2));
    T_OK(bam_model_backward(m, 0.25f));
    T_OK(bam_model_forward(m, tokens, targets, B, T, &l2));
    T_OK(bam_model_backward(m, 0.75f));
    double dd = 0, gg = 0;
    for (size_t i = 0; i < m->n_params; i++) {
      double d = (double)m->grads_mem[i] - grads1[i];
      dd += d * d;
      gg += (double)grads1[i] * grads1[i];
    }
    double rn = gg > 0 ? sqrt(dd / gg) : sqrt(dd);
    printf("  accumulation 0.25 g + 0.75 g vs g: rel-norm %.3e\n", rn);
    T_CHECK(rn <= 1e-6, "case %s: two backwards scaled 0.25 and 0.75 differ from one by %.3g",
            cname, rn);
    T_CHECK(l2 == loss, "case %s: repeated forward gives loss %.9g, first %.9g", cname, l2,
            loss);
  }

  /* ---- ten AdamW steps on the same batch ---- */
  {
    memcpy(m->params_mem, params0, m->n_params * sizeof(float));
    bam_adamw_hparams h = {(float)b1, (float)b2, (float)eps, (float)wd};
    printf("\n  step   loss C        loss torch    rel err     |g| C        |g| torch    rel err\n");
    double worst_l = 0, worst_n = 0;
    for (int t = 1; t <= steps; t++) {
      float l = NAN;
      bam_model_zero_grad(m);
      T_OK(bam_model_forward(m, tokens, targets, B, T, &l));
      T_OK(bam_model_backward(m, 1.0f));
      double n = bam_clip_grad(m->grads_mem, m->n_params, clip);
      bam_adamw_step(m->params_mem, m->grads_mem, adam_m, adam_v, m->tensors, m->n_tensors,
                     (float)lr, &h, t);
      double el = fabs(l - r_losses[t - 1]) / fabs(r_losses[t - 1]);
      double en = fabs(n - r_norms[t - 1]) / fabs(r_norms[t - 1]);
      printf("  %4d   %.8f  %.8f  %.3e   %.8f  %.8f  %.3e\n", t, l, r_losses[t - 1], el, n,
             r_norms[t - 1], en);
      T_CLOSE(l, r_losses[t - 1], 0.0, TOL_TRAIN_REL, "training loss");
      T_CLOSE(n, r_norms[t - 1], 0.0, TOL_TRAIN_REL, "pre-clip gradient norm");
      if (!(el <= worst_l)) worst_l = el;
      if (!(en <= worst_n)) worst_n = en;
    }
    printf("  worst relative error: losses %.3e, gradient norms %.3e (bound %.0e)\n", worst_l,
           worst_n, TOL_TRAIN_REL);
    printf("\n  %-16s %-12s %10s %10s %10s %10s\n", "after 10 steps", "shape", "max|ref|",
           "max|err|", "err/max", "rel-norm");
    for (int i = 0; i < m->n_tensors; i++) {
      const bam_tensor_info *ti = &m->tensors[i];
      char sh[32];
      shape_str(sh, sizeof sh, ti);
      cmp_stats s = compare(m->params_mem + ti->offset, r_params10 + ti->offset, ti->numel, 0, 0);
      int ok = s.rel_norm <= TOL_PARAMS10_NORM;
      print_row(ti->name, sh, s, ok);
      T_CHECK(ok, "case %s parameter %s after %d steps: rel-norm error %.3g", cname, ti->name,
              steps, s.rel_norm);
    }
  }

free_all:
  free(tokens);
  free(targets);
  free(r_logits);
  free(r_dlogits);
  free(r_tok);
  free(r_grads);
  free(r_params10);
  free(r_losses);
  free(r_norms);
  free(grads1);
  free(params0);
  free(adam_m);
  free(adam_v);
  bam_model_free(&m);
close_file:
  H5Fclose(f);
  if (!getenv("BAM_KEEP_REFERENCE")) remove(path);
  else printf("kept reference file %s\n", path);
}

int main(int argc, char **argv) {
  const char *python = getenv("BAM_PYTHON");
  const char *srcdir = getenv("BAM_SOURCE_DIR");
  if (!python || !*python) python = "/usr/bin/python3";
  T_CHECK(srcdir && *srcdir, "BAM_SOURCE_DIR is not set (run through ctest, or set it to the "
                             "source tree)");
  if (!srcdir || !*srcdir) BAM_TEST_END();

  /* Fail clearly, not obscurely, when Python, PyTorch or h5py is missing. */
  char cmd[4096];
  snprintf(cmd, sizeof cmd, "'%s' -c 'import torch, h5py, numpy' > /dev/null 2>&1", python);
  int rc = system(cmd);
  rc = rc == -1 ? -1 : (WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc));
  T_CHECK(rc == 0,
          "'%s' cannot import torch, h5py and numpy (exit status %d): install python3-torch and "
          "python3-h5py (Debian) and point BAM_PYTHON at /usr/bin/python3",
          python, rc);
  if (rc != 0) BAM_TEST_END();

  /* Quiet HDF5's own error stack: our helpers report what is missing. */
  H5Eset_auto(H5E_DEFAULT, NULL, NULL);

  const char *cases[] = {"mha", "gqa_tied"};
  int n = (int)(sizeof cases / sizeof *cases);
  for (int i = 1; i < argc; i++) { /* optional: run only the named cases */
    if (i == 1) n = 0;
    run_case(python, srcdir, argv[i]);
  }
  for (int i = 0; i < n; i++) run_case(python, srcdir, cases[i]);
  BAM_TEST_END();
}
