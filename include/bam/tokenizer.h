/* tokenizer: load a SentencePiece BPE vocabulary and encode/decode text in C.
 *
 * The vocabulary is trained by Debian's spm_train (data/prepare.py) and exported with
 * spm_export_vocab to a text file of "piece<TAB>score" lines, id = line number. Encoding
 * follows SentencePiece's BPE exactly (identity normalisation, no dummy prefix): text is split
 * into characters (user-defined symbols matched whole), then the adjacent pair whose
 * concatenation is a vocabulary piece with the highest score is merged until none remains;
 * characters outside the vocabulary fall back to <0xNN> byte pieces. Spaces are written as
 * U+2581 and newlines as the user-defined symbol U+23CE, both mapped back on decode, so the
 * round trip text -> ids -> text is lossless. tests/data checks encode against spm_encode. */
#ifndef BAM_TOKENIZER_H
#define BAM_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "bam/core.h"

typedef struct bam_tokenizer bam_tokenizer;

bam_status bam_tokenizer_load(bam_tokenizer **out, const char *vocab_path);
void bam_tokenizer_free(bam_tokenizer **t);
int bam_tokenizer_vocab_size(const bam_tokenizer *t);
int bam_tokenizer_eos(const bam_tokenizer *t); /* id of </s>, the document separator */
const char *bam_tokenizer_id(const bam_tokenizer *t); /* identity: hex digest of the vocab */

/* Encode len bytes of UTF-8 text; writes at most cap ids to ids, the count to *n. */
bam_status bam_tokenizer_encode(const bam_tokenizer *t, const char *text, size_t len,
                                int32_t *ids, size_t cap, size_t *n);
/* Decode ids to UTF-8 text (NUL-terminated, at most cap-1 bytes); *len gets its length. */
bam_status bam_tokenizer_decode(const bam_tokenizer *t, const int32_t *ids, size_t n, char *out,
                                size_t cap, size_t *len);

#endif
