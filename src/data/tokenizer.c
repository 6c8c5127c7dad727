/* SentencePiece BPE encoding and decoding from an exported vocabulary (see bam/tokenizer.h).
 *
 * Encoding replicates sentencepiece's bpe_model.cc: the normalised text (spaces as U+2581,
 * newlines as U+23CE, malformed UTF-8 bytes as U+FFFD) is split into characters, user-defined
 * symbols matched whole (longest first) and never merged; a heap holds every adjacent pair
 * whose concatenation is a piece, ordered by (piece score desc, left position asc) packed in
 * one integer key; popping the best pair merges it (the right symbol is absorbed into the left
 * one) and pushes the two new pairs it forms. Stale heap entries are recognised lazily, as
 * sentencepiece does, by an emptied symbol or a changed length. O(n log n) in the length of
 * the longest line, since lines (runs between user-defined symbols) are encoded one at a time.
 * Symbols that end up outside the vocabulary fall back to their bytes as <0xNN> pieces. */
#include "bam/tokenizer.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { PIECE_NORMAL, PIECE_CONTROL, PIECE_BYTE, PIECE_USER };

struct bam_tokenizer {
  int n;            /* vocabulary size */
  char *text;       /* the vocabulary file, pieces NUL-terminated in place */
  uint32_t *off;    /* piece i is text + off[i], len[i] bytes */
  uint32_t *len;
  float *score;
  uint32_t *rank;   /* dense rank of the score, 0 for the highest: equal scores, equal ranks */
  uint8_t *kind;
  /* Open-addressing hash table (linear probing) of the pieces encoding may produce: normal
   * and user-defined ones, sentencepiece's pieces_. Slots hold id + 1 (0 = empty). */
  int32_t *table;
  size_t mask;
  int byte_id[256]; /* id of <0xNN>, -1 when absent */
  int byte_fallback; /* all 256 byte pieces present */
  int unk, eos;
  int n_user;
  int *user;                /* user-defined ids, longest piece first */
  uint8_t user_first[256];  /* some user-defined piece starts with this byte */
  /* decoded bytes of every id: dec + dec_off[i], dec_len[i] bytes */
  char *dec;
  uint32_t *dec_off, *dec_len;
  char id[17];
};

/* ---- hashing of byte strings ---- */
static inline uint64_t hash_bytes(const char *p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a */
  for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)p[i]) * 0x100000001b3ULL;
  return bam_hash64(h);
}

/* Id of the normal or user-defined piece spelled p[0..n), or -1. */
static inline int lookup(const bam_tokenizer *t, const char *p, size_t n) {
  size_t s = (size_t)hash_bytes(p, n) & t->mask;
  for (;;) {
    int32_t v = t->table[s];
    if (v == 0) return -1;
    int id = v - 1;
    if (t->len[id] == n && memcmp(t->text + t->off[id], p, n) == 0) return id;
    s = (s + 1) & t->mask;
  }
}

/* ---- UTF-8, as sentencepiece's string_util ---- */

