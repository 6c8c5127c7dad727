/* data: tokenized splits in HDF5 and the per-rank window loader with domain mixing.
 *
 * Token file <data_dir>/tokens/<domain>.h5 (written by data/prepare.py), one per domain:
 *   dataset "/train" and "/val": 1-D uint16 token ids, documents separated by EOS;
 *   file attributes:   domain (string), tokenizer (string: vocabulary digest),
 *                      vocab_size (int), eos_id (int);
 *   dataset attributes: text_bytes (int64, UTF-8 bytes of the text it encodes),
 *                      n_docs (int64).
 * Windows are T+1 consecutive tokens: inputs are the first T, targets the last T. */
#ifndef BAM_DATA_H
#define BAM_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "bam/core.h"

#define BAM_MAX_DOMAINS 8
#define BAM_NAME_MAX 64

typedef struct {
  char domain[BAM_NAME_MAX];
  char tokenizer[BAM_NAME_MAX];
  int vocab_size;
  int eos_id;
  int64_t n_tokens;
  int64_t text_bytes;
  int64_t n_docs;
  int32_t *tokens; /* n_tokens ids */
} bam_split;

/* Load one split ("train" or "val") of a domain. Fails with a message naming the file when
 * it is missing, malformed, its 'domain' attribute differs from domain, its vocab_size
 * differs from expect_vocab (if > 0), or a token is outside [0, vocab_size). */
bam_status bam_split_load(bam_split *out, const char *data_dir, const char *domain,
                          const char *split, int expect_vocab);
void bam_split_free(bam_split *s);

/* Parse "general:0.9,code:0.1" (weights are normalised; an item without ":weight", as in
 * "code", has weight 1). Blanks around names and weights are ignored. Errors name the spec:
 * empty or repeated names, names with characters other than letters, digits, '_', '-', '.',
 * weights that are not finite positive numbers, more than BAM_MAX_DOMAINS items. */
typedef struct {
  int n;
  char name[BAM_MAX_DOMAINS][BAM_NAME_MAX];
  double weight[BAM_MAX_DOMAINS];
} bam_mix;
bam_status bam_mix_parse(bam_mix *out, const char *spec);

/* The training loader. A global batch is B = global_batch windows; sample j of the run
 * (j = batch*B + i) is drawn from the domain whose cumulative-weight interval holds
 * u = (bam_hash64(seed ^ bam_hash64(j)) >> 11) * 2^-53, and is that domain's k-th sample,
 * k counting the earlier samples it served. A domain has n_slots = (n_tokens - T) / T
 * non-overlapping T-token slots (room left for the largest offset, so the count is the same
 * every epoch); its sample k is in epoch e = k / n_slots and takes slot perm_e[k % n_slots],
 * window start off_e + slot*T, where the Fisher-Yates permutation perm_e and the offset
 * off_e in [0, T) are drawn from bam_rng seeded by (seed, domain index, e). So windows never
 * repeat within a domain's epoch. Rank r of P gets samples [r*B/P, (r+1)*B/P) of every global
 * batch (B must be divisible by P), so ranks' windows are disjoint and the union is
 * independent of P. The whole state is the batch counter, so resuming is exact. All domains
 * must share one tokenizer, and a split needs at least 2T tokens. */
typedef struct bam_loader bam_loader;

bam_status bam_loader_create(bam_loader **out, const char *data_dir, const bam_mix *mix,
                             const char *split, int T, int global_batch, int rank, int world,
                             uint64_t seed, int expect_vocab);
void bam_loader_free(bam_loader **l);
int bam_loader_local_batch(const bam_loader *l);
/* Fill inputs and targets (local_batch, T), row-major, for the next global batch; the
 * targets are the inputs shifted by one token. */
bam_status bam_loader_next(bam_loader *l, int32_t *inputs, int32_t *targets);
int64_t bam_loader_position(const bam_loader *l);   /* global batches consumed */
/* Resume: the next batch will be batch `batches` (negative means 0). The per-domain counters
 * are recomputed by hashing every earlier sample (from the current position when seeking
 * forward): about 0.6 s for 10^5 batches of 512. */
void bam_loader_seek(bam_loader *l, int64_t batches);
/* For tests and diagnostics: the domain index (into the mix) and window start (token offset
 * into that domain's split) of global sample i in [0, global_batch) of global batch `batch`;
 * the same on every rank. Costs a walk from the position (or from 0 for an earlier batch)
 * and one permutation. */
bam_status bam_loader_window(const bam_loader *l, int64_t batch, int i, int *domain,
                             int64_t *offset);

#endif
