/* Which OpenBLAS kernels run the matrix products.
 *
 * Debian's OpenBLAS is a DYNAMIC_ARCH build: it holds kernels for many CPUs and picks one set
 * when the library loads, from the CPU's features, unless OPENBLAS_CORETYPE names one. The
 * choice changes the speed of every product by up to 2x (one Zen 5 core: 98 GFLOP/s with the
 * AVX2 "Haswell" kernels, 198 with the AVX-512 "Cooperlake" ones), so bam reports it wherever
 * it reports speed: `bam version`, the training header, every line of bam-bench. bam never
 * changes it: some sites set OPENBLAS_CORETYPE on purpose (older OpenBLAS builds have computed
 * wrong results on some processors), so it only says when a setting holds back a CPU's
 * AVX-512. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>

#include "bam/kernels.h"

const char *bam_blas_kernels(void) {
  const char *name = openblas_get_corename();
  return name && name[0] ? name : "unknown";
}

/* The AVX-512 subsets of OpenBLAS's SkylakeX/Cooperlake kernels. libgcc also checks that the
 * OS saves the 512-bit registers, so "supported" means usable. */
static int cpu_has_avx512(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}

void bam_blas_describe(char *buf, size_t n) {
  const char *name = bam_blas_kernels(), *forced = getenv("OPENBLAS_CORETYPE");
  if (!forced || !forced[0]) {
    snprintf(buf, n, "%s (OpenBLAS's own choice for this CPU)", name);
    return;
  }
  const int avx2_only = !strcasecmp(name, "haswell") || !strcasecmp(name, "zen");
  snprintf(buf, n, "%s (set by OPENBLAS_CORETYPE=%s%s)", name, forced,
           avx2_only && cpu_has_avx512()
               ? "; this CPU has AVX-512, which OpenBLAS's own choice would use: up to 2x "
                 "faster products where its builds are trusted"
               : "");
}
