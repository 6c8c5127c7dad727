/* report: growable text, whole-file reads and writes, line and field splitting. */
#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

static void buf_reserve(rp_buf *b, size_t extra) {
  if (b->failed) return;
  if (b->len + extra + 1 <= b->cap) return;
  size_t cap = b->cap ? b->cap : 4096;
  while (cap < b->len + extra + 1) cap *= 2;
  char *s = realloc(b->s, cap);
  if (!s) {
    b->failed = 1;
    return;
  }
  b->s = s;
  b->cap = cap;
}

static void buf_vprintf(rp_buf *b, const char *fmt, va_list ap) {
  va_list ap2;
  va_copy(ap2, ap);
  int n = vsnprintf(NULL, 0, fmt, ap2);
  va_end(ap2);
  if (n < 0) {
    b->failed = 1;
    return;
  }
  buf_reserve(b, (size_t)n);
  if (b->failed) return;
  vsnprintf(b->s + b->len, (size_t)n + 1, fmt, ap);
  b->len += (size_t)n;
}

void rp_printf(rp_buf *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  buf_vprintf(b, fmt, ap);
  va_end(ap);
}

void rp_puts(rp_buf *b, const char *s) {
  size_t n = strlen(s);
  buf_reserve(b, n);
  if (b->failed) return;
  memcpy(b->s + b->len, s, n + 1);
  b->len += n;
}

bam_status rp_buf_status(const rp_buf *b, const char *what) {
  if (b->failed) BAM_FAIL(BAM_ERR_NOMEM, "report: out of memory while building %s", what);
  return BAM_OK;
}

void rp_buf_free(rp_buf *b) {
  free(b->s);
  *b = (rp_buf){0};
}

bam_status rp_fmt(char **out, const char *fmt, ...) {
  rp_buf b = {0};
  va_list ap;
  va_start(ap, fmt);
  buf_vprintf(&b, fmt, ap);
  va_end(ap);
  if (b.failed || !b.s) {
    rp_buf_free(&b);
    BAM_FAIL(BAM_ERR_NOMEM, "report: out of memory formatting a string");
  }
  free(*out);
  *out = b.s;
  return BAM_OK;
}

bam_status rp_strdup(char **out, const char *s) { return rp_fmt(out, "%s", s); }

int rp_exists(const char *path) {
  struct stat st;
  return stat(path, &st) == 0;
}

int rp_is_dir(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

bam_status rp_read_file(const char *path, char **out, size_t *len) {
  *out = NULL;
  FILE *f = fopen(path, "rb");
  if (!f) BAM_FAIL(BAM_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
  rp_buf b = {0};
  char chunk[65536];
  size_t n;
  while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
    buf_reserve(&b, n);
    if (b.failed) break;
    memcpy(b.s + b.len, chunk, n);
    b.len += n;
    b.s[b.len] = 0;
  }
  int err = ferror(f);
  fclose(f);
  if (err) {
    rp_buf_free(&b);
    BAM_FAIL(BAM_ERR_IO, "%s: read failed", path);
  }
  if (!b.s) buf_reserve(&b, 0);
  if (b.failed) {
    rp_buf_free(&b);
    BAM_FAIL(BAM_ERR_NOMEM, "%s: out of memory reading it", path);
  }
  b.s[b.len] = 0;
  if (memchr(b.s, 0, b.len)) {
    rp_buf_free(&b);
    BAM_FAIL(BAM_ERR_DATA, "%s: not a text file (it holds NUL bytes)", path);
  }
  *out = b.s;
  if (len) *len = b.len;
  return BAM_OK;
}

bam_status rp_write_file(const char *path, const char *text, size_t len) {
  FILE *f = fopen(path, "wb");
  if (!f) BAM_FAIL(BAM_ERR_IO, "%s: cannot write: %s", path, strerror(errno));
  size_t w = len ? fwrite(text, 1, len, f) : 0;
  int bad = w != len;
  if (fclose(f) != 0) bad = 1;
  if (bad) BAM_FAIL(BAM_ERR_IO, "%s: write failed: %s", path, strerror(errno));
  return BAM_OK;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st, (void)flag, (void)ftw;
  return remove(path);
}

bam_status rp_remove_tree(const char *path) {
  if (nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS) != 0 && errno != ENOENT)
    BAM_FAIL(BAM_ERR_IO, "%s: cannot remove: %s", path, strerror(errno));
  return BAM_OK;
}

int rp_next_line(rp_lines *it, char **line) {
  if (!it->p || !*it->p) return 0;
  char *s = it->p, *nl = strchr(s, '\n');
  if (nl) {
    *nl = 0;
    it->p = nl + 1;
  } else {
    it->p = s + strlen(s);
  }
  size_t n = strlen(s);
  if (n && s[n - 1] == '\r') s[n - 1] = 0;
  it->lineno++;
  *line = s;
  return 1;
}

int rp_split(char *s, char sep, char **fields, int cap, int *n_all) {
  int n = 0;
  if (sep == ' ') {
    char *p = s;
    for (;;) {
      while (*p == ' ' || *p == '\t') p++;
      if (!*p) break;
      if (n < cap) fields[n] = p;
      n++;
      while (*p && *p != ' ' && *p != '\t') p++;
      if (*p) *p++ = 0;
    }
  } else {
    char *p = s;
    for (;;) {
      if (n < cap) fields[n] = p;
      n++;
      char *c = strchr(p, sep);
      if (!c) break;
      *c = 0;
      p = c + 1;
    }
  }
  if (n_all) *n_all = n;
  return n < cap ? n : cap;
}

int rp_parse_double(const char *s, double *out) {
  if (!*s) return 0;
  char *end;
  errno = 0;
  double x = strtod(s, &end);
  if (errno || *end || !isfinite(x)) return 0;
  *out = x;
  return 1;
}

int rp_parse_i64(const char *s, int64_t *out) {
  if (!*s) return 0;
  char *end;
  errno = 0;
  long long x = strtoll(s, &end, 10);
  if (errno || *end) return 0;
  *out = (int64_t)x;
  return 1;
}
