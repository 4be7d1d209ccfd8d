/* Robustness: unshare(CLONE_NEWUSER) in a single-threaded program.
 * Burns a little CPU and allocates (so a profiler is active), calls unshare(CLONE_NEWUSER),
 * then keeps working (CPU, malloc, a thread) and prints the outcome. Exit 0 if unshare
 * succeeded, 1 if not.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;

static double thread_cpu(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) static void unshare_work(double secs) {
  double end = thread_cpu() + secs;
  unsigned long x = 9;
  while (thread_cpu() < end) {
    for (int i = 0; i < 20000; i++) x = x * 6364136223846793005UL + 1;
    sink = x;
    free(malloc(100 + x % 1000));
  }
}

static void *thread_main(void *arg) {
  unshare_work(0.05);
  return arg;
}

int main(void) {
  unshare_work(0.2);
  int rc = unshare(CLONE_NEWUSER);
  int err = errno;
  if (rc == 0) printf("unshare(CLONE_NEWUSER): ok\n");
  else printf("unshare(CLONE_NEWUSER): failed: %s\n", strerror(err));
  fflush(stdout);
  unshare_work(0.2);
  pthread_t t;
  void *ret = NULL;
  if (pthread_create(&t, NULL, thread_main, (void *)42) != 0 || pthread_join(t, &ret) != 0) {
    printf("thread after unshare: failed\n");
    return 2;
  }
  printf("thread after unshare: %s\n", ret == (void *)42 ? "ok" : "WRONG");
  return rc == 0 ? 0 : 1;
}
