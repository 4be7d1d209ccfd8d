/* Sudden death by a crash: a program that allocates at a known site and then dies of SIGSEGV
 * or SIGABRT, and a parent that reports how its child died.
 *
 * Usage: death_crash segv|abort
 *   Prints "rlimit_core=SOFT/HARD dumpable=N" (getrlimit(RLIMIT_CORE) with -1 for
 *   unlimited, prctl(PR_GET_DUMPABLE)), allocates 100 blocks of 1000 + i bytes at
 *   before_crash (kept live), prints "before_crash usable=N" (their total
 *   malloc_usable_size, the size a heap profile reports), then writes through a null
 *   pointer (segv) or calls abort() (abort).
 * Usage: death_crash run segv|abort
 *   Forks, execs "death_crash MODE" (this same executable, /proc/self/exe) in the child,
 *   waits and prints "child: signal N core C" (WTERMSIG and WCOREDUMP of its status) or
 *   "child: exit N". Exits 0.
 * The core file (if the core limit allows one) goes where the kernel's core_pattern says;
 * the test runs it in a scratch directory.
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

static void *kept[100];

__attribute__((noinline)) static void before_crash(void) {
  for (int i = 0; i < 100; i++) {
    kept[i] = malloc(1000 + i);
    memset(kept[i], i, 1000 + i);
  }
}

static long long lim(rlim_t v) { return v == RLIM_INFINITY ? -1 : (long long)v; }

static int crash(const char *mode) {
  struct rlimit rl;
  getrlimit(RLIMIT_CORE, &rl);
  printf("rlimit_core=%lld/%lld dumpable=%d\n", lim(rl.rlim_cur), lim(rl.rlim_max),
         prctl(PR_GET_DUMPABLE, 0, 0, 0, 0));
  fflush(stdout);
  before_crash();
  size_t usable = 0;
  for (int i = 0; i < 100; i++) usable += malloc_usable_size(kept[i]);
  printf("before_crash usable=%zu\n", usable);
  fflush(stdout);
  if (strcmp(mode, "segv") == 0) {
    volatile int *null = NULL;
    *null = 1;
  } else if (strcmp(mode, "abort") == 0) {
    abort();
  }
  fprintf(stderr, "death_crash: unknown mode %s\n", mode);
  return 2;
}

int main(int argc, char **argv) {
  if (argc == 2) return crash(argv[1]);
  if (argc == 3 && strcmp(argv[1], "run") == 0) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
      execl("/proc/self/exe", "death_crash", argv[2], (char *)NULL);
      _exit(127);
    }
    int status;
    if (waitpid(pid, &status, 0) != pid) return 2;
    if (WIFSIGNALED(status))
      printf("child: signal %d core %d\n", WTERMSIG(status), WCOREDUMP(status) ? 1 : 0);
    else
      printf("child: exit %d\n", WEXITSTATUS(status));
    return 0;
  }
  fprintf(stderr, "usage: death_crash segv|abort | death_crash run segv|abort\n");
  return 2;
}
