/* Ground truth for a thread that runs with every signal blocked (as worker threads often do).
 * Usage: blocked_worker
 * The worker spins in spin_free for a moment, blocks every signal, spins about a second in
 * spin_blocked, reads how many signals are queued for this user (the first number of SigQ in
 * /proc/thread-self/status), unblocks, and spins again. It prints the queued count as
 * "queued N" on stderr (not stdout, which must not depend on the profiler) and its own CPU
 * time as "worker_cpu NS" on stderr as well.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

__attribute__((noinline)) static unsigned long spin(unsigned long rounds) {
  volatile unsigned long x = 1;
  for (unsigned long i = 0; i < rounds; i++) x = x * 6364136223846793005UL + 1442695040888963407UL;
  return x;
}

__attribute__((noinline)) static unsigned long spin_free(unsigned long rounds) { return spin(rounds); }

__attribute__((noinline)) static unsigned long spin_blocked(unsigned long rounds) {
  return spin(rounds);
}

static long queued_signals(void) {
  FILE *f = fopen("/proc/thread-self/status", "r");
  char line[256];
  long n = -1;
  if (!f) return -1;
  while (fgets(line, sizeof line, f))
    if (!strncmp(line, "SigQ:", 5)) n = strtol(line + 5, NULL, 10);
  fclose(f);
  return n;
}

static void *worker(void *arg) {
  sigset_t all;
  struct timespec t;
  unsigned long r = spin_free(20000000);
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, NULL);
  r += spin_blocked(1000000000UL);
  long queued = queued_signals();
  pthread_sigmask(SIG_UNBLOCK, &all, NULL);
  r += spin_free(150000000);
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  fprintf(stderr, "queued %ld\nworker_cpu %lld\n", queued, t.tv_sec * 1000000000LL + t.tv_nsec);
  *(unsigned long *)arg = r;
  return NULL;
}

int main(void) {
  pthread_t t;
  unsigned long r = 0;
  pthread_create(&t, NULL, worker, &r);
  pthread_join(t, NULL);
  printf("done %lx\n", r);
  return 0;
}
