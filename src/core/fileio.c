/* Atomic writes, directory fsync and mkdir -p (fileio.h). The temporary name
 * is hidden and unique (pid and a counter, created with O_EXCL), so two
 * writers of one path never share a temporary file and directory listings
 * that look for a suffix never see a half-written file. */
#include "core/fileio.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { STAGE_OPEN, STAGE_SEALED, STAGE_COMMITTED };

/* offset < 0: write(2) at the file position; else pwrite(2) at offset. */
static int write_fully(int fd, const void *data, size_t bytes, off_t offset) {
    const unsigned char *p = data;
    while (bytes > 0) {
        ssize_t n = offset < 0 ? write(fd, p, bytes) : pwrite(fd, p, bytes, offset);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        if (n == 0) {
            errno = EIO;
            return -1;
        }
        p += n;
        bytes -= (size_t)n;
        if (offset >= 0) offset += n;
    }
    return 0;
}

int rp_write_all(int fd, const void *data, size_t bytes) {
    return write_fully(fd, data, bytes, -1);
}

int rp_pwrite_all(int fd, const void *data, size_t bytes, off_t offset) {
    if (offset < 0) {
        errno = EINVAL;
        return -1;
    }
    return write_fully(fd, data, bytes, offset);
}

rp_status rp_dir_fsync_fd(int dir_fd, const char *name, rp_error *err) {
    if (fsync(dir_fd) != 0 && errno != EINVAL && errno != ENOTSUP)
        return rp_error_set(err, RP_ERR_IO, "%s: cannot fsync directory: %s (what was written "
                            "in it may not survive a crash)", name, strerror(errno));
    return RP_OK;
}

rp_status rp_dir_fsync(const char *dir, rp_error *err) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return rp_error_set(err, RP_ERR_IO, "%s: cannot open directory to fsync it: %s", dir,
                            strerror(errno));
    rp_status st = rp_dir_fsync_fd(fd, dir, err);
    close(fd);
    return st;
}

/* The directory part of path, malloc'ed: "." without a slash, "/" for "/x". */
static char *parent_of(const char *path) {
    const char *slash = strrchr(path, '/');
    if (!slash) return strdup(".");
    if (slash == path) return strdup("/");
    return strndup(path, (size_t)(slash - path));
}

rp_status rp_parent_dir_fsync(const char *path, rp_error *err) {
    char *dir = parent_of(path);
    if (!dir) return rp_error_set(err, RP_ERR_NOMEM, "%s: out of memory", path);
    rp_status st = rp_dir_fsync(dir, err);
    free(dir);
    return st;
}

