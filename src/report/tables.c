/* report: results.csv and report.md (tables, figures, and a reading of the numbers generated
 * from them: best model per domain, mixtures against BTX, attention gates against uniform,
 * FFN routing and dead experts). Numbers only, no judgement; the same run gives the same
 * bytes. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static const char *stage_name(rp_kind k) {
  return k == RP_SEED ? "seed" : k == RP_EXPERT ? "branch" : "train";
}

/* ---- results.csv ---- */
bam_status rp_write_results_csv(const rp_run *run, rp_buf *b) {
  rp_puts(b, "model,stage,method,matching,steps,tokens,train_flops");
  for (int pass = 0; pass < 2; pass++) {
    const char *p = pass ? "bpb" : "ppl";
    for (int d = 0; d < run->n_dom; d++) {
      rp_printf(b, ",%s_%s", p, run->dom[d]);
      if (d == run->n_avg - 1) rp_printf(b, ",%s_avg", p);
    }
  }
  rp_puts(b, ",flops_per_token_forward\n");
  for (int i = 0; i < run->n_models; i++) {
    const rp_model *m = &run->m[i];
    if (!m->present) continue;
    rp_printf(b, "%s,%s,%s,%s,%lld,%lld,%.6e", m->name, stage_name(m->kind), m->method, m->matching,
              (long long)m->steps, (long long)m->tokens, m->flops);
    for (int pass = 0; pass < 2; pass++) {
      const double *v = pass ? m->bpb : m->ppl;
      const char *f = pass ? ",%.4f" : ",%.2f";
      for (int d = 0; d < run->n_dom; d++) {
        rp_printf(b, f, v[d]);
        if (d == run->n_avg - 1) rp_printf(b, f, rp_avg(m, v, run->n_avg));
      }
    }
    rp_printf(b, ",%.0f\n", m->fpt);
  }
  return rp_buf_status(b, "results.csv");
}

/* ---- report.md ---- */
static const rp_model *find_model(const rp_run *run, const char *name) {
  for (int i = 0; i < run->n_models; i++)
    if (!strcmp(run->m[i].name, name) && run->m[i].present) return &run->m[i];
  return NULL;
}

/* Column c of the paper's table: a domain (c < n_dom) or Avg (c == n_dom). */
static double ppl_col(const rp_run *run, const rp_model *m, int c) {
  return c < run->n_dom ? m->ppl[c] : rp_avg(m, m->ppl, run->n_avg);
}

static void domain_list(const rp_run *run, rp_buf *b) {
  for (int d = 0; d < run->n_avg; d++)
    rp_printf(b, "%s%s", d ? (d == run->n_avg - 1 ? " and " : ", ") : "", run->dom[d]);
}

