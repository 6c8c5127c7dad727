/* bam_alloc: zeroed, 64-byte aligned; buffers of 8 MiB and more start on a 2 MiB boundary,
 * their whole 2 MiB pieces on transparent huge pages where the kernel offers them, and no
 * buffer holds more resident memory than it asked for (read back from /proc/self/smaps). */
#include <malloc.h>
#include <stdint.h>
#include <string.h>

#include "test_util.h"

/* Sum of the Rss and AnonHugePages (KiB) of the mappings overlapping [p, p + n). */
static int region_kib(const void *p, size_t n, long *rss, long *huge) {
  FILE *f = fopen("/proc/self/smaps", "r");
  if (!f) return -1;
  const uintptr_t lo = (uintptr_t)p, hi = lo + n;
  char line[512];
  int in = 0;
  *rss = *huge = 0;
  while (fgets(line, sizeof line, f)) {
    unsigned long a, b;
    long kib;
    if (sscanf(line, "%lx-%lx ", &a, &b) == 2 && strchr(line, '-') < strchr(line, ' '))
      in = a < hi && b > lo;
    else if (in && sscanf(line, "Rss: %ld kB", &kib) == 1)
      *rss += kib;
    else if (in && sscanf(line, "AnonHugePages: %ld kB", &kib) == 1)
      *huge += kib;
  }
  fclose(f);
  return 0;
}

/* THP is "always" or "madvise": an madvise'd region gets huge pages on its first touch. */
static int thp_offered(void) {
  FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
  char buf[128] = "";
  if (!f) return 0;
  if (!fgets(buf, sizeof buf, f)) buf[0] = 0;
  fclose(f);
  return strstr(buf, "[always]") || strstr(buf, "[madvise]");
}

static int all_zero(const unsigned char *p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (p[i]) return 0;
  return 1;
}

int main(void) {
  /* A fixed mmap threshold: every large buffer is then a fresh mapping of its own, so the
   * mappings that overlap it hold nothing else (glibc otherwise raises the threshold after a
   * free and serves the next buffers from the heap, beside memory touched before). */
  T_CHECK(mallopt(M_MMAP_THRESHOLD, 1 << 20) == 1, "mallopt");
  /* small buffers: 64-byte aligned and zeroed */
  for (size_t n = 0; n < 5000; n += 777) {
    unsigned char *p = bam_alloc(n);
    T_CHECK(p != NULL, "bam_alloc(%zu)", n);
    if (!p) continue;
    T_CHECK((uintptr_t)p % 64 == 0, "bam_alloc(%zu) = %p is not 64-byte aligned", n, (void *)p);
    T_CHECK(all_zero(p, n), "bam_alloc(%zu) is not zeroed", n);
    bam_free(p);
  }

  /* large buffers: 2 MiB aligned, zeroed, resident memory within what was asked for */
  const size_t MiB = (size_t)1 << 20;
  const int thp = thp_offered();
  const size_t sizes[] = {8 * MiB, 8 * MiB + 12345, 21 * MiB + 64, 40 * MiB - 4096};
  for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
    const size_t n = sizes[s];
    unsigned char *p = bam_alloc(n);
    T_CHECK(p != NULL, "bam_alloc(%zu)", n);
    if (!p) continue;
    T_CHECK((uintptr_t)p % (2 * MiB) == 0, "bam_alloc(%zu) = %p is not 2 MiB aligned", n,
            (void *)p);
    T_CHECK(all_zero(p, n), "bam_alloc(%zu) is not zeroed", n);
    long rss, huge;
    T_CHECK(region_kib(p, n, &rss, &huge) == 0, "cannot read /proc/self/smaps");
    const long asked_kib = (long)((n + 4095) / 4096 * 4);
    /* the kernel may fault a few pages beyond the last one touched (this machine's: 3); a
     * tail on a huge page would be up to 2,044 KiB more */
    T_CHECK(rss >= asked_kib && rss <= asked_kib + 64,
            "bam_alloc(%zu): %ld KiB resident, asked %ld", n, rss, asked_kib);
    const long whole_kib = (long)(n / (2 * MiB) * 2 * 1024);
    if (thp)
      T_CHECK(huge > 0 && huge <= whole_kib,
              "bam_alloc(%zu): %ld KiB on huge pages, want some and at most the %ld KiB of whole "
              "2 MiB pieces", n, huge, whole_kib);
    else
      T_CHECK(huge == 0, "bam_alloc(%zu): %ld KiB on huge pages while THP is off", n, huge);
    printf("bam_alloc(%zu): %ld KiB resident, %ld KiB of it on huge pages (THP offered: %d)\n", n,
           rss, huge, thp);
    bam_free(p);
  }
  BAM_TEST_END();
}
