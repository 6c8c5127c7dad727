#include "bam/core.h"

#include <stdarg.h>
#include <string.h>

/* One record per thread: OpenMP workers may fail independently of the main thread. */
static _Thread_local char err_msg[1024];
static _Thread_local char err_trace[4096];
static _Thread_local int err_set;

const char *bam_status_str(bam_status s) {
  switch (s) {
  case BAM_OK: return "ok";
  case BAM_ERR_ARG: return "bad argument";
  case BAM_ERR_CONFIG: return "bad config";
  case BAM_ERR_IO: return "I/O error";
  case BAM_ERR_DATA: return "bad data";
  case BAM_ERR_NOMEM: return "out of memory";
  case BAM_ERR_HDF5: return "HDF5 error";
  case BAM_ERR_MPI: return "MPI error";
  case BAM_ERR_NUMERIC: return "numerical error";
  case BAM_ERR_INTERNAL: return "internal error";
  }
  return "unknown error";
}

bam_status bam_error_set(bam_status code, const char *file, int line, const char *fmt, ...) {
  if (!err_set) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_msg, sizeof err_msg, fmt, ap);
    va_end(ap);
    /* keep the message on one line */
    for (char *p = err_msg; *p; p++)
      if (*p == '\n' || *p == '\r') *p = ' ';
    snprintf(err_trace, sizeof err_trace, "  at %s:%d\n", file, line);
    err_set = 1;
  }
  return code;
}

void bam_error_trace(const char *file, int line, const char *expr) {
  size_t used = strlen(err_trace);
  if (used + 1 < sizeof err_trace)
    snprintf(err_trace + used, sizeof err_trace - used, "  at %s:%d: %s\n", file, line, expr);
}

const char *bam_error_message(void) { return err_set ? err_msg : ""; }
const char *bam_error_backtrace(void) { return err_trace; }

void bam_error_clear(void) {
  err_set = 0;
  err_msg[0] = 0;
  err_trace[0] = 0;
}
