/* The C mixture models (BTX, BAM, BAM shared KV) against an independent PyTorch
 * implementation (tests/reference/torch_mixture.py, itself checked by
 * test_torch_mixture_selfcheck.py), in the manner of test_reference.c for the dense model.
 *
 * For each case
 *   btx            BTX: dense MHA attention, FFN top-2 renormalised, per-sequence L_lb
 *   bam            BAM, KV experts, soft attention routing, FFN top-1, not renormalised;
 *                  seq_len > T and max_batch > B
 *   bam_shared_kv  BAM, one shared K/V, GQA (Hkv = 2), tied embeddings, batch-level L_lb
 *   bam_top2       BAM, attention top-2 (of 3), FFN top-2 (not renormalised), capacity
 *                  factor 1.0 dropping assignments in every layer
 *   btx_capacity   BTX, GQA (Hkv = 2), FFN top-2 renormalised before dropping, capacity
 *                  factor 1.25 (c T k / Ef = 7.5: ceil 8, where floor would give 7 and the
 *                  model's seq_len 16 would give 10), batch-level L_lb; seq_len > T
 * (L=2, d=32, H=4, f=24, V=61, Ea=3, Ef=4, B=3, T=12; alpha, beta differ per case) this runs
 *     $BAM_PYTHON $BAM_SOURCE_DIR/tests/reference/make_mixture_reference.py --out F --case C
 * which writes parameters, a batch, PyTorch's logits, logit gradient, total / token /
 * auxiliary loss, per-token losses, routing statistics, every parameter gradient and ten
 * AdamW steps (losses, auxiliary losses, gradient norms, final parameters). The C mixture is
 * built with the same shape, loaded with the same parameters (by the tensor table, whose
 * names, order, shapes and decay flags must match mixture.h) and compared.
 *
 * Routing. Top-k choices are discrete: the comparison is only meaningful if float32 C and
 * float64 torch route identically. The script refuses to write a reference unless, in all
 * eleven forwards (the first and the ten training steps), every top-k set is decided by a
 * router-logit gap > 1e-3 (the cases' seeds give >= 1.1e-2; float32 rounding of the router
 * logits is ~1e-6). The shares of assignments per expert (exact counts) are compared too, so
 * a routing difference shows as such.
 *
 * Tolerances (as test_reference.c: the reference is float64 from float32-exact parameters,
 * so every difference is the C model's own float32 rounding. PyTorch's own float32 run of
 * these cases differs from the float64 one by <= 8.2e-7 of a tensor's largest entry on every
 * gradient (relative norm error <= 8.3e-7), <= 1.2e-6 abs on the logits (|logits| ~ 2),
 * <= 6e-8 relative on the auxiliary loss and <= 6e-7 on the ten training losses; the
 * bounds leave ~100x headroom for a different but sound float32 order of operations):
 *   logits, dlogits        |c - t| <= 1e-5 (1e-6 for dlogits) + 1e-4 |t|   per element
 *   loss, token, aux loss  |c - t| <= 1e-5 |t|;  per-token losses 1e-5 + 1e-5 |t|
 *   each gradient          max |c - t| <= 1e-4 max|t|  and  ||c - t|| / ||t|| <= 1e-4
 *   10 AdamW steps         losses, auxiliary losses, pre-clip gradient norms |c-t| <= 1e-4|t|
 *   params after 10 steps  ||c - t|| / ||t|| <= 1e-3 (Adam's m/sqrt(v) amplifies the rounding
 *                          of near-zero gradients)
 *   routing statistics     ffn_share exact (1e-12); att_gate 1e-5 abs; entropies 1e-5 rel
 * Every tensor's errors are printed as a table whether or not it passes; a failing expert
 * tensor is broken down per (expert, layer) slice. */
#include <hdf5.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bam/mixture.h"
#include "bam/optim.h"
#include "reference_util.h"
#include "test_util.h"

