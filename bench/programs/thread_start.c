/* Thread start cost: creates and joins THREADS threads one after the other, each doing a
 * microsecond of work, and prints the wall-clock microseconds per thread as
 * "us_per_thread=X". Usage: thread_start [THREADS, default 20000]
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static void *work(void *arg) {
  volatile int x = 0;
  for (int i = 0; i < 2000; i++) x += i;
  return arg;
}

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 20000;
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (int i = 0; i < n; i++) {
    pthread_t t;
    if (pthread_create(&t, NULL, work, NULL) != 0) return 1;
    pthread_join(t, NULL);
  }
  clock_gettime(CLOCK_MONOTONIC, &b);
  printf("us_per_thread=%.2f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 1e3 / n);
  return 0;
}
