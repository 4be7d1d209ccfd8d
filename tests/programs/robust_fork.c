/* Robustness: a forked child is profiled as a process of its own.
 *
 * The parent forks once. The child first allocates from child_alloc (so that its heap data is
 * sent early), then burns CPU in child_work, then leaves with exit(0) (so its exit hooks run).
 * The parent meanwhile burns CPU in parent_work and then waits for the child.
 * Ground truth: child_work runs only in the child, parent_work only in the parent;
 * child_alloc allocates only in the child.
 * Usage: robust_fork [SECONDS of CPU per side, default 0.6]. Exit 0 if the child exited 0.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;
static void *volatile keep[64];

static double thread_cpu(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) void burn_until(double secs, unsigned long seed) {
  double end = thread_cpu() + secs;
  unsigned long x = seed;
  while (thread_cpu() < end) {
    for (int i = 0; i < 20000; i++) x = x * 6364136223846793005UL + 1442695040888963407UL;
    sink = x;
  }
}

__attribute__((noinline)) void child_alloc(void) {
  /* 64 blocks of 256 KiB: 16 MiB, about 32 samples at the default 512KiB rate. */
  for (int i = 0; i < 64; i++) {
    keep[i] = malloc(256 * 1024);
    ((volatile char *)keep[i])[0] = (char)i;
  }
}

__attribute__((noinline)) void child_work(double secs) {
  burn_until(secs, 1);
  sink += 1;
}

__attribute__((noinline)) void parent_work(double secs) {
  burn_until(secs, 2);
  sink += 2;
}

int main(int argc, char **argv) {
  double secs = argc > 1 ? atof(argv[1]) : 0.6;
  printf("forking\n");
  fflush(stdout);
  pid_t pid = fork();
  if (pid < 0) {
    perror("fork");
    return 2;
  }
  if (pid == 0) {
    child_alloc();
    child_work(secs);
    for (int i = 0; i < 64; i++) free(keep[i]);
    exit(0);
  }
  parent_work(secs);
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) {
    perror("waitpid");
    return 2;
  }
  printf("child exited %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
  return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