static void main_table(const rp_run *run, rp_buf *b) {
  rp_puts(b, "## Perplexity per domain (the paper's table)\n\n");
  rp_puts(b, "Final evaluation of every model (`eval/<model>.txt`");
  if (run->eval_max_tokens > 0)
    rp_printf(b, ", at most %lld tokens per domain", (long long)run->eval_max_tokens);
  rp_puts(b, "); lower is better. **Avg** is the mean perplexity over ");
  domain_list(run, b);
  rp_puts(b, ", as in the paper's table (General, Code, Law = legal, Math)");
  if (run->n_dom > run->n_avg) {
    rp_puts(b, "; ");
    for (int d = run->n_avg; d < run->n_dom; d++)
      rp_printf(b, "%s%s", d > run->n_avg ? ", " : "", run->dom[d]);
    rp_printf(b, " %s held out (no expert was trained on %s)", run->n_dom - run->n_avg > 1 ? "are" : "is",
              run->n_dom - run->n_avg > 1 ? "them" : "it");
  }
  rp_puts(b, ". **bits/B** is the mean bits per byte over the same domains as Avg. DM = "
             "data-matched (BTX's steps and tokens), CM = compute-matched (BTX's training FLOPs). "
             "steps, tokens and train FLOPs are those of the model's own stage (training FLOPs = "
             "3 x forward FLOPs per token x tokens).\n\n");
  rp_puts(b, "| model |");
  for (int d = 0; d < run->n_dom; d++) {
    rp_printf(b, " %s |", run->dom[d]);
    if (d == run->n_avg - 1) rp_puts(b, " Avg |");
  }
  rp_puts(b, " bits/B | steps | tokens | train FLOPs |\n|---|");
  for (int d = 0; d < run->n_dom + 5; d++) rp_puts(b, "---:|");
  rp_puts(b, "\n");
  int n_absent = 0;
  for (int i = 0; i < run->n_models; i++) {
    const rp_model *m = &run->m[i];
    rp_printf(b, "| %s |", m->name);
    if (!m->present) {
      for (int d = 0; d < run->n_dom + 5; d++) rp_puts(b, " - |");
      rp_puts(b, "\n");
      n_absent++;
      continue;
    }
    for (int d = 0; d < run->n_dom; d++) {
      rp_printf(b, " %.2f |", m->ppl[d]);
      if (d == run->n_avg - 1) rp_printf(b, " %.2f |", rp_avg(m, m->ppl, run->n_avg));
    }
    rp_printf(b, " %.4f | %lld | %lld | %.3e |\n", rp_avg(m, m->bpb, run->n_avg), (long long)m->steps,
              (long long)m->tokens, m->flops);
  }
  if (n_absent) {
    rp_puts(b, "\n-: absent from this run (no folder");
    for (int i = 0, k = 0; i < run->n_models; i++)
      if (!run->m[i].present) rp_printf(b, "%s `train-%s`", k++ ? "," : "", run->m[i].name);
    rp_puts(b, ").\n");
  }
  rp_puts(b, "\n");

  /* bits per byte, transposed (a column per model) */
  rp_puts(b, "### Bits per byte per domain\n\n| domain |");
  int np = 0;
  for (int i = 0; i < run->n_models; i++)
    if (run->m[i].present) rp_printf(b, " %s |", run->m[i].name), np++;
  rp_puts(b, "\n|---|");
  for (int i = 0; i < np; i++) rp_puts(b, "---:|");
  rp_puts(b, "\n");
  for (int c = 0; c <= run->n_dom; c++) {
    /* rows: the Avg domains, Avg, then the held-out ones */
    const int d = c < run->n_avg ? c : c == run->n_avg ? -1 : c - 1;
    rp_printf(b, "| %s |", d < 0 ? "Avg" : run->dom[d]);
    for (int i = 0; i < run->n_models; i++) {
      const rp_model *m = &run->m[i];
      if (!m->present) continue;
      rp_printf(b, " %.4f |", d < 0 ? rp_avg(m, m->bpb, run->n_avg) : m->bpb[d]);
    }
    rp_puts(b, "\n");
  }
  rp_puts(b, "\n");
}

static void fmt_opt(rp_buf *b, double v, const char *fmt) {
  if (isnan(v)) rp_puts(b, " - |");
  else rp_printf(b, fmt, v);
}

