/* ckpt/fsutil: the file-system steps of an atomic checkpoint: fsync of files and folders,
 * mkdir -p, rm -rf (never following links) and the write-fsync-rename of a small text file. */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

bam_status bam_fsync_path(const char *path) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) BAM_FAIL(BAM_ERR_IO, "%s: cannot open for fsync: %s", path, strerror(errno));
  int rc = fsync(fd);
  int err = errno;
  close(fd);
  /* Some file systems refuse fsync on a folder (EINVAL); their metadata is then durable by
   * other means, or not at all, and there is nothing more we could do. */
  if (rc != 0 && err != EINVAL)
    BAM_FAIL(BAM_ERR_IO, "%s: fsync failed: %s", path, strerror(err));
  return BAM_OK;
}

bam_status bam_fsync_parent(const char *path) {
  char dir[PATH_MAX];
  bam_strlcpy(dir, path, sizeof dir);
  char *slash = strrchr(dir, '/');
  if (!slash) return bam_fsync_path(".");
  if (slash == dir) slash[1] = 0; /* "/name" -> "/" */
  else *slash = 0;
  return bam_fsync_path(dir);
}

static bam_status mkdir_one(const char *path) {
  if (mkdir(path, 0755) == 0) return BAM_OK;
  int err = errno;
  struct stat sb;
  if (err == EEXIST && stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) return BAM_OK;
  if (err == EEXIST) BAM_FAIL(BAM_ERR_IO, "%s: exists and is not a folder", path);
  BAM_FAIL(BAM_ERR_IO, "%s: cannot create folder: %s", path, strerror(err));
}

bam_status bam_mkdir_p(const char *path) {
  char buf[PATH_MAX];
  if (bam_strlcpy(buf, path, sizeof buf) >= sizeof buf)
    BAM_FAIL(BAM_ERR_ARG, "%s: path too long", path);
  for (char *p = buf + 1; *p; p++) {
    if (*p != '/') continue;
    *p = 0;
    BAM_CHECK(mkdir_one(buf));
    *p = '/';
  }
  return mkdir_one(buf);
}

static int rm_one(const char *path, const struct stat *sb, int type, struct FTW *ftw) {
  (void)sb, (void)ftw;
  /* FTW_DEPTH: a folder comes after its contents. FTW_PHYS: links are removed, not followed. */
  return (type == FTW_DP ? rmdir(path) : unlink(path)) == 0 ? 0 : -1;
}

int bam_rm_rf(const char *path) {
  struct stat sb;
  if (lstat(path, &sb) != 0) return errno == ENOENT ? 0 : -1;
  return nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

bam_status bam_write_file_atomic(const char *dir, const char *name, const char *text) {
  char path[PATH_MAX], tmp[PATH_MAX];
  if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, name) >= sizeof path ||
      (size_t)snprintf(tmp, sizeof tmp, "%s/%s.tmp", dir, name) >= sizeof tmp)
    BAM_FAIL(BAM_ERR_ARG, "%s/%s: path too long", dir, name);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) BAM_FAIL(BAM_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
  size_t n = strlen(text), done = 0;
  while (done < n) {
    ssize_t w = write(fd, text + done, n - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      int err = errno;
      close(fd);
      unlink(tmp);
      BAM_FAIL(BAM_ERR_IO, "%s: cannot write: %s", tmp, strerror(err));
    }
    done += (size_t)w;
  }
  if (fsync(fd) != 0) {
    int err = errno;
    close(fd);
    unlink(tmp);
    BAM_FAIL(BAM_ERR_IO, "%s: fsync failed: %s", tmp, strerror(err));
  }
  if (close(fd) != 0) {
    int err = errno;
    unlink(tmp);
    BAM_FAIL(BAM_ERR_IO, "%s: cannot close: %s", tmp, strerror(err));
  }
  if (rename(tmp, path) != 0) {
    int err = errno;
    unlink(tmp);
    BAM_FAIL(BAM_ERR_IO, "cannot rename %s to %s: %s", tmp, path, strerror(err));
  }
  return bam_fsync_path(dir);
}
