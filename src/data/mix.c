/* Parsing a domain mix "general:0.9,code:0.1" (see bam/data.h).
 *
 * Items are separated by commas, each "name" or "name:weight" (a missing weight means 1),
 * with blanks around names and weights ignored. Names are what token files are called, so
 * only letters, digits, '_', '-' and '.' are allowed. Weights must be finite and positive;
 * they are normalised to sum to 1. */
#include "bam/data.h"

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Trim blanks from both ends of s[0..n) in place; returns the new start, *n the new length. */
static const char *trim(const char *s, size_t *n) {
  while (*n && isspace((unsigned char)s[0])) s++, (*n)--;
  while (*n && isspace((unsigned char)s[*n - 1])) (*n)--;
  return s;
}

bam_status bam_mix_parse(bam_mix *out, const char *spec) {
  memset(out, 0, sizeof *out);
  if (!spec) spec = "";
  size_t total = strlen(spec);
  trim(spec, &total);
  if (total == 0) BAM_FAIL(BAM_ERR_CONFIG, "mix \"%s\": no domains", spec);
  const char *p = spec;
  for (int item = 1;; item++) {
    const char *comma = strchr(p, ',');
    size_t len = comma ? (size_t)(comma - p) : strlen(p);
    const char *colon = memchr(p, ':', len);
    size_t name_len = colon ? (size_t)(colon - p) : len;
    const char *name = trim(p, &name_len);
    if (name_len == 0)
      BAM_FAIL(BAM_ERR_CONFIG, "mix \"%s\": item %d has no domain name", spec, item);
    if (name_len >= BAM_NAME_MAX)
      BAM_FAIL(BAM_ERR_CONFIG, "mix \"%s\": domain name \"%.*s\" is longer than %d bytes", spec,
               (int)name_len, name, BAM_NAME_MAX - 1);
    for (size_t i = 0; i < name_len; i++) {
      unsigned char c = (unsigned char)name[i];
      if (!isalnum(c) && c != '_' && c != '-' && c != '.')
        BAM_FAIL(BAM_ERR_CONFIG,
                 "mix \"%s\": domain name \"%.*s\" may only hold letters, digits, '_', '-', '.'",
                 spec, (int)name_len, name);
    }
    double w = 1.0;
    if (colon) {
      size_t wlen = (size_t)(p + len - (colon + 1));
      const char *wtext = trim(colon + 1, &wlen);
      char buf[64];
      if (wlen == 0 || wlen >= sizeof buf)
        BAM_FAIL(BAM_ERR_CONFIG, "mix \"%s\": weight \"%.*s\" of domain \"%.*s\" is not a number",
                 spec, (int)wlen, wtext, (int)name_len, name);
      memcpy(buf, wtext, wlen);
      buf[wlen] = 0;
      char *end;
      w = strtod(buf, &end);
      if (*end || !isfinite(w))
        BAM_FAIL(BAM_ERR_CONFIG, "mix \"%s\": weight \"%s\" of domain \"%.*s\" is not a number",
                 spec, buf, (int)name_len, name);
      if (!(w > 0))
        BAM_FAIL(BAM_ERR_CONFIG, "mix \"%s\": weight %s of domain \"%.*s\" must be positive", spec,
                 buf, (int)name_len, name);
    }
    for (int d = 0; d < out->n; d++)
      if (strlen(out->name[d]) == name_len && !memcmp(out->name[d], name, name_len))
        BAM_FAIL(BAM_ERR_CONFIG, "mix \"%s\": domain \"%s\" appears twice", spec, out->name[d]);
    if (out->n == BAM_MAX_DOMAINS)
      BAM_FAIL(BAM_ERR_CONFIG, "mix \"%s\": more than %d domains", spec, BAM_MAX_DOMAINS);
    memcpy(out->name[out->n], name, name_len);
    out->name[out->n][name_len] = 0;
    out->weight[out->n] = w;
    out->n++;
    if (!comma) break;
    p = comma + 1;
  }
  double sum = 0;
  for (int d = 0; d < out->n; d++) sum += out->weight[d];
  if (!(sum > 0) || !isfinite(sum))
    BAM_FAIL(BAM_ERR_CONFIG, "mix \"%s\": weights do not sum to a positive number", spec);
  for (int d = 0; d < out->n; d++) out->weight[d] /= sum;
  return BAM_OK;
}