rp_status rp_mkdir_p(const char *path, mode_t mode, rp_error *err) {
    if (!path || !*path)
        return rp_error_set(err, RP_ERR_ARG, "cannot create a directory: empty path");
    char *buf = strdup(path);
    if (!buf) return rp_error_set(err, RP_ERR_NOMEM, "%s: out of memory", path);
    rp_status st = RP_OK;
    /* Each prefix ending before a slash, then the whole path. */
    for (char *p = buf + 1;; p++) {
        if (*p != '/' && *p != '\0') continue;
        const char saved = *p;
        *p = '\0';
        struct stat sb;
        if (mkdir(buf, mode) != 0 && errno != EEXIST) {
            st = rp_error_set(err, RP_ERR_IO, "%s: cannot create directory: %s", buf,
                              strerror(errno));
        } else if (stat(buf, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
            st = rp_error_set(err, RP_ERR_IO, "%s: exists and is not a directory", buf);
        }
        *p = saved;
        if (st != RP_OK || saved == '\0') break;
    }
    free(buf);
    return st;
}

/* ".NAME.tmp-PID-N" in the directory of path. */
static char *temp_name(const char *path, unsigned n) {
    const char *slash = strrchr(path, '/');
    const int dir_len = slash ? (int)(slash - path + 1) : 0;
    const char *base = path + dir_len;
    size_t cap = strlen(path) + 64;
    char *tmp = malloc(cap);
    if (tmp) snprintf(tmp, cap, "%.*s.%s.tmp-%ld-%u", dir_len, path, base, (long)getpid(), n);
    return tmp;
}

rp_status rp_atomic_file_open(rp_atomic_file *f, int dir_fd, const char *path, mode_t mode,
                              int nofollow, rp_error *err) {
    static atomic_uint counter;
    memset(f, 0, sizeof *f);
    f->fd = -1;
    f->dir_fd = dir_fd;
    f->stage = STAGE_OPEN;
    if (!path || !*path || path[strlen(path) - 1] == '/')
        return rp_error_set(err, RP_ERR_ARG, "'%s': not a file name to write", path ? path : "");
    f->path = strdup(path);
    if (!f->path) return rp_error_set(err, RP_ERR_NOMEM, "%s: out of memory", path);
    const int flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | (nofollow ? O_NOFOLLOW : 0);
    int saved = 0;
    for (int attempt = 0; f->fd < 0 && attempt < 16; attempt++) {
        free(f->tmp_path);
        f->tmp_path = temp_name(path, atomic_fetch_add(&counter, 1));
        if (!f->tmp_path) {
            rp_atomic_file_end(f);
            return rp_error_set(err, RP_ERR_NOMEM, "%s: out of memory", path);
        }
        f->fd = openat(dir_fd, f->tmp_path, flags, mode);
        saved = errno;
        if (f->fd < 0 && saved != EEXIST) break;
    }
    if (f->fd < 0) {
        rp_status st = rp_error_set(err, RP_ERR_IO, "%s: cannot create temporary file '%s': %s",
                                    path, f->tmp_path, strerror(saved));
        free(f->tmp_path);
        f->tmp_path = NULL;  /* nothing to remove */
        rp_atomic_file_end(f);
        return st;
    }
    return RP_OK;
}

rp_status rp_atomic_file_seal(rp_atomic_file *f, rp_error *err) {
    if (f->stage != STAGE_OPEN || f->fd < 0)
        return rp_error_set(err, RP_ERR_INTERNAL, "%s: sealed twice or not open", f->path);
    const char *step = "fsync";
    int rc = fsync(f->fd);
    int saved = errno;
    if (close(f->fd) != 0 && rc == 0) {
        step = "close";
        saved = errno;
        rc = -1;
    }
    f->fd = -1;
    if (rc != 0)
        return rp_error_set(err, RP_ERR_IO, "%s: cannot %s temporary file '%s': %s", f->path,
                            step, f->tmp_path, strerror(saved));
    f->stage = STAGE_SEALED;
    return RP_OK;
}

rp_status rp_atomic_file_commit(rp_atomic_file *f, rp_error *err) {
    if (f->stage != STAGE_SEALED)
        return rp_error_set(err, RP_ERR_INTERNAL, "%s: committed before sealing", f->path);
    if (renameat(f->dir_fd, f->tmp_path, f->dir_fd, f->path) != 0)
        return rp_error_set(err, RP_ERR_IO, "%s: cannot rename temporary file '%s' to it: %s",
                            f->path, f->tmp_path, strerror(errno));
    f->stage = STAGE_COMMITTED;
    if (f->dir_fd != AT_FDCWD) {
        /* The file's directory is dir_fd itself unless path has a slash. */
        if (!strchr(f->path, '/')) return rp_dir_fsync_fd(f->dir_fd, f->path, err);
        char *dir = parent_of(f->path);
        int fd = dir ? openat(f->dir_fd, dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
        free(dir);
        if (fd < 0)
            return rp_error_set(err, RP_ERR_IO, "%s: written, but its directory cannot be "
                                "opened to fsync it", f->path);
        rp_status st = rp_dir_fsync_fd(fd, f->path, err);
        close(fd);
        return st;
    }
    return rp_parent_dir_fsync(f->path, err);
}

void rp_atomic_file_end(rp_atomic_file *f) {
    if (!f) return;
    if (f->fd >= 0) close(f->fd);
    if (f->tmp_path && f->path && f->stage != STAGE_COMMITTED)
        unlinkat(f->dir_fd, f->tmp_path, 0);
    free(f->path);
    free(f->tmp_path);
    f->path = f->tmp_path = NULL;
    f->fd = -1;
}

rp_status rp_file_write_atomic(const char *path, mode_t mode, rp_file_write_fn write_fn,
                               void *user, rp_error *err) {
    rp_atomic_file f;
    rp_status st = rp_atomic_file_open(&f, AT_FDCWD, path, mode, 0, err);
    if (st != RP_OK) return st;
    st = write_fn(f.fd, path, user, err);
    if (st == RP_OK) st = rp_atomic_file_seal(&f, err);
    if (st == RP_OK) st = rp_atomic_file_commit(&f, err);
    rp_atomic_file_end(&f);
    return st;
}

typedef struct {
    const void *data;
    size_t bytes;
} bytes_view;

static rp_status write_bytes(int fd, const char *path, void *user, rp_error *err) {
    const bytes_view *v = user;
    if (rp_write_all(fd, v->data, v->bytes) != 0)
        return rp_error_set(err, RP_ERR_IO, "%s: cannot write temporary file: %s", path,
                            strerror(errno));
    return RP_OK;
}

rp_status rp_file_write_atomic_bytes(const char *path, const void *data, size_t bytes,
                                     rp_error *err) {
    bytes_view v = {data, bytes};
    return rp_file_write_atomic(path, 0644, write_bytes, &v, err);
}