/* Length of the character a well-formed encoder would start at byte c (OneCharLen). */
static inline size_t one_char_len(uint8_t c) {
  static const uint8_t lens[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return lens[c >> 4];
}

static inline int trail(uint8_t c) { return (c & 0xC0) == 0x80; }
static inline int valid_cp(uint32_t c) { return c < 0xD800 || (c >= 0xE000 && c <= 0x10FFFF); }

/* Length of the well-formed character at p (n bytes left), or 0 when malformed
 * (overlong, surrogate, out of range or truncated): DecodeUTF8. */
static size_t utf8_len(const uint8_t *p, size_t n) {
  uint8_t c = p[0];
  if (c < 0x80) return 1;
  if (n >= 2 && (c & 0xE0) == 0xC0) {
    uint32_t cp = (uint32_t)(c & 0x1F) << 6 | (p[1] & 0x3F);
    return trail(p[1]) && cp >= 0x80 && valid_cp(cp) ? 2 : 0;
  }
  if (n >= 3 && (c & 0xF0) == 0xE0) {
    uint32_t cp = (uint32_t)(c & 0x0F) << 12 | (uint32_t)(p[1] & 0x3F) << 6 | (p[2] & 0x3F);
    return trail(p[1]) && trail(p[2]) && cp >= 0x800 && valid_cp(cp) ? 3 : 0;
  }
  if (n >= 4 && (c & 0xF8) == 0xF0) {
    uint32_t cp = (uint32_t)(c & 0x07) << 18 | (uint32_t)(p[1] & 0x3F) << 12 |
                  (uint32_t)(p[2] & 0x3F) << 6 | (p[3] & 0x3F);
    return trail(p[1]) && trail(p[2]) && trail(p[3]) && cp >= 0x10000 && valid_cp(cp) ? 4 : 0;
  }
  return 0;
}

#define SPACE_SYM "\xE2\x96\x81"   /* U+2581 LOWER ONE EIGHTH BLOCK */
#define NEWLINE_SYM "\xE2\x8F\x8E" /* U+23CE RETURN SYMBOL */
#define REPLACEMENT "\xEF\xBF\xBD" /* U+FFFD */

/* ---- loading ---- */

static int is_byte_piece(const char *p, size_t n, int *value) {
  static const char hex[] = "0123456789ABCDEF";
  if (n != 6 || memcmp(p, "<0x", 3) != 0 || p[5] != '>') return 0;
  const char *hi = memchr(hex, p[3], 16), *lo = memchr(hex, p[4], 16);
  if (!hi || !lo) return 0;
  *value = (int)(hi - hex) * 16 + (int)(lo - hex);
  return 1;
}

static bam_status read_file(const char *path, char **out, size_t *n) {
  FILE *f = fopen(path, "rb");
  if (!f) BAM_FAIL(BAM_ERR_IO, "%s: cannot open (%s)", path, strerror(errno));
  size_t cap = 1 << 16, len = 0;
  char *buf = malloc(cap + 1);
  for (;;) {
    if (!buf) {
      fclose(f);
      BAM_FAIL(BAM_ERR_NOMEM, "%s: out of memory reading the file", path);
    }
    len += fread(buf + len, 1, cap - len, f);
    if (len < cap) break;
    cap *= 2;
    char *grown = realloc(buf, cap + 1);
    if (!grown) free(buf);
    buf = grown;
  }
  int failed = ferror(f);
  fclose(f);
  if (failed) {
    free(buf);
    BAM_FAIL(BAM_ERR_IO, "%s: read error", path);
  }
  buf[len] = 0;
  *out = buf;
  *n = len;
  return BAM_OK;
}

/* Parse the "piece<TAB>score" lines of t->text (len bytes) into the piece tables. */
static bam_status parse_vocab(bam_tokenizer *t, const char *path, size_t len) {
  int lines = 0;
  for (size_t i = 0; i < len; i++) lines += t->text[i] == '\n';
  if (len && t->text[len - 1] != '\n') lines++;
  if (lines == 0) BAM_FAIL(BAM_ERR_DATA, "%s: empty vocabulary", path);
  t->off = calloc((size_t)lines, sizeof *t->off);
  t->len = calloc((size_t)lines, sizeof *t->len);
  t->score = calloc((size_t)lines, sizeof *t->score);
  t->kind = calloc((size_t)lines, 1);
  if (!t->off || !t->len || !t->score || !t->kind)
    BAM_FAIL(BAM_ERR_NOMEM, "%s: out of memory for %d pieces", path, lines);
  char *p = t->text, *end = t->text + len;
  int n = 0;
  while (p < end) {
    char *eol = memchr(p, '\n', (size_t)(end - p));
    if (!eol) eol = end;
    *eol = 0;
    /* The score follows the last tab: a piece may itself be a tab character. */
    char *tab = NULL;
    for (char *q = eol; q > p;)
      if (*--q == '\t') {
        tab = q;
        break;
      }
    if (!tab || tab == p)
      BAM_FAIL(BAM_ERR_DATA, "%s:%d: expected 'piece<TAB>score'", path, n + 1);
    *tab = 0;
    char *num_end;
    errno = 0;
    float score = strtof(tab + 1, &num_end);
    if (num_end == tab + 1 || *num_end || errno || !isfinite(score))
      BAM_FAIL(BAM_ERR_DATA, "%s:%d: score '%s' is not a number", path, n + 1, tab + 1);
    t->off[n] = (uint32_t)(p - t->text);
    t->len[n] = (uint32_t)(tab - p);
    t->score[n] = score;
    n++;
    p = eol + 1;
  }
  t->n = n;
  return BAM_OK;
}

typedef struct {
  float score;
  int id;
} scored;

static int by_score_desc(const void *a, const void *b) {
  float x = ((const scored *)a)->score, y = ((const scored *)b)->score;
  return x > y ? -1 : x < y ? 1 : 0;
}

/* Classify the pieces, build the lookup table, the byte map and the decoded forms. */
static bam_status index_vocab(bam_tokenizer *t, const char *path) {
  size_t cap = 16;
  while (cap < 2 * (size_t)t->n) cap *= 2;
  t->table = calloc(cap, sizeof *t->table);
  t->user = calloc((size_t)t->n, sizeof *t->user);
  t->dec_off = calloc((size_t)t->n, sizeof *t->dec_off);
  t->dec_len = calloc((size_t)t->n, sizeof *t->dec_len);
  if (!t->table || !t->user || !t->dec_off || !t->dec_len)
    BAM_FAIL(BAM_ERR_NOMEM, "%s: out of memory for %d pieces", path, t->n);
  t->mask = cap - 1;
  t->unk = t->eos = -1;
  for (int b = 0; b < 256; b++) t->byte_id[b] = -1;

  size_t dec_bytes = 0;
  for (int i = 0; i < t->n; i++) {
    const char *piece = t->text + t->off[i];
    size_t n = t->len[i];
    int byte;
    if (!strcmp(piece, "<unk>") || !strcmp(piece, "<s>") || !strcmp(piece, "</s>") ||
        !strcmp(piece, "<pad>")) {
      t->kind[i] = PIECE_CONTROL;
      if (!strcmp(piece, "<unk>")) t->unk = i;
      if (!strcmp(piece, "</s>")) t->eos = i;
    } else if (is_byte_piece(piece, n, &byte)) {
      t->kind[i] = PIECE_BYTE;
      t->byte_id[byte] = i;
    } else if (t->score[i] == 0.0f && !signbit(t->score[i])) {
      t->kind[i] = PIECE_USER;
      t->user[t->n_user++] = i;
      t->user_first[(uint8_t)piece[0]] = 1;
    } else {
      t->kind[i] = PIECE_NORMAL;
    }
    if (t->kind[i] == PIECE_NORMAL || t->kind[i] == PIECE_USER) {
      size_t s = (size_t)hash_bytes(piece, n) & t->mask;
      while (t->table[s]) {
        int other = t->table[s] - 1;
        if (t->len[other] == n && !memcmp(t->text + t->off[other], piece, n))
          BAM_FAIL(BAM_ERR_DATA, "%s:%d: piece '%s' repeats line %d", path, i + 1, piece,
                   other + 1);
        s = (s + 1) & t->mask;
      }
      t->table[s] = i + 1;
    }
    dec_bytes += n;
  }
  if (t->unk < 0) BAM_FAIL(BAM_ERR_DATA, "%s: no '<unk>' piece", path);
  if (t->eos < 0) BAM_FAIL(BAM_ERR_DATA, "%s: no '</s>' piece", path);
  t->byte_fallback = 1;
  for (int b = 0; b < 256; b++) t->byte_fallback &= t->byte_id[b] >= 0;
  /* longest user-defined piece first, so matching takes the longest (a stable insertion
   * sort: there are few) */
  for (int i = 1; i < t->n_user; i++) {
    int id = t->user[i], j = i;
    for (; j > 0 && t->len[t->user[j - 1]] < t->len[id]; j--) t->user[j] = t->user[j - 1];
    t->user[j] = id;
  }

  /* Score ranks, so the merge heap compares one integer key. */
  scored *order = malloc((size_t)t->n * sizeof *order);
  t->rank = malloc((size_t)t->n * sizeof *t->rank);
  if (!order || !t->rank) {
    free(order);
    BAM_FAIL(BAM_ERR_NOMEM, "%s: out of memory", path);
  }
  for (int i = 0; i < t->n; i++) order[i] = (scored){t->score[i], i};
  qsort(order, (size_t)t->n, sizeof *order, by_score_desc);
  for (int i = 0, r = 0; i < t->n; i++) {
    if (i > 0 && order[i].score != order[i - 1].score) r++;
    t->rank[order[i].id] = (uint32_t)r;
  }
  free(order);

  /* Decoded forms: control pieces are empty, byte pieces their byte, other pieces their text
   * with U+2581 -> ' ' and U+23CE -> '\n' (which only shrinks them). */
  t->dec = malloc(dec_bytes + 1);
  if (!t->dec) BAM_FAIL(BAM_ERR_NOMEM, "%s: out of memory", path);
  size_t at = 0;
  for (int i = 0; i < t->n; i++) {
    const char *piece = t->text + t->off[i];
    size_t n = t->len[i];
    t->dec_off[i] = (uint32_t)at;
    int byte;
    if (t->kind[i] == PIECE_BYTE && is_byte_piece(piece, n, &byte)) {
      t->dec[at++] = (char)byte;
    } else if (t->kind[i] != PIECE_CONTROL) {
      for (size_t k = 0; k < n;) {
        if (k + 3 <= n && !memcmp(piece + k, SPACE_SYM, 3)) {
          t->dec[at++] = ' ';
          k += 3;
        } else if (k + 3 <= n && !memcmp(piece + k, NEWLINE_SYM, 3)) {
          t->dec[at++] = '\n';
          k += 3;
        } else {
          t->dec[at++] = piece[k++];
        }
      }
    }
    t->dec_len[i] = (uint32_t)(at - t->dec_off[i]);
  }
  return BAM_OK;
}

bam_status bam_tokenizer_load(bam_tokenizer **out, const char *vocab_path) {
  *out = NULL;
  bam_tokenizer *t = calloc(1, sizeof *t);
  if (!t) BAM_FAIL(BAM_ERR_NOMEM, "out of memory for a tokenizer");
  size_t len = 0;
  bam_status st;
  BAM_CHECK_GOTO(st, read_file(vocab_path, &t->text, &len), fail);
  if (len >= UINT32_MAX) {
    st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__, "%s: vocabulary file too large",
                       vocab_path);
    goto fail;
  }
  uint8_t digest[32];
  bam_sha256(t->text, len, digest);
  for (int i = 0; i < 8; i++) snprintf(t->id + 2 * i, 3, "%02x", digest[i]);
  BAM_CHECK_GOTO(st, parse_vocab(t, vocab_path, len), fail);
  BAM_CHECK_GOTO(st, index_vocab(t, vocab_path), fail);
  *out = t;
  return BAM_OK;
fail:
  bam_tokenizer_free(&t);
  return st;
}