#define TOL_LOGITS_ABS 1e-5
#define TOL_DLOGITS_ABS 1e-6
#define TOL_LOGITS_REL 1e-4
#define TOL_LOSS_REL 1e-5
#define TOL_GRAD_MAX 1e-4  /* max |c-t| / max |t| */
#define TOL_GRAD_NORM 1e-4 /* ||c-t|| / ||t|| */
#define TOL_TRAIN_REL 1e-4
#define TOL_PARAMS10_NORM 1e-3
#define TOL_SHARE 1e-12
#define TOL_GATE_ABS 1e-5
#define TOL_ENTROPY_REL 1e-5

static cmp_stats compare_d(const double *c, const double *t, size_t n, double atol,
                           double rtol) {
  cmp_stats s = {0, 0, 0, 0};
  double dd = 0, tt = 0;
  for (size_t i = 0; i < n; i++) {
    double d = fabs(c[i] - t[i]);
    if (!(d <= s.max_abs)) s.max_abs = d;
    if (fabs(t[i]) > s.max_ref) s.max_ref = fabs(t[i]);
    double lim = atol + rtol * fabs(t[i]);
    if (lim > 0 && !(d / lim <= s.max_scaled)) s.max_scaled = d / lim;
    dd += d * d;
    tt += t[i] * t[i];
  }
  s.rel_norm = tt > 0 ? sqrt(dd / tt) : sqrt(dd);
  return s;
}

/* ---- HDF5 helpers: each returns 0 on success and prints what went wrong otherwise ---- */

/* A variable- or fixed-length string attribute into buf (n bytes). */
static int h5_attr_str(hid_t f, const char *name, char *buf, size_t n) {
  buf[0] = 0;
  if (H5Aexists(f, name) <= 0) {
    fprintf(stderr, "reference file has no attribute '%s'\n", name);
    return -1;
  }
  hid_t a = H5Aopen(f, name, H5P_DEFAULT);
  hid_t ft = H5Aget_type(a);
  int rc = -1;
  if (H5Tis_variable_str(ft) > 0) {
    hid_t mt = H5Tcopy(H5T_C_S1);
    H5Tset_size(mt, H5T_VARIABLE);
    H5Tset_cset(mt, H5Tget_cset(ft));
    char *s = NULL;
    if (H5Aread(a, mt, &s) >= 0 && s) {
      snprintf(buf, n, "%s", s);
      H5free_memory(s);
      rc = 0;
    }
    H5Tclose(mt);
  } else {
    size_t sz = H5Tget_size(ft);
    char *s = calloc(sz + 1, 1);
    hid_t mt = H5Tcopy(H5T_C_S1);
    H5Tset_size(mt, sz + 1);
    if (s && H5Aread(a, mt, s) >= 0) {
      snprintf(buf, n, "%s", s);
      rc = 0;
    }
    H5Tclose(mt);
    free(s);
  }
  H5Tclose(ft);
  H5Aclose(a);
  if (rc) fprintf(stderr, "cannot read string attribute '%s'\n", name);
  return rc;
}

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
    fprintf(stderr, "dataset '%s': rank %d, %lld elements (", name, rank, (long long)npts);
    for (int i = 0; i < rank && i < 8; i++)
      fprintf(stderr, "%s%llu", i ? "," : "", (unsigned long long)dims[i]);
    fprintf(stderr, "); expected rank %d, %zu elements", ndim, n);
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

static void print_header(const char *first) {
  printf("\n  %-18s %-12s %10s %10s %10s %10s\n", first, "shape", "max|ref|", "max|err|",
         "err/max", "rel-norm");
}

static void print_row(const char *what, const char *shape, cmp_stats s, int ok) {
  printf("  %-18s %-12s %10.3e %10.3e %10.3e %10.3e  %s\n", what, shape, s.max_ref, s.max_abs,
         s.max_ref > 0 ? s.max_abs / s.max_ref : s.max_abs, s.rel_norm, ok ? "ok" : "FAIL");
}

static int no_decay(const char *name) {
  return !strcmp(name, "ln") || !strcmp(name, "ln_f") || !strcmp(name, "att_router") ||
         !strcmp(name, "ffn_router");
}

/* For diagnosis: errors of each [i, j] slice of a tensor of rank >= 3 (expert-major expert
 * tensors: [expert, layer]; routers: [layer, expert]; dense attention: [layer, row]). */
