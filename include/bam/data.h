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
 * it is missing, malformed, or its vocab_size differs from expect_vocab (if > 0). */
bam_status bam_split_load(bam_split *out, const char *data_dir, const char *domain,
                          const char *split, int expect_vocab);
void bam_split_free(bam_split *s);

/* Parse "general:0.9,code:0.1" (weights are normalised; "code" alone means weight 1). */
typedef struct {
  int n;
  char name[BAM_MAX_DOMAINS][BAM_NAME_MAX];
  double weight[BAM_MAX_DOMAINS];
} bam_mix;
bam_status bam_mix_parse(bam_mix *out, const char *spec);

/* The training loader. A global batch is global_batch windows; sample j of the run is drawn
 * from a domain chosen by a hash of (seed, j) against the mix weights, and within its domain
 * takes the next slot of a seeded permutation of the non-overlapping T-token slots (a new
 * permutation and offset each epoch). Rank r of P gets samples [r*B/P, (r+1)*B/P) of every
 * global batch, so ranks' windows are disjoint and the union is independent of P. The whole
 * state is one counter, so resuming is exact. */
typedef struct bam_loader bam_loader;

bam_status bam_loader_create(bam_loader **out, const char *data_dir, const bam_mix *mix,
                             const char *split, int T, int global_batch, int rank, int world,
                             uint64_t seed, int expect_vocab);
void bam_loader_free(bam_loader **l);
int bam_loader_local_batch(const bam_loader *l);
/* Fill inputs and targets (local_batch, T) for the next global batch. */
bam_status bam_loader_next(bam_loader *l, int32_t *inputs, int32_t *targets);
int64_t bam_loader_position(const bam_loader *l);   /* global batches consumed */
void bam_loader_seek(bam_loader *l, int64_t batches); /* resume */
/* For tests: the global sample indices' (domain index, token offset) of batch b for a rank. */
bam_status bam_loader_window(const bam_loader *l, int64_t batch, int i, int *domain,
                             int64_t *offset);

#endif
