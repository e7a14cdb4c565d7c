/* Atomic file writes, directory fsync and mkdir -p: the one implementation
 * behind every file the tree writes (models, logits, checkpoints, token
 * shards, session states), so a crash leaves each file whole or absent. A
 * file is written under a hidden temporary name in its own directory
 * (".NAME.tmp-PID-N", O_EXCL), fsync'ed, renamed and its directory fsync'ed. */
#ifndef RP_CORE_FILEIO_H
#define RP_CORE_FILEIO_H

#include <stddef.h>
#include <sys/types.h>

#include "core/error.h"

/* Writes a file's whole contents to fd (already at offset 0); path names the
 * final file, for messages. */
typedef rp_status (*rp_file_write_fn)(int fd, const char *path, void *user, rp_error *err);

/* A file being written atomically, in steps for writers that stream (open,
 * write to fd, seal, commit) or that seal several files before renaming any. */
typedef struct rp_atomic_file {
    int dir_fd;     /* AT_FDCWD, or the directory that path is relative to */
    char *path;     /* the final name */
    char *tmp_path; /* the temporary name, in the same directory */
    int fd;         /* open on tmp_path until sealed, then -1 */
    int stage;      /* internal: open, sealed, committed */
} rp_atomic_file;

/* Creates the temporary file (mode, less the umask) beside path. dir_fd is
 * AT_FDCWD or a directory descriptor that path is relative to; with
 * nofollow, neither name may be a symbolic link. */
rp_status rp_atomic_file_open(rp_atomic_file *f, int dir_fd, const char *path, mode_t mode,
                              int nofollow, rp_error *err);
/* fsyncs and closes the temporary file; it keeps its temporary name. */
rp_status rp_atomic_file_seal(rp_atomic_file *f, rp_error *err);
/* Renames the sealed temporary file to path and fsyncs the directory. */
rp_status rp_atomic_file_commit(rp_atomic_file *f, rp_error *err);
/* Closes and removes the temporary file unless committed; frees f's names.
 * Safe on a zeroed or already-ended f. */
void rp_atomic_file_end(rp_atomic_file *f);

/* The whole sequence: open, write_fn, seal, commit. On any error path keeps
 * its previous contents (or stays absent) and no temporary file is left. */
rp_status rp_file_write_atomic(const char *path, mode_t mode, rp_file_write_fn write_fn,
                               void *user, rp_error *err);
/* rp_file_write_atomic of a buffer. */
rp_status rp_file_write_atomic_bytes(const char *path, const void *data, size_t bytes,
                                     rp_error *err);

/* write(2) until done (EINTR retried); errno is left set on failure. */
int rp_write_all(int fd, const void *data, size_t bytes);
/* The same with pwrite(2) at a byte offset (the file position is unchanged). */
int rp_pwrite_all(int fd, const void *data, size_t bytes, off_t offset);

/* fsync of a directory (by descriptor or by path), so renames, creations and
 * unlinks inside it survive a crash. Filesystems that cannot fsync a
 * directory (EINVAL, ENOTSUP) are not an error. name is for messages. */
rp_status rp_dir_fsync_fd(int dir_fd, const char *name, rp_error *err);
rp_status rp_dir_fsync(const char *dir, rp_error *err);
/* rp_dir_fsync of the directory holding path ("." when it has no slash). */
rp_status rp_parent_dir_fsync(const char *path, rp_error *err);

/* mkdir -p: makes path and its missing parents with mode (less the umask);
 * an existing directory is fine, an existing non-directory is an error. */
rp_status rp_mkdir_p(const char *path, mode_t mode, rp_error *err);

#endif