static void cost_table(const rp_run *run, rp_buf *b) {
  double total = 0, branch = 0, mixtrain = 0;
  int64_t t_branch = 0, s_branch = 0, t_mix = 0, s_mix = 0;
  const rp_model *seed = NULL;
  for (int i = 0; i < run->n_models; i++) {
    const rp_model *m = &run->m[i];
    if (!m->present) continue;
    total += m->flops;
    if (m->kind == RP_SEED) seed = m;
    if (m->kind == RP_EXPERT) branch += m->flops, t_branch += m->tokens, s_branch += m->steps;
    if (m->kind == RP_MIXTURE) mixtrain += m->flops, t_mix += m->tokens, s_mix += m->steps;
  }
  const double seed_flops = seed ? seed->flops : 0;
  rp_puts(b, "## Cost per stage\n\n"
             "Training FLOPs = 3 x forward FLOPs per token (`bam inspect`'s flops_per_token_forward, "
             "from each stage's checkpoint config) x tokens (the checkpoint's tokens seen). "
             "\"With its ancestors\" adds the stages a model is built from: an expert its seed, a "
             "mixture the seed and every expert. tokens/s is the stage's median (summary.json).\n\n"
             "| stage | steps | tokens | forward FLOPs/token | training FLOPs | share of all training "
             "| with its ancestors | tokens/s |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (int i = 0; i < run->n_models; i++) {
    const rp_model *m = &run->m[i];
    if (!m->present) continue;
    double anc = m->kind == RP_SEED ? m->flops : m->kind == RP_EXPERT ? seed_flops + m->flops
                                                                       : seed_flops + branch + m->flops;
    if (m->kind == RP_SEED) rp_puts(b, "| 1. seed (pretrain)");
    else if (m->kind == RP_EXPERT) rp_printf(b, "| 2. branch: expert %s", m->name + strlen("expert-"));
    else rp_printf(b, "| 4. mixture training: %s", m->name);
    rp_printf(b, " | %lld | %lld | %.0f | %.3e | %.1f%% | %.3e |", (long long)m->steps, (long long)m->tokens,
              m->fpt, m->flops, total > 0 ? 100.0 * m->flops / total : 0.0, anc);
    fmt_opt(b, m->tokens_per_s, " %.0f |");
    rp_puts(b, "\n");
    /* after the last expert: the branch stage's total, and the mixing stage */
    const int last_expert = m->kind == RP_EXPERT && (i + 1 == run->n_models || run->m[i + 1].kind != RP_EXPERT);
    if (last_expert) {
      rp_printf(b, "| 2. branch (all experts) | %lld | %lld | - | %.3e | %.1f%% | %.3e | - |\n",
                (long long)s_branch, (long long)t_branch, branch, total > 0 ? 100.0 * branch / total : 0.0,
                seed_flops + branch);
      int any = 0;
      rp_buf methods = {0};
      const char *seen[3] = {0};
      for (int k = 0; k < run->n_models; k++) {
        const rp_model *x = &run->m[k];
        if (!x->present || x->kind != RP_MIXTURE) continue;
        int dup = 0;
        for (int s = 0; s < any; s++) dup |= !strcmp(seen[s], x->method);
        if (dup || any == 3) continue;
        seen[any++] = x->method;
        rp_printf(&methods, "%s%s", any > 1 ? ", " : "", x->method);
      }
      if (any && !methods.failed)
        rp_printf(b, "| 3. mix: %s (built, not trained) | 0 | 0 | - | 0 | 0.0%% | %.3e | - |\n", methods.s,
                  seed_flops + branch);
      rp_buf_free(&methods);
    }
  }
  if (s_mix)
    rp_printf(b, "| 4. mixture training (all runs) | %lld | %lld | - | %.3e | %.1f%% | - | - |\n",
              (long long)s_mix, (long long)t_mix, mixtrain, total > 0 ? 100.0 * mixtrain / total : 0.0);
  rp_printf(b, "| total | %lld | %lld | - | %.3e | 100.0%% | - | - |\n\n",
            (long long)((seed ? seed->steps : 0) + s_branch + s_mix),
            (long long)((seed ? seed->tokens : 0) + t_branch + t_mix), total);
}

static void figures(const rp_figure *figs, rp_buf *b) {
  rp_puts(b, "## Figures\n\nEach figure is drawn by gnuplot from the script and data files of the same "
             "name in this folder (redraw: `gnuplot NAME.gp` here).\n\n");
  static const char *const CAPTION[RP_N_FIGS] = {
      "Training loss (line, `metrics.csv`) against the tokens of each model's own stage, with the "
      "validation losses during the stage (points, `eval.csv`), one colour per domain.",
      "Training loss of every mixture run against tokens (left) and against training FLOPs (right): "
      "DM runs share the tokens axis, CM runs the FLOPs axis.",
      "Share of each domain's FFN assignments per layer (rows) and FFN expert (columns), one panel per "
      "mixture run; expert 0 is the seed's FFN, expert i the FFN of the i-th domain expert.",
      "Mean soft attention gate per domain and layer (rows) and attention expert (columns), one panel "
      "per BAM run; white is the uniform gate 1/Ea, red below it, blue above.",
  };
  for (int i = 0; i < RP_N_FIGS; i++) {
    const rp_figure *f = &figs[i];
    if (!f->wanted) {
      rp_printf(b, "*%s*: nothing to draw in this run (no %s run).\n\n", f->file,
                i == RP_FIG_ATT ? "BAM mixture" : "mixture");
      continue;
    }
    if (f->drawn) rp_printf(b, "![%s](%s)\n\n%s\n\n", f->title, f->file, CAPTION[i]);
    else rp_printf(b, "*%s was not drawn*: %s. Its script %.*s.gp and data files are in this folder.\n\n",
                   f->file, f->problem ? f->problem : "unknown reason", (int)(strlen(f->file) - 4), f->file);
  }
}

