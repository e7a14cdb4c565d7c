/* How the CPU backend's OpenMP team waits between parallel regions: a bounded
 * spin, set before libgomp reads its environment (cpu_wait.c). */
#ifndef RP_CPU_WAIT_H
#define RP_CPU_WAIT_H

/* The spin count the backend gives libgomp when the user set neither
 * OMP_WAIT_POLICY nor GOMP_SPINCOUNT: libgomp's own choice for a team with
 * more threads than CPUs, about 10-50 us of spinning before a futex sleep. */
#define RP_CPU_SPINCOUNT "1000"

/* One line for logs: the wait policy this process's libgomp started with and
 * who chose it, e.g. "bounded spin (GOMP_SPINCOUNT=1000)" or "OMP_WAIT_POLICY=active
 * (from the environment)". */
const char *rp_cpu_wait_policy(void);

#endif