static void breakdown(const char *name, const bam_tensor_info *ti, const float *c,
                      const double *t) {
  if (ti->ndim < 3) return;
  int64_t n0 = ti->shape[0], n1 = ti->shape[1];
  size_t per = ti->numel / (size_t)(n0 * n1);
  printf("    breakdown of %s by [%s]:\n", name,
         !strcmp(name, "att_router") || !strcmp(name, "ffn_router") ? "layer, expert"
                                                                      : "dim0, dim1");
  for (int64_t i = 0; i < n0; i++)
    for (int64_t j = 0; j < n1; j++) {
      size_t o = (size_t)(i * n1 + j) * per;
      cmp_stats s = compare(c + o, t + o, per, 0, 0);
      printf("      [%lld,%lld] max|ref| %.3e max|err| %.3e rel-norm %.3e\n", (long long)i,
             (long long)j, s.max_ref, s.max_abs, s.rel_norm);
    }
}

static void run_case(const char *python, const char *srcdir, const char *cname) {
  printf("\n=== case %s ===\n", cname);
  char path[] = "bam_mixture_reference_XXXXXX";
  int fd = mkstemp(path);
  T_CHECK(fd >= 0, "cannot create a temporary file in the working directory");
  if (fd < 0) return;
  close(fd);
  char cmd[4096];
  snprintf(cmd, sizeof cmd,
           "'%s' '%s/tests/reference/make_mixture_reference.py' --out '%s' --case %s", python,
           srcdir, path, cname);
  printf("%s\n", cmd);
  fflush(stdout);
  int rc = system(cmd);
  rc = rc == -1 ? -1 : (WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + WTERMSIG(rc));
  T_CHECK(rc == 0, "make_mixture_reference.py failed (exit status %d) for case %s", rc, cname);
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

  bam_mixture_shape shape;
  memset(&shape, 0, sizeof shape);
  bam_model_shape *bs = &shape.base;
  int B = 0, T = 0, max_batch = 0, steps = 0, method = -1, n_tensors_ref = 0, capacity = 0;
  double rope_base = 0, norm_eps = 0, lr = 0, b1 = 0, b2 = 0, eps = 0, wd = 0, clip = 0;
  double lb_coef = 0, z_coef = 0, cap_factor = 0, min_margin = 0;
  char method_name[64], names_ref[1024];
  int bad = 0;
  bad |= h5_attr(f, "n_layers", H5T_NATIVE_INT, &bs->n_layers);
  bad |= h5_attr(f, "d_model", H5T_NATIVE_INT, &bs->d_model);
  bad |= h5_attr(f, "n_heads", H5T_NATIVE_INT, &bs->n_heads);
  bad |= h5_attr(f, "n_kv_heads", H5T_NATIVE_INT, &bs->n_kv_heads);
  bad |= h5_attr(f, "d_ff", H5T_NATIVE_INT, &bs->d_ff);
  bad |= h5_attr(f, "vocab_size", H5T_NATIVE_INT, &bs->vocab_size);
  bad |= h5_attr(f, "seq_len", H5T_NATIVE_INT, &bs->seq_len);
  bad |= h5_attr(f, "tie_embeddings", H5T_NATIVE_INT, &bs->tie_embeddings);
  bad |= h5_attr(f, "rope_base", H5T_NATIVE_DOUBLE, &rope_base);
  bad |= h5_attr(f, "norm_eps", H5T_NATIVE_DOUBLE, &norm_eps);
  bad |= h5_attr(f, "method", H5T_NATIVE_INT, &method);
  bad |= h5_attr_str(f, "method_name", method_name, sizeof method_name);
  bad |= h5_attr(f, "n_att_experts", H5T_NATIVE_INT, &shape.n_att_experts);
  bad |= h5_attr(f, "n_ffn_experts", H5T_NATIVE_INT, &shape.n_ffn_experts);
  bad |= h5_attr(f, "ffn_top_k", H5T_NATIVE_INT, &shape.ffn_top_k);
  bad |= h5_attr(f, "ffn_renormalize", H5T_NATIVE_INT, &shape.ffn_renormalize);
  bad |= h5_attr(f, "att_top_k", H5T_NATIVE_INT, &shape.att_top_k);
  bad |= h5_attr(f, "lb_per_sequence", H5T_NATIVE_INT, &shape.lb_per_sequence);
  bad |= h5_attr(f, "lb_coef", H5T_NATIVE_DOUBLE, &lb_coef);
  bad |= h5_attr(f, "z_coef", H5T_NATIVE_DOUBLE, &z_coef);
  bad |= h5_attr(f, "capacity_factor", H5T_NATIVE_DOUBLE, &cap_factor);
  bad |= h5_attr(f, "capacity", H5T_NATIVE_INT, &capacity);
  bad |= h5_attr(f, "min_margin", H5T_NATIVE_DOUBLE, &min_margin);
  bad |= h5_attr(f, "n_tensors", H5T_NATIVE_INT, &n_tensors_ref);
  bad |= h5_attr_str(f, "tensor_names", names_ref, sizeof names_ref);
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
  bs->rope_base = (float)rope_base;
  bs->norm_eps = (float)norm_eps;
  shape.method = (bam_method)method;
  shape.lb_coef = (float)lb_coef;
  shape.z_coef = (float)z_coef;
  shape.capacity_factor = (float)cap_factor;
  {
    bam_method parsed = (bam_method)-1;
    T_OK(bam_method_parse(method_name, &parsed));
    T_CHECK(parsed == shape.method && !strcmp(bam_method_name(shape.method), method_name),
            "method '%s': parsed %d, enum %d named '%s'", method_name, (int)parsed, method,
            bam_method_name(shape.method));
  }
  const int L = bs->n_layers, Ea = shape.n_att_experts, Ef = shape.n_ffn_experts;
  const int is_bam = shape.method != BAM_METHOD_BTX;
  printf("shape: %s L=%d d=%d H=%d Hkv=%d f=%d V=%d seq_len=%d tied=%d; Ea=%d Ef=%d k=%d "
         "renorm=%d att_top_k=%d alpha=%g beta=%g lb_per_sequence=%d capacity_factor=%g "
         "(capacity %d per expert per sequence); batch B=%d T=%d (max_batch %d); min routing "
         "margin over the 11 forwards %.3g\n",
         method_name, L, bs->d_model, bs->n_heads, bs->n_kv_heads, bs->d_ff, bs->vocab_size,
         bs->seq_len, bs->tie_embeddings, Ea, Ef, shape.ffn_top_k, shape.ffn_renormalize,
         shape.att_top_k, lb_coef, z_coef, shape.lb_per_sequence, cap_factor, capacity, B, T,
         max_batch, min_margin);
  T_OK(bam_mixture_shape_check(&shape));

  bam_mixture *m = NULL;
  T_OK(bam_mixture_create(&m, &shape, max_batch));
  if (!m) goto close_file;

  const size_t BT = (size_t)B * T, V = (size_t)bs->vocab_size, NP = m->n_params;
  int32_t *tokens = calloc(BT, sizeof *tokens), *targets = calloc(BT, sizeof *targets);
  double *r_logits = dalloc(BT * V), *r_dlogits = dalloc(BT * V), *r_tok = dalloc(BT);
  double *r_grads = dalloc(NP), *r_params10 = dalloc(NP);
  double *r_losses = dalloc((size_t)steps), *r_aux10 = dalloc((size_t)steps);
  double *r_norms = dalloc((size_t)steps);
  double r_loss = 0, r_token_loss = 0, r_aux = 0;
  double *r_share = dalloc((size_t)L * Ef), *r_share_kept = dalloc((size_t)L * Ef);
  double *r_ffn_ent = dalloc((size_t)L), *r_att_gate = dalloc((size_t)L * (Ea > 0 ? Ea : 1));
  double *r_att_ent = dalloc((size_t)L), *r_dropped = dalloc((size_t)L);
  double *c_share = dalloc((size_t)L * Ef), *c_ffn_ent = dalloc((size_t)L);
  double *c_att_gate = dalloc((size_t)L * (Ea > 0 ? Ea : 1)), *c_att_ent = dalloc((size_t)L);
  float *grads1 = calloc(NP ? NP : 1, sizeof(float));
  float *params0 = calloc(NP ? NP : 1, sizeof(float));
  float *adam_m = calloc(NP ? NP : 1, sizeof(float));
  float *adam_v = calloc(NP ? NP : 1, sizeof(float));
  T_CHECK(tokens && targets && r_logits && r_dlogits && r_tok && r_grads && r_params10 &&
              r_losses && r_aux10 && r_norms && r_share && r_share_kept && r_ffn_ent &&
              r_att_gate && r_att_ent && r_dropped && c_share && c_ffn_ent && c_att_gate &&
              c_att_ent && grads1 && params0 && adam_m && adam_v,
          "out of memory");

  /* ---- the tensor table: names in mixture.h's order, shapes, decay flags ---- */
  {
    char names_c[1024];
    int k = 0;
    names_c[0] = 0;
    for (int i = 0; i < m->n_tensors && k >= 0 && (size_t)k < sizeof names_c; i++)
      k += snprintf(names_c + k, sizeof names_c - (size_t)k, "%s%s", i ? "," : "",
                    m->tensors[i].name);
    printf("tensor table: %s\n", names_c);
    T_CHECK(m->n_tensors == n_tensors_ref && !strcmp(names_c, names_ref),
            "C tensor table (%d tensors) %s; mixture.h order (torch) has %d: %s", m->n_tensors,
            names_c, n_tensors_ref, names_ref);
    size_t total = 0;
    bam_tensor_info tab[BAM_MAX_TENSORS];
    int nt = bam_mixture_tensors(&shape, tab, &total);
    T_CHECK(nt == m->n_tensors && total == NP,
            "bam_mixture_tensors gives %d tensors, %zu floats; the model has %d, %zu", nt, total,
            m->n_tensors, NP);
  }
  for (int i = 0; i < m->n_tensors; i++) {
    const bam_tensor_info *ti = &m->tensors[i];
    char name[128];
    T_CHECK(ti->decay == !no_decay(ti->name), "tensor %s: decay flag %d, expected %d",
            ti->name, ti->decay, !no_decay(ti->name));
    T_CHECK(ti->offset + ti->numel <= NP, "tensor %s overruns the buffer", ti->name);
    const bam_tensor_info *found = NULL;
    float *ptr = bam_mixture_tensor(m, ti->name, &found);
    T_CHECK(ptr == m->params_mem + ti->offset && found == ti,
            "bam_mixture_tensor(\"%s\") does not return the table's tensor", ti->name);
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
  if (bs->tie_embeddings)
    T_CHECK(bam_mixture_tensor(m, "w_head", NULL) == NULL,
            "tied model: bam_mixture_tensor(\"w_head\") should be NULL");
  {
    int64_t bt[2] = {B, T}, btv[3] = {B, T, (int64_t)V}, ns[1] = {steps};
    int64_t lef[2] = {L, Ef}, lea[2] = {L, Ea}, l1[1] = {L};
    bad |= h5_read(f, "tokens", H5T_NATIVE_INT32, tokens, BT, 2, bt);
    bad |= h5_read(f, "targets", H5T_NATIVE_INT32, targets, BT, 2, bt);
    bad |= h5_read(f, "logits", H5T_NATIVE_DOUBLE, r_logits, BT * V, 3, btv);
    bad |= h5_read(f, "dlogits", H5T_NATIVE_DOUBLE, r_dlogits, BT * V, 3, btv);
    bad |= h5_read(f, "token_losses", H5T_NATIVE_DOUBLE, r_tok, BT, 0, NULL);
    bad |= h5_read(f, "loss", H5T_NATIVE_DOUBLE, &r_loss, 1, 0, NULL);
    bad |= h5_read(f, "token_loss", H5T_NATIVE_DOUBLE, &r_token_loss, 1, 0, NULL);
    bad |= h5_read(f, "aux_loss", H5T_NATIVE_DOUBLE, &r_aux, 1, 0, NULL);
    bad |= h5_read(f, "losses_10", H5T_NATIVE_DOUBLE, r_losses, (size_t)steps, 1, ns);
    bad |= h5_read(f, "aux_losses_10", H5T_NATIVE_DOUBLE, r_aux10, (size_t)steps, 1, ns);
    bad |= h5_read(f, "grad_norms_10", H5T_NATIVE_DOUBLE, r_norms, (size_t)steps, 1, ns);
    bad |= h5_read(f, "ffn_share", H5T_NATIVE_DOUBLE, r_share, (size_t)L * Ef, 2, lef);
    bad |= h5_read(f, "ffn_share_kept", H5T_NATIVE_DOUBLE, r_share_kept, (size_t)L * Ef, 2, lef);
    bad |= h5_read(f, "ffn_entropy", H5T_NATIVE_DOUBLE, r_ffn_ent, (size_t)L, 1, l1);
    bad |= h5_read(f, "n_dropped", H5T_NATIVE_DOUBLE, r_dropped, (size_t)L, 1, l1);
    if (is_bam) {
      bad |= h5_read(f, "att_gate", H5T_NATIVE_DOUBLE, r_att_gate, (size_t)L * Ea, 2, lea);
      bad |= h5_read(f, "att_entropy", H5T_NATIVE_DOUBLE, r_att_ent, (size_t)L, 1, l1);
    }
  }
  T_CHECK(!bad, "reading the reference file failed (see above)");
  if (bad) goto free_all;
  memcpy(params0, m->params_mem, NP * sizeof(float));
  printf("dropped assignments per layer (torch):");
  for (int l = 0; l < L; l++) printf(" %g", r_dropped[l]);
  printf("\n");

  /* ---- forward: logits, losses, per-token losses, routing statistics ---- */
  float loss = NAN;
  bam_mixture_zero_grad(m);
  T_OK(bam_mixture_forward(m, tokens, targets, B, T, &loss));
  uint64_t hash1 = bam_mixture_route_hash(m);
  print_header("quantity");
  {
    char sh[32];
    snprintf(sh, sizeof sh, "%dx%dx%d", B, T, (int)V);
    cmp_stats s = compare(bam_mixture_logits(m), r_logits, BT * V, TOL_LOGITS_ABS,
                          TOL_LOGITS_REL);
    print_row("logits", sh, s, s.max_scaled <= 1.0);
    T_CHECK(s.max_scaled <= 1.0, "case %s logits: max |err| %.3g (%.3g of the bound)", cname,
            s.max_abs, s.max_scaled);
    struct {
      const char *what;
      float c;
      double t;
    } ls[3] = {{"loss (total)", loss, r_loss},
               {"token loss", m->last_loss, r_token_loss},
               {"aux loss", m->last_aux_loss, r_aux}};
    for (int i = 0; i < 3; i++) {
      cmp_stats sl = compare(&ls[i].c, &ls[i].t, 1, 0.0, TOL_LOSS_REL);
      print_row(ls[i].what, "1", sl, sl.max_scaled <= 1.0);
      T_CHECK(sl.max_scaled <= 1.0, "case %s %s: C %.9g, torch %.9g (rel err %.3g)", cname,
              ls[i].what, (double)ls[i].c, ls[i].t, fabs(ls[i].c - ls[i].t) / fabs(ls[i].t));
    }
    snprintf(sh, sizeof sh, "%d", (int)BT);
    const float *tl = bam_mixture_token_losses(m);
    T_CHECK(tl != NULL, "bam_mixture_token_losses returned NULL");
    if (tl) {
      /* Ignored positions: the reference holds 0; the C value there is unspecified. */
      float *tlc = malloc(BT * sizeof *tlc);
      for (size_t i = 0; i < BT; i++) tlc[i] = targets[i] < 0 ? 0.0f : tl[i];
      cmp_stats st = compare(tlc, r_tok, BT, 1e-5, 1e-5);
      print_row("token_losses", sh, st, st.max_scaled <= 1.0);
      T_CHECK(st.max_scaled <= 1.0, "case %s token losses: max |err| %.3g", cname, st.max_abs);
      free(tlc);
    }

    /* Routing statistics: the share of top-k assignments is an exact count, so any
     * difference is a different routing decision, not rounding. */
    bam_route_stats rs = {c_share, is_bam ? c_att_gate : NULL, c_ffn_ent,
                          is_bam ? c_att_ent : NULL, 0};
    bam_mixture_route_stats(m, &rs);
    snprintf(sh, sizeof sh, "%dx%d", L, Ef);
    cmp_stats ss = compare_d(c_share, r_share, (size_t)L * Ef, TOL_SHARE, 0);
    print_row("ffn_share", sh, ss, ss.max_scaled <= 1.0);
    T_CHECK(ss.max_scaled <= 1.0, "case %s: the share of FFN top-k assignments differs (max "
            "%.3g): the C routing chooses other experts than torch", cname, ss.max_abs);
    if (!(ss.max_scaled <= 1.0)) {
      cmp_stats sk = compare_d(c_share, r_share_kept, (size_t)L * Ef, TOL_SHARE, 0);
      if (sk.max_scaled <= 1.0)
        printf("  (ffn_share equals the share of KEPT assignments: the C statistic counts "
               "after capacity, mixture.h says before)\n");
    }
    snprintf(sh, sizeof sh, "%d", L);
    cmp_stats se = compare_d(c_ffn_ent, r_ffn_ent, (size_t)L, 0, TOL_ENTROPY_REL);
    print_row("ffn_entropy", sh, se, se.max_scaled <= 1.0);
    T_CHECK(se.max_scaled <= 1.0, "case %s ffn_entropy: max |err| %.3g", cname, se.max_abs);
    if (is_bam) {
      snprintf(sh, sizeof sh, "%dx%d", L, Ea);
      cmp_stats sg = compare_d(c_att_gate, r_att_gate, (size_t)L * Ea, TOL_GATE_ABS, 0);
      print_row("att_gate", sh, sg, sg.max_scaled <= 1.0);
      T_CHECK(sg.max_scaled <= 1.0, "case %s att_gate: max |err| %.3g", cname, sg.max_abs);
      snprintf(sh, sizeof sh, "%d", L);
      cmp_stats sa = compare_d(c_att_ent, r_att_ent, (size_t)L, 0, TOL_ENTROPY_REL);
      print_row("att_entropy", sh, sa, sa.max_scaled <= 1.0);
      T_CHECK(sa.max_scaled <= 1.0, "case %s att_entropy: max |err| %.3g", cname, sa.max_abs);
    }
  }

  /* ---- backward: logit gradient and every parameter gradient ---- */
  T_OK(bam_mixture_backward(m, 1.0f));
  {
    char sh[32];
    snprintf(sh, sizeof sh, "%dx%dx%d", B, T, (int)V);
    cmp_stats s = compare(bam_mixture_logits(m), r_dlogits, BT * V, TOL_DLOGITS_ABS,
                          TOL_LOGITS_REL);
    print_row("dlogits", sh, s, s.max_scaled <= 1.0);
    T_CHECK(s.max_scaled <= 1.0, "case %s logit gradient: max |err| %.3g", cname, s.max_abs);
  }
  memcpy(grads1, m->grads_mem, NP * sizeof(float));
  double worst_grad = 0, worst_norm = 0;
  print_header("gradient");
  for (int i = 0; i < m->n_tensors; i++) {
    const bam_tensor_info *ti = &m->tensors[i];
    char sh[32];
    shape_str(sh, sizeof sh, ti);
    cmp_stats s = compare(m->grads_mem + ti->offset, r_grads + ti->offset, ti->numel, 0, 0);
    double scaled = s.max_ref > 0 ? s.max_abs / s.max_ref : s.max_abs;
    int ok = scaled <= TOL_GRAD_MAX && s.rel_norm <= TOL_GRAD_NORM;
    print_row(ti->name, sh, s, ok);
    T_CHECK(ok, "case %s gradient of %s: max|err| %.3g = %.3g of max|ref| %.3g, rel-norm %.3g",
            cname, ti->name, s.max_abs, scaled, s.max_ref, s.rel_norm);
    if (!ok) breakdown(ti->name, ti, m->grads_mem + ti->offset, r_grads + ti->offset);
    if (!(scaled <= worst_grad)) worst_grad = scaled;
    if (!(s.rel_norm <= worst_norm)) worst_norm = s.rel_norm;
  }
  printf("  worst gradient error: %.3e of the tensor's largest entry (bound %.0e), rel-norm "
         "%.3e (bound %.0e)\n",
         worst_grad, TOL_GRAD_MAX, worst_norm, TOL_GRAD_NORM);

  /* ---- backward accumulates, scaled by grad_scale: 0.25 g + 0.75 g == g ---- */
  {
    bam_mixture_zero_grad(m);
    float l2 = NAN;
    T_OK(bam_mixture_forward(m, tokens, targets, B, T, &l2));
    T_OK(bam_mixture_backward(m, 0.25f));
    T_OK(bam_mixture_forward(m, tokens, targets, B, T, &l2));
    T_OK(bam_mixture_backward(m, 0.75f));
    double dd = 0, gg = 0;
    for (size_t i = 0; i < NP; i++) {
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
    T_CHECK(bam_mixture_route_hash(m) == hash1, "case %s: repeated forward routes differently",
            cname);
  }

  /* ---- ten AdamW steps on the same batch ---- */
  {
    memcpy(m->params_mem, params0, NP * sizeof(float));
    bam_adamw_hparams h = {(float)b1, (float)b2, (float)eps, (float)wd};
    printf("\n  step   loss C        loss torch    rel err    aux C       aux torch   rel err"
           "    |g| C        |g| torch    rel err\n");
    double worst_l = 0, worst_a = 0, worst_n = 0;
    for (int t = 1; t <= steps; t++) {
      float l = NAN;
      bam_mixture_zero_grad(m);
      T_OK(bam_mixture_forward(m, tokens, targets, B, T, &l));
      double aux = m->last_aux_loss;
      T_OK(bam_mixture_backward(m, 1.0f));
      double n = bam_clip_grad(m->grads_mem, NP, clip);
      bam_adamw_step(m->params_mem, m->grads_mem, adam_m, adam_v, m->tensors, m->n_tensors,
                     (float)lr, &h, t);
      double el = fabs(l - r_losses[t - 1]) / fabs(r_losses[t - 1]);
      double ea = fabs(aux - r_aux10[t - 1]) / fabs(r_aux10[t - 1]);
      double en = fabs(n - r_norms[t - 1]) / fabs(r_norms[t - 1]);
      printf("  %4d   %.8f  %.8f  %.3e  %.8f  %.8f  %.3e  %.8f  %.8f  %.3e\n", t, l,
             r_losses[t - 1], el, aux, r_aux10[t - 1], ea, n, r_norms[t - 1], en);
      T_CLOSE(l, r_losses[t - 1], 0.0, TOL_TRAIN_REL, "training loss");
      T_CLOSE(aux, r_aux10[t - 1], 0.0, TOL_TRAIN_REL, "auxiliary loss during training");
      T_CLOSE(n, r_norms[t - 1], 0.0, TOL_TRAIN_REL, "pre-clip gradient norm");
      if (!(el <= worst_l)) worst_l = el;
      if (!(ea <= worst_a)) worst_a = ea;
      if (!(en <= worst_n)) worst_n = en;
    }
    printf("  worst relative error: losses %.3e, aux losses %.3e, gradient norms %.3e "
           "(bound %.0e)\n",
           worst_l, worst_a, worst_n, TOL_TRAIN_REL);
    print_header("after 10 steps");
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
  free(r_aux10);
  free(r_norms);
  free(r_share);
  free(r_share_kept);
  free(r_ffn_ent);
  free(r_att_gate);
  free(r_att_ent);
  free(r_dropped);
  free(c_share);
  free(c_ffn_ent);
  free(c_att_gate);
  free(c_att_ent);
  free(grads1);
  free(params0);
  free(adam_m);
  free(adam_v);
  bam_mixture_free(&m);
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

  const char *cases[] = {"btx", "bam", "bam_shared_kv", "bam_top2", "btx_capacity"};
  int n = (int)(sizeof cases / sizeof *cases);
  for (int i = 1; i < argc; i++) { /* optional: run only the named cases */
    if (i == 1) n = 0;
    run_case(python, srcdir, argv[i]);
  }
  for (int i = 0; i < n; i++) run_case(python, srcdir, cases[i]);
  BAM_TEST_END();
}