void bam_tokenizer_free(bam_tokenizer **tp) {
  bam_tokenizer *t = *tp;
  if (!t) return;
  free(t->text);
  free(t->off);
  free(t->len);
  free(t->score);
  free(t->rank);
  free(t->kind);
  free(t->table);
  free(t->user);
  free(t->dec);
  free(t->dec_off);
  free(t->dec_len);
  free(t);
  *tp = NULL;
}

int bam_tokenizer_vocab_size(const bam_tokenizer *t) { return t->n; }
int bam_tokenizer_eos(const bam_tokenizer *t) { return t->eos; }
const char *bam_tokenizer_id(const bam_tokenizer *t) { return t->id; }
const char *bam_tokenizer_piece(const bam_tokenizer *t, int id) {
  return id >= 0 && id < t->n ? t->text + t->off[id] : "";
}

/* ---- encoding ---- */

typedef struct {
  uint32_t start, len; /* bytes of the normalised text; len 0 once merged away */
  int32_t prev, next;  /* neighbours in the live list, -1 at the ends */
  int32_t id;          /* the piece it spells, -1 when none */
} symbol;

typedef struct {
  uint64_t key; /* rank of the merged piece << 32 | left symbol: smaller is better */
  int32_t right; /* right symbol */
  int32_t id;    /* the merged piece */
} pair;