/* ---- the reading: facts computed from the tables ---- */
static void best_table(const rp_run *run, rp_buf *b) {
  rp_puts(b, "### Lowest perplexity per domain\n\n"
             "| domain | lowest (all models) | lowest mixture | the domain's expert | seed |\n"
             "|---|---|---|---:|---:|\n");
  const rp_model *seed = find_model(run, "seed");
  for (int c = 0; c <= run->n_dom; c++) {
    const int col = c < run->n_avg ? c : c == run->n_avg ? run->n_dom : c - 1; /* Avg after the avg domains */
    const rp_model *best = NULL, *bestmix = NULL;
    for (int i = 0; i < run->n_models; i++) {
      const rp_model *m = &run->m[i];
      if (!m->present) continue;
      const double v = ppl_col(run, m, col);
      if (!best || v < ppl_col(run, best, col)) best = m;
      if (m->kind == RP_MIXTURE && (!bestmix || v < ppl_col(run, bestmix, col))) bestmix = m;
    }
    rp_printf(b, "| %s |", col == run->n_dom ? "Avg" : run->dom[col]);
    if (best) rp_printf(b, " %s %.2f |", best->name, ppl_col(run, best, col));
    else rp_puts(b, " - |");
    if (bestmix) rp_printf(b, " %s %.2f |", bestmix->name, ppl_col(run, bestmix, col));
    else rp_puts(b, " - |");
    const rp_model *ex = NULL;
    for (int i = 0; col < run->n_avg && col > 0 && i < run->n_models; i++)
      if (run->m[i].present && run->m[i].kind == RP_EXPERT &&
          !strcmp(run->m[i].name + strlen("expert-"), run->dom[col]))
        ex = &run->m[i];
    if (ex) rp_printf(b, " %.2f |", ppl_col(run, ex, col));
    else rp_puts(b, " - |");
    if (seed) rp_printf(b, " %.2f |\n", ppl_col(run, seed, col));
    else rp_puts(b, " - |\n");
  }
  rp_puts(b, "\n");
}

static void against_btx(const rp_run *run, rp_buf *b) {
  const rp_model *btx = find_model(run, "btx-dm");
  int any = 0;
  for (int i = 0; i < run->n_models; i++) any |= run->m[i].present && run->m[i].kind == RP_MIXTURE;
  if (!any) return;
  rp_puts(b, "### Mixtures against BTX (data-matched)\n\n");
  if (!btx) {
    rp_puts(b, "btx-dm is absent from this run.\n\n");
    return;
  }
  const double bavg = rp_avg(btx, btx->ppl, run->n_avg);
  rp_printf(b, "- btx-dm: Avg %.2f", bavg);
  for (int d = run->n_avg; d < run->n_dom; d++) rp_printf(b, ", %s %.2f", run->dom[d], btx->ppl[d]);
  rp_printf(b, ", training FLOPs %.3e.\n", btx->flops);
  for (int i = 0; i < run->n_models; i++) {
    const rp_model *m = &run->m[i];
    if (!m->present || m->kind != RP_MIXTURE || m == btx) continue;
    const double avg = rp_avg(m, m->ppl, run->n_avg);
    rp_printf(b, "- %s: Avg %.2f, %+.2f (%+.1f%%) against btx-dm", m->name, avg, avg - bavg,
              100.0 * (avg - bavg) / bavg);
    for (int d = run->n_avg; d < run->n_dom; d++)
      rp_printf(b, "; %s %.2f, %+.2f (%+.1f%%)", run->dom[d], m->ppl[d], m->ppl[d] - btx->ppl[d],
                100.0 * (m->ppl[d] - btx->ppl[d]) / btx->ppl[d]);
    rp_printf(b, "; with %.2fx its training FLOPs and %.2fx its tokens.\n",
              btx->flops > 0 ? m->flops / btx->flops : 0.0,
              btx->tokens > 0 ? (double)m->tokens / (double)btx->tokens : 0.0);
  }
  rp_puts(b, "\n");
}

