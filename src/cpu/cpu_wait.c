/* The OpenMP team's wait policy. libgomp spins ~300000 iterations (milliseconds)
 * in every barrier and after every region before it sleeps, so a 2-thread team
 * on a busy machine burns its time slices spinning for a descheduled partner
 * (docs/perf/cpu.md, "Threads under contention"). libgomp reads GOMP_SPINCOUNT
 * in its constructor, before main(), and glibc sets environ only after a
 * .preinit_array entry runs, so setenv() cannot reach it: the entry below
 * re-executes the program once with GOMP_SPINCOUNT added (same pid, so mpirun
 * and srun keep tracking it), whatever the launcher. */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cpu/cpu_wait.h"

/* Marks the re-executed image, so that it neither loops nor reports the spin
 * count it was given as the user's choice. */
#define CPU_WAIT_MARK "RWKVPIPE_SPIN_SET=1"

static char cpu_wait_description[160] = "libgomp default (re-exec with GOMP_SPINCOUNT failed)";

/* The value of `name` in envp (getenv() does not work yet: environ is set
 * after this entry runs). */
static const char *cpu_wait_env(char **envp, const char *name) {
    size_t len = strlen(name);
    for (size_t i = 0; envp && envp[i]; i++)
        if (strncmp(envp[i], name, len) == 0 && envp[i][len] == '=') return envp[i] + len + 1;
    return NULL;
}

static void cpu_wait_preinit(int argc, char **argv, char **envp) {
    (void)argc;
    const char *policy = cpu_wait_env(envp, "OMP_WAIT_POLICY");
    const char *spin = cpu_wait_env(envp, "GOMP_SPINCOUNT");
    const char *mark = cpu_wait_env(envp, "RWKVPIPE_SPIN_SET");
    if (mark && spin && !policy) {
        snprintf(cpu_wait_description, sizeof cpu_wait_description,
                 "bounded spin (GOMP_SPINCOUNT=%s)", spin);
        return;
    }
    if (policy || spin) {
        /* The user's choice wins; say so in the logs. */
        snprintf(cpu_wait_description, sizeof cpu_wait_description,
                 "%s%s%s%s%s (from the environment)", policy ? "OMP_WAIT_POLICY=" : "",
                 policy ? policy : "", policy && spin ? " " : "", spin ? "GOMP_SPINCOUNT=" : "",
                 spin ? spin : "");
        return;
    }
    size_t n = 0;
    while (envp && envp[n]) n++;
    /* On the stack: no allocator is needed this early. Both variables stay in
     * the environment, so child processes get the same bounded spin. */
    char *env[n + 3];
    for (size_t i = 0; i < n; i++) env[i] = envp[i];
    env[n] = "GOMP_SPINCOUNT=" RP_CPU_SPINCOUNT;
    env[n + 1] = CPU_WAIT_MARK;
    env[n + 2] = NULL;
    execve("/proc/self/exe", argv, env);
    /* No /proc or no exec permission: run on with libgomp's default; the
     * description says so. */
}

/* Only executables have a .preinit_array; librwkvpipe is a static archive, so
 * this lands in each program that links the CPU backend (rp_cpu_backend_create
 * references rp_cpu_wait_policy, which pulls this object in). */
__attribute__((section(".preinit_array"), used)) static void (*cpu_wait_preinit_entry)(
    int, char **, char **) = cpu_wait_preinit;

const char *rp_cpu_wait_policy(void) {
    return cpu_wait_description;
}
