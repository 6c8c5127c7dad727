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

struct bam_split_stream; /* the open HDF5 file and dataset of a streamed split */

typedef struct {
  char domain[BAM_NAME_MAX];
  char tokenizer[BAM_NAME_MAX];
  int vocab_size;
  int eos_id;
  int64_t n_tokens;
  int64_t text_bytes;
  int64_t n_docs;
  int32_t *tokens;                 /* n_tokens ids (bam_split_load); NULL when streamed */
  struct bam_split_stream *stream; /* bam_split_open; NULL when loaded */
} bam_split;

/* Open one split ("train" or "val") of a domain for streaming: checks the file and reads its
 * attributes and length but no tokens (tokens stays NULL); the file and dataset stay open
 * until bam_split_free. Fails with a message naming the file when it is missing, malformed
 * (no integer 1-D dataset /<split>, attributes missing or of the wrong kind), its 'domain'
 * attribute differs from domain, or its vocab_size differs from expect_vocab (if > 0).
 * The token values are NOT checked here: each bam_split_read checks the tokens it reads, and
 * that per-read check is the only guarantee a streamed split's tokens are in range. */
bam_status bam_split_open(bam_split *out, const char *data_dir, const char *domain,
                          const char *split, int expect_vocab);
/* Read tokens [start, start + count) of an open split into dst (a hyperslab read, any
 * dataset layout, converted to int32). Fails with a message naming the file and dataset when
 * the range is outside the split or the read fails, and with the absolute index of the first
 * token outside [0, vocab_size) if any. HDF5 here is not thread-safe (Debian's parallel
 * build): call it from one thread. */
bam_status bam_split_read(const bam_split *s, int64_t start, int64_t count, int32_t *dst);
/* Load a split whole into tokens (bam_split_open, then every token read and range-checked,
 * then the file closed): the same checks, plus a token outside [0, vocab_size) anywhere. */
bam_status bam_split_load(bam_split *out, const char *data_dir, const char *domain,
                          const char *split, int expect_vocab);
/* Free the tokens and close the file, whichever way the split was made; zeroes *s. */
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
 * must share one tokenizer, and a split needs at least 2T tokens.
 * The splits are streamed (bam_split_open): bam_loader_next reads each of this rank's windows
 * from its HDF5 file, so no corpus is held in memory, and a token out of range is found when
 * a window holding it is read (bam_loader_next fails), not at create. Call the loader from
 * one thread (HDF5). */
typedef struct bam_loader bam_loader;

bam_status bam_loader_create(bam_loader **out, const char *data_dir, const bam_mix *mix,
                             const char *split, int T, int global_batch, int rank, int world,
                             uint64_t seed, int expect_vocab);
void bam_loader_free(bam_loader **l);
int bam_loader_local_batch(const bam_loader *l);
/* Fill inputs and targets (local_batch, T), row-major, for the next global batch; the
 * targets are the inputs shifted by one token. Fails, naming the file and the token index,
 * when a window cannot be read or holds a token outside the vocabulary; the position is
 * then unchanged. */
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