typedef struct {
  pair *a;
  size_t n, cap;
} heap;

/* a ranks before b: higher score, then the leftmost (sentencepiece's SymbolPairComparator). */
static inline int better(const pair *a, const pair *b) { return a->key < b->key; }

static int heap_push(heap *h, pair p) {
  if (h->n == h->cap) {
    size_t cap = h->cap ? 2 * h->cap : 64;
    pair *grown = realloc(h->a, cap * sizeof *grown);
    if (!grown) return 0;
    h->a = grown;
    h->cap = cap;
  }
  size_t i = h->n++;
  while (i > 0) {
    size_t parent = (i - 1) / 2;
    if (!better(&p, &h->a[parent])) break;
    h->a[i] = h->a[parent];
    i = parent;
  }
  h->a[i] = p;
  return 1;
}

static pair heap_pop(heap *h) {
  pair top = h->a[0], last = h->a[--h->n];
  size_t i = 0;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= h->n) break;
    if (c + 1 < h->n && better(&h->a[c + 1], &h->a[c])) c++;
    if (!better(&h->a[c], &last)) break;
    h->a[i] = h->a[c];
    i = c;
  }
  if (h->n) h->a[i] = last;
  return top;
}

/* Push the pair (l, r) when both exist and their concatenation is a piece; 0 when out of
 * memory. */
