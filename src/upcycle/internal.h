/* upcycle/internal.h: helpers shared by the files of src/upcycle. Private; not an API. */
#ifndef BAM_UPCYCLE_INTERNAL_H
#define BAM_UPCYCLE_INTERNAL_H

#include <stddef.h>

#include "bam/shard.h"

/* Room for a parameters id: 8 hex digits, '-', up to 20 digits, NUL. */
#define BAM_PARAMS_ID_LEN 32

/* bam_ckpt_params_id of an open checkpoint. Reading every parameter once also verifies every
 * shard's CRC-32C, so later partial reads of the handle need no whole-shard buffer. */
bam_status bam_upcycle_params_id(bam_ckpt *c, char *out, size_t cap);

#endif
