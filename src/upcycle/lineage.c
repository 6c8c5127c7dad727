/* upcycle/lineage: the identity of a checkpoint's parameters and the "key = value" lineage
 * text that ties a domain expert to the seed it was branched from. */
#include <stdlib.h>
#include <string.h>

#include "bam/upcycle.h"
#include "internal.h"

/* Parameters read per bam_ckpt_read call while hashing: 16 MiB. A tensor up to this size is
 * read whole (a single-file checkpoint reads a tensor in part through a copy of all of it). */
#define ID_CHUNK ((size_t)1 << 22)

bam_status bam_upcycle_params_id(bam_ckpt *c, char *out, size_t cap) {
  int nt = 0;
  size_t n = 0;
  const bam_tensor_info *t = bam_ckpt_tensors(c, &nt, &n);
  /* Tensors in flat order (the stored table need not be): the tensors tile [0, n), so the
   * CRC chained over them is the CRC of the flat parameter buffer. */
  int order[BAM_MAX_TENSORS];
  if (nt < 1 || nt > BAM_MAX_TENSORS)
    BAM_FAIL(BAM_ERR_DATA, "%s: %d tensors (expected 1 to %d)", bam_ckpt_path(c), nt,
             BAM_MAX_TENSORS);
  for (int i = 0; i < nt; i++) {
    int j = i;
    for (; j > 0 && t[order[j - 1]].offset > t[i].offset; j--) order[j] = order[j - 1];
    order[j] = i;
  }
  size_t biggest = 0;
  for (int i = 0; i < nt; i++) biggest = t[i].numel > biggest ? t[i].numel : biggest;
  size_t len = biggest < ID_CHUNK ? biggest : ID_CHUNK;
  float *buf = NULL;
  BAM_CHECK(bam_alloc_checked((void **)&buf, (len ? len : 1) * sizeof(float), "parameters id buffer"));
  uint32_t crc = 0;
  size_t at = 0;
  bam_status st = BAM_OK;
  for (int k = 0; k < nt && st == BAM_OK; k++) {
    const bam_tensor_info *x = &t[order[k]];
    if (x->offset != at) {
      st = bam_error_set(BAM_ERR_DATA, __FILE__, __LINE__,
                         "%s: tensor %s starts at element %zu, expected %zu (a gap or an "
                         "overlap in the stored layout)", bam_ckpt_path(c), x->name, x->offset, at);
      break;
    }
    for (size_t a = 0; a < x->numel && st == BAM_OK; a += len) {
      size_t e = a + len < x->numel ? a + len : x->numel;
      st = bam_ckpt_read(c, "params", (bam_range){x->offset + a, x->offset + e}, buf);
      if (st == BAM_OK) crc = bam_crc32c(crc, buf, (e - a) * sizeof(float));
    }
    at += x->numel;
  }
  bam_free(buf);
  BAM_CHECK(st);
  if (at != n)
    BAM_FAIL(BAM_ERR_DATA, "%s: the tensors cover %zu of the %zu parameters", bam_ckpt_path(c), at, n);
  if ((size_t)snprintf(out, cap, "%08x-%zu", (unsigned)crc, n) >= cap)
    BAM_FAIL(BAM_ERR_ARG, "%s: a parameters id needs %d bytes, the buffer holds %zu",
             bam_ckpt_path(c), BAM_PARAMS_ID_LEN, cap);
  return BAM_OK;
}

bam_status bam_ckpt_params_id(const char *path, char *out, size_t cap) {
  if (!out || cap == 0) BAM_FAIL(BAM_ERR_ARG, "%s: no buffer for the parameters id", path);
  out[0] = 0;
  bam_ckpt *c = NULL;
  BAM_CHECK(bam_ckpt_open(&c, path));
  bam_status st = bam_upcycle_params_id(c, out, cap);
  bam_ckpt_close(&c);
  return st;
}

/* Lineage text is "key = value" lines; blank lines and lines starting with '#' are skipped,
 * spaces and tabs around keys and values are not part of them, "\r\n" line ends are fine. */
static int is_blank(char ch) { return ch == ' ' || ch == '\t' || ch == '\r'; }

int bam_lineage_get(const char *lineage, const char *key, char *out, size_t cap) {
  if (!lineage || !key) return 0;
  size_t klen = strlen(key);
  for (const char *line = lineage; *line;) {
    const char *end = strchr(line, '\n');
    if (!end) end = line + strlen(line);
    const char *p = line;
    while (p < end && is_blank(*p)) p++;
    const char *eq = memchr(p, '=', (size_t)(end - p));
    if (eq && *p != '#') {
      const char *ke = eq;
      while (ke > p && is_blank(ke[-1])) ke--;
      if ((size_t)(ke - p) == klen && !memcmp(p, key, klen)) {
        const char *v = eq + 1, *ve = end;
        while (v < ve && is_blank(*v)) v++;
        while (ve > v && is_blank(ve[-1])) ve--;
        if (out && cap) {
          size_t n = (size_t)(ve - v) < cap - 1 ? (size_t)(ve - v) : cap - 1;
          memcpy(out, v, n);
          out[n] = 0;
        }
        return 1;
      }
    }
    line = *end ? end + 1 : end;
  }
  if (out && cap) out[0] = 0;
  return 0;
}