static inline int maybe_add(const bam_tokenizer *t, const char *norm, const symbol *sym, heap *h,
                            int32_t l, int32_t r) {
  if (l < 0 || r < 0) return 1;
  int id = lookup(t, norm + sym[l].start, sym[l].len + sym[r].len);
  if (id < 0) return 1;
  pair p = {(uint64_t)t->rank[id] << 32 | (uint32_t)l, r, id};
  return heap_push(h, p);
}

/* Normalise text into norm (capacity 3*len): ' ' -> U+2581, '\n' -> U+23CE, malformed UTF-8
 * bytes -> U+FFFD; returns the normalised length. */
static size_t normalise(const char *text, size_t len, char *norm) {
  const uint8_t *p = (const uint8_t *)text;
  size_t o = 0;
  for (size_t i = 0; i < len;) {
    uint8_t c = p[i];
    if (c == ' ') {
      memcpy(norm + o, SPACE_SYM, 3);
      o += 3;
      i++;
    } else if (c == '\n') {
      memcpy(norm + o, NEWLINE_SYM, 3);
      o += 3;
      i++;
    } else if (c < 0x80) {
      norm[o++] = (char)c;
      i++;
    } else {
      size_t m = utf8_len(p + i, len - i);
      if (m == 0) { /* one malformed byte becomes one replacement character */
        memcpy(norm + o, REPLACEMENT, 3);
        o += 3;
        i++;
      } else {
        memcpy(norm + o, p + i, m);
        o += m;
        i += m;
      }
    }
  }
  return o;
}

/* The user-defined piece at p (n bytes left), longest first, or -1; *m gets its length. */
static inline int match_user(const bam_tokenizer *t, const char *p, size_t n, size_t *m) {
  if (!t->user_first[(uint8_t)p[0]]) return -1;
  for (int u = 0; u < t->n_user; u++) {
    int id = t->user[u];
    if (t->len[id] <= n && !memcmp(p, t->text + t->off[id], t->len[id])) {
      *m = t->len[id];
      return id;
    }
  }
  return -1;
}

/* BPE over one run of ns character symbols (linked in order): merge the best pair until
 * none is left. Returns 0 when out of memory. */
static int merge_run(const bam_tokenizer *t, const char *norm, symbol *sym, int32_t ns,
                     heap *h) {
  h->n = 0;
  for (int32_t i = 1; i < ns; i++)
    if (!maybe_add(t, norm, sym, h, i - 1, i)) return 0;
  while (h->n) {
    pair top = heap_pop(h);
    int32_t left = (int32_t)(uint32_t)top.key;
    symbol *l = &sym[left], *r = &sym[top.right];
    if (l->len == 0 || r->len == 0 || l->len + r->len != t->len[top.id]) continue; /* stale */
    l->len += r->len;
    l->id = top.id;
    l->next = r->next;
    if (r->next >= 0) sym[r->next].prev = left;
    r->len = 0;
    if (!maybe_add(t, norm, sym, h, l->prev, left)) return 0;
    if (!maybe_add(t, norm, sym, h, left, l->next)) return 0;
  }
  return 1;
}

