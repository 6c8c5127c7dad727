/* upcycle: branch lineage and mixing (method.md sections 1 and 4).
 *
 * Mixing builds a mixture checkpoint from the seed plus N domain experts (E = N + 1 models,
 * expert 0 = the seed, then the experts in the order given):
 *
 * | tensor                         | BTX                  | BAM (KV experts)  | BAM (shared KV)   |
 * | FFN expert i (gate, up, down)  | copy of model i      | copy of model i   | copy of model i   |
 * | attention Wq, Wo               | average of the E     | expert j = model j| expert j = model j|
 * | attention Wk, Wv               | average              | expert j = model j| one shared = avg  |
 * | norms, embedding, output head  | average              | average           | average           |
 * | FFN router, attention router   | random N(0, 0.02^2)  | random            | random            |
 *
 * Averages are uniform over all E models (accumulated in double, rounded once). Extra FFN
 * experts (the parameter-matched BTX) are further copies of the seed's FFN.
 *
 * Lineage: a domain expert's checkpoint records, as "key = value" lines, kind = expert,
 * domain, seed_id (bam_ckpt_params_id of the seed it branched from), seed_path and
 * tokens; the mixture records its seed and experts the same way. */
#ifndef BAM_UPCYCLE_H
#define BAM_UPCYCLE_H

#include <mpi.h>

#include "bam/config.h"
#include "bam/mixture.h"

/* A checkpoint's identity: CRC-32C of its parameter bytes (float32, little-endian) in layout
 * order and their count, as "xxxxxxxx-N" (at most 30 characters). Equal ids mean equal
 * parameters (up to CRC collisions), whatever the format: a sharded checkpoint and its
 * single-file export have the same id. Reads the parameters in chunks of at most 16 MiB
 * (bam_ckpt_read verifies each shard's CRC-32C on its first read). */
bam_status bam_ckpt_params_id(const char *path, char *out, size_t cap);

/* The value of `key` in lineage text ("key = value" lines): 1 and the value of its first
 * line, spaces around it removed, truncated to cap - 1 bytes; 0 and "" if absent. Blank lines
 * and lines starting with '#' are skipped; lineage may be NULL. */
int bam_lineage_get(const char *lineage, const char *key, char *out, size_t cap);

/* The mixture shape a config describes ([model] + [mixture]). Errors name the config key
 * (mixture.method empty or unknown, n_att_experts < 1 for BAM methods, n_ffn_experts < 1,
 * ffn_top_k or att_top_k out of range, att_top_k != 0 for BTX); n_att_experts is 0 for BTX.
 * Check the result with bam_mixture_shape_check. */
bam_status bam_mixture_shape_from_config(const bam_config *c, bam_mixture_shape *out);

typedef struct {
  bam_method method;
  int ffn_top_k;          /* 1 */
  int ffn_renormalize;    /* 0 */
  int att_top_k;          /* 0: soft */
  int extra_ffn_experts;  /* 0 */
  int freeze_experts;     /* recorded in the mixture's config */
  uint64_t router_seed;   /* seeds the random routers: each router tensor draws N(0, 0.02^2)
                             from bam_rng_seed(router_seed, FNV-1a hash of its name) */
} bam_mix_opts;

/* Build the mixture and write it as a checkpoint (step 0, tokens 0, parameters only, kind =
 * the method's name) under out_dir/ckpt, with the seed's config plus a [mixture] section
 * (method, n_att_experts = E for BAM methods and 0 for BTX, n_ffn_experts = E + extra,
 * ffn_top_k, ffn_renormalize, att_top_k, freeze_experts) and run.out_dir = out_dir, and the
 * lineage:
 *   kind = mixture, method, seed (its resolved path), seed_id, router_seed, and for each
 *   expert i = 1..N: expert.i (path), expert.i.domain (from its lineage), expert.i.id.
 * Refuses checkpoints that are not dense, experts of another layout, [model] config or
 * tokenizer than the seed's, experts whose lineage has no seed_id or another one than the
 * seed's bam_ckpt_params_id, and an out_dir/ckpt that already holds a checkpoint; every
 * message names the file. Memory: the mixture's parameters plus about one dense model.
 * Runs on one rank (call it with MPI_COMM_SELF). */
bam_status bam_upcycle_mix(const char *seed_path, const char *const *expert_paths, int n_experts,
                           const bam_mix_opts *opts, const char *out_dir, MPI_Comm comm);

#endif
