/* tokenizer: load a SentencePiece BPE vocabulary and encode/decode text in C.
 *
 * The vocabulary is trained by Debian's spm_train (data/prepare.py) and exported with
 * spm_export_vocab to a text file of "piece<TAB>score" lines, id = line number. Encoding
 * follows SentencePiece's BPE exactly (identity normalisation, no dummy prefix): text is split
 * into characters (user-defined symbols matched whole), then the adjacent pair whose
 * concatenation is a vocabulary piece with the highest score is merged until none remains;
 * characters outside the vocabulary fall back to <0xNN> byte pieces. Spaces are written as
 * U+2581 and newlines as the user-defined symbol U+23CE, both mapped back on decode, so the
 * round trip text -> ids -> text is lossless for valid UTF-8 that does not itself contain U+2581
 * or U+23CE (invalid UTF-8 bytes are encoded as U+FFFD, as SentencePiece does). tests/data
 * checks encode against spm_encode.
 *
 * The exported vocabulary carries no piece types, so they are inferred: "<unk>", "<s>", "</s>"
 * and "<pad>" are control pieces, "<0xNN>" byte pieces, and a piece scored exactly +0 is a
 * user-defined symbol (spm_export_vocab writes user-defined pieces as "0" but the first merged
 * piece as "-0"). A loaded tokenizer is immutable: encode and decode are thread-safe. */
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
/* Identity: the first 16 hex digits of the SHA-256 of the vocabulary file's bytes, the value
 * data/prepare.py stores in every token file's 'tokenizer' attribute. */
const char *bam_tokenizer_id(const bam_tokenizer *t);
/* The piece of an id ("" when out of range), for diagnostics. */
const char *bam_tokenizer_piece(const bam_tokenizer *t, int id);

/* Encode len bytes of UTF-8 text; writes at most cap ids to ids, the count to *n. At most
 * 3*len ids are ever needed. When cap is too small it fails with BAM_ERR_ARG and *n holds the
 * count needed (so ids = NULL, cap = 0 measures). */
bam_status bam_tokenizer_encode(const bam_tokenizer *t, const char *text, size_t len,
                                int32_t *ids, size_t cap, size_t *n);
/* Decode ids to UTF-8 text (NUL-terminated, at most cap-1 bytes); *len gets its length.
 * Control pieces (<unk>, <s>, </s>) decode to nothing. An out-of-range id or a too-small cap
 * is an error (BAM_ERR_ARG; for the latter *len holds the length needed). */
bam_status bam_tokenizer_decode(const bam_tokenizer *t, const int32_t *ids, size_t n, char *out,
                                size_t cap, size_t *len);

/* SHA-256 of n bytes (FIPS 180-4), used for the tokenizer identity. */
void bam_sha256(const void *data, size_t n, uint8_t digest[32]);

#endif