static void gates(const rp_run *run, rp_buf *b) {
  int any = 0;
  for (int i = 0; i < run->n_models; i++) any |= run->m[i].present && run->m[i].Ea > 0;
  if (!any) return;
  rp_puts(b, "### Soft attention gates against uniform\n\n"
             "Per layer: the range of the mean gates over every domain and attention expert, and the "
             "largest distance from the uniform gate 1/Ea.\n\n");
  for (int i = 0; i < run->n_models; i++) {
    const rp_model *m = &run->m[i];
    if (!m->present || m->Ea == 0) continue;
    const double u = 1.0 / m->Ea;
    rp_printf(b, "- %s (Ea = %d, uniform %.3f):", m->name, m->Ea, u);
    for (int l = 0; l < m->L; l++) {
      double lo = INFINITY, hi = -INFINITY, far = -1;
      int fd = 0, fe = 0;
      for (int d = 0; d < run->n_dom; d++)
        for (int e = 0; e < m->Ea; e++) {
          const double g = m->att[((size_t)d * m->L + l) * m->Ea + e];
          if (g < lo) lo = g;
          if (g > hi) hi = g;
          if (fabs(g - u) > far) far = fabs(g - u), fd = d, fe = e;
        }
      rp_printf(b, "%s layer %d %.3f-%.3f, largest |gate - %.3f| %.3f (expert %d %s on %s)", l ? ";" : "", l,
                lo, hi, u, far, fe, m->expert_label[fe], run->dom[fd]);
    }
    rp_puts(b, ".\n");
  }
  rp_puts(b, "\n");
}

static void ffn_routing(const rp_run *run, rp_buf *b) {
  int any = 0;
  for (int i = 0; i < run->n_models; i++) any |= run->m[i].present && run->m[i].kind == RP_MIXTURE;
  if (!any) return;
  rp_puts(b, "### FFN routing\n\n"
             "Per mixture run: the FFN expert with the largest share of each domain's assignments "
             "(mean over layers), and the (domain, layer, expert) shares below 1% (dead or nearly "
             "dead experts).\n\n");
  for (int i = 0; i < run->n_models; i++) {
    const rp_model *m = &run->m[i];
    if (!m->present || m->kind != RP_MIXTURE) continue;
    rp_printf(b, "- %s: most used expert per domain:", m->name);
    for (int d = 0; d < run->n_dom; d++) {
      int best = 0;
      double bv = -1;
      for (int e = 0; e < m->Ef; e++) {
        double s = 0;
        for (int l = 0; l < m->L; l++) s += m->ffn[((size_t)d * m->L + l) * m->Ef + e];
        s /= m->L;
        if (s > bv) bv = s, best = e;
      }
      rp_printf(b, "%s %s -> %d %s (%.3f)", d ? "," : "", run->dom[d], best, m->expert_label[best], bv);
    }
    int low = 0, zero = 0;
    const int total = run->n_dom * m->L * m->Ef;
    for (int k = 0; k < total; k++) low += m->ffn[k] < 0.01, zero += m->ffn[k] == 0.0;
    rp_printf(b, ". Shares below 1%%: %d of %d", low, total);
    if (low) {
      rp_printf(b, " (%d exactly 0):", zero);
      int first = 1;
      for (int d = 0; d < run->n_dom; d++)
        for (int l = 0; l < m->L; l++)
          for (int e = 0; e < m->Ef; e++) {
            const double s = m->ffn[((size_t)d * m->L + l) * m->Ef + e];
            if (s >= 0.01) continue;
            rp_printf(b, "%s %s layer %d expert %d %s %.2f%%", first ? "" : ",", run->dom[d], l, e,
                      m->expert_label[e], 100.0 * s);
            first = 0;
          }
    }
    rp_puts(b, ".\n");
  }
  rp_puts(b, "\n");
}

bam_status rp_write_markdown(const rp_run *run, const rp_figure *figs, rp_buf *b) {
  rp_printf(b, "# BTX versus BAM: report of the run `%s`\n\n", run->run_name);
  rp_puts(b, "Rebuilt by `bam report` from the run folder's artifacts alone: the stage folders "
             "(their checkpoints, `metrics.csv`, `eval.csv`, `summary.json`) and `eval/` (each "
             "model's final evaluation and, for mixtures, its routing). `results.csv` holds the "
             "same numbers, one row per model; docs/report.md describes every column and figure.\n\n");
  main_table(run, b);
  cost_table(run, b);
  figures(figs, b);
  rp_puts(b, "## Reading\n\nFacts computed from the numbers above (perplexities as in the table).\n\n");
  best_table(run, b);
  against_btx(run, b);
  gates(run, b);
  ffn_routing(run, b);
  return rp_buf_status(b, "report.md");
}
