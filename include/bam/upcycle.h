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

/* A checkpoint's identity: CRC-32C of its parameter bytes in layout order and their count,
 * as "xxxxxxxx-N". Equal ids mean equal parameters (up to CRC collisions). */
bam_status bam_ckpt_params_id(const char *path, char *out, size_t cap);

/* The value of `key` in lineage text ("key = value" lines); 0 if absent. */
int bam_lineage_get(const char *lineage, const char *key, char *out, size_t cap);

/* The mixture shape a config describes ([model] + [mixture]). */
bam_status bam_mixture_shape_from_config(const bam_config *c, bam_mixture_shape *out);

typedef struct {
  bam_method method;
  int ffn_top_k;          /* 1 */
  int ffn_renormalize;    /* 0 */
  int att_top_k;          /* 0: soft */
  int extra_ffn_experts;  /* 0 */
  int freeze_experts;     /* recorded in the mixture's config */
  uint64_t router_seed;   /* seeds the random routers */
} bam_mix_opts;

/* Build the mixture and write it as a checkpoint (step 0, kind = the method's name) under
 * out_dir/ckpt, with the seed's config plus a [mixture] section and the lineage. Refuses
 * experts of other shapes or tokenizers, experts whose seed_id is not the seed's, and
 * checkpoints that are not dense. Runs on one rank (call it with MPI_COMM_SELF). */
bam_status bam_mix(const char *seed_path, const char *const *expert_paths, int n_experts,
                   const bam_mix_opts *opts, const char *out_dir, MPI_Comm comm);

#endif
