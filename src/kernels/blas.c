/* Which OpenBLAS kernels run the matrix products.
 *
 * Debian's OpenBLAS is a DYNAMIC_ARCH build: it holds kernels for many CPUs and picks one set
 * when the library loads, from the CPU's identity, unless OPENBLAS_CORETYPE names one. The
 * choice changes the speed of every product by up to 2x (on a Zen 5 core: 98 GFLOP/s with the
 * AVX2 "Haswell" kernels, 198 with the AVX-512 "Cooperlake" ones), so bam reports it wherever
 * it reports speed: `bam version`, the training header, every line of bam-bench. */
#include <cblas.h>

#include "bam/kernels.h"

const char *bam_blas_kernels(void) {
  const char *name = openblas_get_corename();
  return name && name[0] ? name : "unknown";
}
