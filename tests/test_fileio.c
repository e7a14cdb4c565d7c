/* Specification of src/core/fileio.c: an atomically written file appears
 * whole or not at all (a failing writer leaves the old file and no temporary
 * file), mkdir -p makes parents with the mode asked for, and every error
 * names the file or directory and the step that failed. */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/fileio.h"
#include "fs_test_util.h"

typedef struct {
    char dir[64];
    char path[256];
} fixture;

static int setup(void **state) {
    fixture *fx = calloc(1, sizeof *fx);
    if (!fx) return -1;
    strcpy(fx->dir, "/tmp/rp_test_fileio.XXXXXX");
    if (!mkdtemp(fx->dir)) {
        free(fx);
        return -1;
    }
    snprintf(fx->path, sizeof fx->path, "%s/out.bin", fx->dir);
    umask(022);
    *state = fx;
    return 0;
}

static int teardown(void **state) {
    fixture *fx = *state;
    remove_tree(fx->dir);
    free(fx);
    return 0;
}

/* The file's contents as a string (small files only). */
static void read_text(const char *path, char *out, size_t cap) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    size_t n = fread(out, 1, cap - 1, f);
    out[n] = '\0';
    fclose(f);
}

static void test_bytes_written_whole_with_mode_and_no_leftovers(void **state) {
    fixture *fx = *state;
    rp_error err;
    assert_int_equal(rp_file_write_atomic_bytes(fx->path, "first", 5, &err), RP_OK);
    assert_int_equal(rp_file_write_atomic_bytes(fx->path, "second", 6, &err), RP_OK);
    char text[64];
    read_text(fx->path, text, sizeof text);
    assert_string_equal(text, "second");
    struct stat sb;
    assert_int_equal(stat(fx->path, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0644);
    assert_int_equal(count_entries(fx->dir), 1);
}

/* Writes half its bytes, then fails as a full disk would. */
static rp_status failing_writer(int fd, const char *path, void *user, rp_error *err) {
    (void)user;
    assert_int_equal(rp_write_all(fd, "partial", 7), 0);
    return rp_error_set(err, RP_ERR_IO, "%s: disk full (simulated)", path);
}

static void test_failing_writer_keeps_the_old_file_and_no_temporary(void **state) {
    fixture *fx = *state;
    rp_error err;
    assert_int_equal(rp_file_write_atomic_bytes(fx->path, "old", 3, &err), RP_OK);
    assert_int_equal(rp_file_write_atomic(fx->path, 0600, failing_writer, NULL, &err), RP_ERR_IO);
    assert_non_null(strstr(err.msg, "disk full (simulated)"));
    char text[64];
    read_text(fx->path, text, sizeof text);
    assert_string_equal(text, "old");
    assert_int_equal(count_entries(fx->dir), 1);
    /* A failing first write leaves nothing at all. */
    char fresh[300];
    snprintf(fresh, sizeof fresh, "%s/fresh.bin", fx->dir);
    assert_int_equal(rp_file_write_atomic(fresh, 0600, failing_writer, NULL, &err), RP_ERR_IO);
    assert_int_equal(access(fresh, F_OK), -1);
    assert_int_equal(count_entries(fx->dir), 1);
}

static void test_steps_hide_the_file_until_commit(void **state) {
    fixture *fx = *state;
    rp_error err;
    rp_atomic_file f;
    assert_int_equal(rp_atomic_file_open(&f, AT_FDCWD, fx->path, 0600, 0, &err), RP_OK);
    /* Hidden, in the same directory, named after the file. */
    assert_non_null(strstr(f.tmp_path, "/.out.bin.tmp-"));
    assert_int_equal(rp_write_all(f.fd, "abc", 3), 0);
    assert_int_equal(rp_atomic_file_seal(&f, &err), RP_OK);
    assert_int_equal(access(fx->path, F_OK), -1);
    assert_int_equal(rp_atomic_file_commit(&f, &err), RP_OK);
    rp_atomic_file_end(&f);
    char text[64];
    read_text(fx->path, text, sizeof text);
    assert_string_equal(text, "abc");
    struct stat sb;
    assert_int_equal(stat(fx->path, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0600);
    /* Ended before commit: the temporary file goes, the old file stays. */
    assert_int_equal(rp_atomic_file_open(&f, AT_FDCWD, fx->path, 0600, 0, &err), RP_OK);
    assert_int_equal(rp_write_all(f.fd, "xyz!", 4), 0);
    rp_atomic_file_end(&f);
    read_text(fx->path, text, sizeof text);
    assert_string_equal(text, "abc");
    assert_int_equal(count_entries(fx->dir), 1);
}

static void test_relative_to_a_directory_descriptor(void **state) {
    fixture *fx = *state;
    rp_error err;
    int dir = open(fx->dir, O_RDONLY | O_DIRECTORY);
    assert_true(dir >= 0);
    rp_atomic_file f;
    assert_int_equal(rp_atomic_file_open(&f, dir, "rel.bin", 0600, 1, &err), RP_OK);
    assert_int_equal(f.tmp_path[0], '.');
    assert_null(strchr(f.tmp_path, '/'));
    assert_int_equal(rp_write_all(f.fd, "r", 1), 0);
    assert_int_equal(rp_atomic_file_seal(&f, &err), RP_OK);
    assert_int_equal(rp_atomic_file_commit(&f, &err), RP_OK);
    rp_atomic_file_end(&f);
    close(dir);
    char path[300], text[8];
    snprintf(path, sizeof path, "%s/rel.bin", fx->dir);
    read_text(path, text, sizeof text);
    assert_string_equal(text, "r");
}

/* Writing path fails with a message that names `named` and says `why`. */
static void expect_write_error(const char *path, const char *named, const char *why) {
    rp_error err;
    assert_int_equal(rp_file_write_atomic_bytes(path, "x", 1, &err), RP_ERR_IO);
    if (!strstr(err.msg, named) || !strstr(err.msg, why))
        fail_msg("'%s' should name '%s' and say '%s'", err.msg, named, why);
}

static void test_rename_failure_removes_the_temporary(void **state) {
    fixture *fx = *state;
    assert_int_equal(mkdir(fx->path, 0755), 0);  /* a directory where the file goes */
    expect_write_error(fx->path, fx->path, "cannot rename temporary file");
    assert_int_equal(count_entries(fx->dir), 1);
}

static void test_missing_or_unwritable_directory_is_named(void **state) {
    fixture *fx = *state;
    rp_error err;
    char path[300];
    snprintf(path, sizeof path, "%s/no/such/out.bin", fx->dir);
    expect_write_error(path, path, "cannot create temporary file");
    expect_write_error(path, path, "No such file or directory");
    /* A parent that is a file (what root cannot write into either). */
    snprintf(path, sizeof path, "%s/plain", fx->dir);
    assert_int_equal(rp_file_write_atomic_bytes(path, "x", 1, &err), RP_OK);
    snprintf(path, sizeof path, "%s/plain/out.bin", fx->dir);
    expect_write_error(path, path, "Not a directory");
    if (geteuid() != 0) {  /* root writes through permissions */
        char ro[200];
        snprintf(ro, sizeof ro, "%s/readonly", fx->dir);
        assert_int_equal(mkdir(ro, 0555), 0);
        snprintf(path, sizeof path, "%s/out.bin", ro);
        expect_write_error(path, ro, "Permission denied");
        assert_int_equal(count_entries(ro), 0);
    }
    assert_int_equal(count_entries(fx->dir), 1);
}

static void test_mkdir_p_makes_parents_with_mode(void **state) {
    fixture *fx = *state;
    rp_error err;
    char path[300];
    snprintf(path, sizeof path, "%s/a/b/c/", fx->dir);
    assert_int_equal(rp_mkdir_p(path, 0750, &err), RP_OK);
    assert_int_equal(rp_mkdir_p(path, 0750, &err), RP_OK);  /* existing: fine */
    const char *parts[] = {"a", "a/b", "a/b/c"};
    for (int i = 0; i < 3; i++) {
        char p[320];
        snprintf(p, sizeof p, "%s/%s", fx->dir, parts[i]);
        struct stat sb;
        assert_int_equal(stat(p, &sb), 0);
        assert_true(S_ISDIR(sb.st_mode));
        assert_int_equal(sb.st_mode & 0777, 0750);
    }
    /* A file in the way is named. */
    char file[300];
    snprintf(file, sizeof file, "%s/a/b/f", fx->dir);
    assert_int_equal(rp_file_write_atomic_bytes(file, "x", 1, &err), RP_OK);
    snprintf(path, sizeof path, "%s/a/b/f/g", fx->dir);
    assert_int_equal(rp_mkdir_p(path, 0755, &err), RP_ERR_IO);
    assert_non_null(strstr(err.msg, file));
    assert_int_equal(rp_mkdir_p(file, 0755, &err), RP_ERR_IO);
    assert_non_null(strstr(err.msg, "exists and is not a directory"));
}

static void test_dir_fsync_names_the_directory(void **state) {
    fixture *fx = *state;
    rp_error err;
    assert_int_equal(rp_dir_fsync(fx->dir, &err), RP_OK);
    assert_int_equal(rp_parent_dir_fsync(fx->path, &err), RP_OK);
    char path[300];
    snprintf(path, sizeof path, "%s/absent", fx->dir);
    assert_int_equal(rp_dir_fsync(path, &err), RP_ERR_IO);
    assert_non_null(strstr(err.msg, path));
}

#define FX(t) cmocka_unit_test_setup_teardown(t, setup, teardown)

int main(void) {
    const struct CMUnitTest tests[] = {
        FX(test_bytes_written_whole_with_mode_and_no_leftovers),
        FX(test_failing_writer_keeps_the_old_file_and_no_temporary),
        FX(test_steps_hide_the_file_until_commit),
        FX(test_relative_to_a_directory_descriptor),
        FX(test_rename_failure_removes_the_temporary),
        FX(test_missing_or_unwritable_directory_is_named),
        FX(test_mkdir_p_makes_parents_with_mode),
        FX(test_dir_fsync_names_the_directory),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