/* Append the ids of a final symbol: its piece, else its bytes (else <unk>). */
static inline void emit(const bam_tokenizer *t, const char *norm, const symbol *s, int32_t *ids,
                        size_t cap, size_t *count) {
  if (s->id >= 0) {
    if (*count < cap) ids[*count] = s->id;
    ++*count;
  } else if (t->byte_fallback) {
    for (uint32_t k = 0; k < s->len; k++) {
      if (*count < cap) ids[*count] = t->byte_id[(uint8_t)norm[s->start + k]];
      ++*count;
    }
  } else {
    if (*count < cap) ids[*count] = t->unk;
    ++*count;
  }
}

bam_status bam_tokenizer_encode(const bam_tokenizer *t, const char *text, size_t len,
                                int32_t *ids, size_t cap, size_t *n) {
  *n = 0;
  if (len == 0) return BAM_OK;
  if (len > (UINT32_MAX - 16) / 3)
    BAM_FAIL(BAM_ERR_ARG, "tokenizer: text of %zu bytes is too long to encode at once", len);
  char *norm = malloc(3 * len);
  symbol *sym = NULL;
  size_t sym_cap = 0, count = 0;
  heap h = {0};
  bam_status st = BAM_OK;
  if (!norm) goto nomem;
  size_t nn = normalise(text, len, norm);

  /* User-defined symbols are matched whole and never merged, so no pair crosses one: the
   * runs of characters between them (lines, for the newline symbol) are encoded one at a
   * time, which keeps the symbols and the heap small and in cache. */
  for (size_t i = 0; i < nn;) {
    int32_t ns = 0;
    int user = -1;
    size_t user_len = 0;
    while (i < nn && (user = match_user(t, norm + i, nn - i, &user_len)) < 0) {
      size_t m = one_char_len((uint8_t)norm[i]);
      if (m > nn - i) m = nn - i;
      if ((size_t)ns == sym_cap) {
        sym_cap = sym_cap ? 2 * sym_cap : 256;
        symbol *grown = realloc(sym, sym_cap * sizeof *grown);
        if (!grown) goto nomem;
        sym = grown;
      }
      sym[ns] = (symbol){(uint32_t)i, (uint32_t)m, ns - 1, ns + 1, lookup(t, norm + i, m)};
      ns++;
      i += m;
    }
    if (ns) {
      sym[ns - 1].next = -1;
      if (!merge_run(t, norm, sym, ns, &h)) goto nomem;
      for (int32_t k = 0; k >= 0; k = sym[k].next) emit(t, norm, &sym[k], ids, cap, &count);
    }
    if (user >= 0) {
      if (count < cap) ids[count] = user;
      count++;
      i += user_len;
    }
  }
  *n = count;
  if (count > cap)
    st = bam_error_set(BAM_ERR_ARG, __FILE__, __LINE__,
                       "tokenizer: encoding needs %zu ids but the buffer holds %zu", count, cap);
  goto done;
nomem:
  st = bam_error_set(BAM_ERR_NOMEM, __FILE__, __LINE__,
                     "tokenizer: out of memory encoding %zu bytes", len);
done:
  free(norm);
  free(sym);
  free(h.a);
  return st;
}

/* ---- decoding ---- */

bam_status bam_tokenizer_decode(const bam_tokenizer *t, const int32_t *ids, size_t n, char *out,
                                size_t cap, size_t *len) {
  size_t at = 0;
  *len = 0;
  for (size_t i = 0; i < n; i++) {
    int32_t id = ids[i];
    if (id < 0 || id >= t->n)
      BAM_FAIL(BAM_ERR_ARG, "tokenizer: id %d at index %zu is out of range for vocab_size %d",
               (int)id, i, t->n);
    uint32_t m = t->dec_len[id];
    if (at + m < cap) memcpy(out + at, t->dec + t->dec_off[id], m);
    at += m;
  }
  *len = at;
  if (at >= cap) {
    if (cap) out[0] = 0;
    BAM_FAIL(BAM_ERR_ARG, "tokenizer: decoded text of %zu bytes does not fit %zu", at, cap);
  }
  out[at] = 0;
  return BAM_OK;
}
