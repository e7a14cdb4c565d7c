/* Scratch-directory helpers shared by the tests that check which files a
 * writer leaves behind (test_fileio, test_safetensors, test_train_data).
 * Header-only so each test links nothing more. */
#ifndef RP_TESTS_FS_TEST_UTIL_H
#define RP_TESTS_FS_TEST_UTIL_H

#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* rm -rf dir (made writable first, for tests that take permissions away). */
static inline int remove_tree(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    struct dirent *ent;
    char child[1024];
    while ((ent = readdir(d)) != NULL) {
        if (strcmp(ent->d_name, ".") == 0 || strcmp(ent->d_name, "..") == 0) continue;
        if (snprintf(child, sizeof child, "%s/%s", dir, ent->d_name) >= (int)sizeof child)
            continue;
        struct stat sb;
        if (lstat(child, &sb) == 0 && S_ISDIR(sb.st_mode)) {
            chmod(child, 0755);
            remove_tree(child);
        } else {
            unlink(child);
        }
    }
    closedir(d);
    return rmdir(dir);
}

/* Entries of dir, hidden ones included (a temporary file counts). */
static inline int count_entries(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *ent;
    while ((ent = readdir(d)) != NULL)
        if (strcmp(ent->d_name, ".") != 0 && strcmp(ent->d_name, "..") != 0) n++;
    closedir(d);
    return n;
}

#endif
