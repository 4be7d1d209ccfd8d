/* Sudden death, CPU: burns CPU in one known function until it is killed.
 *
 * Prints "burning pid=PID cpu_ns=N" (N: the thread's CPU time just before it starts to burn)
 * and then spins in burn() forever; the test reads the thread's CPU time from
 * /proc/PID/task/PID/schedstat right before it sends SIGKILL. Ground truth: every sample
 * of the main thread after start-up is in burn().
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;

__attribute__((noinline)) static void burn(void) {
  unsigned long x = 1;
  for (;;) {
    for (int i = 0; i < 100000; i++) x = x * 6364136223846793005UL + 1442695040888963407UL;
    sink = x;
  }
}

int main(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  printf("burning pid=%d cpu_ns=%lld\n", (int)getpid(),
         (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
  fflush(stdout);
  burn();
}
