/* Robustness: threads that start and exit while being sampled.
 * Usage: robust_thread_churn [THREADS, default 2000]
 * Creates THREADS short-lived threads, 4 at a time, each doing a little CPU work in
 * churn_work and an allocation, and joins them. Prints a checksum of their results.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((noinline)) static unsigned long churn_work(unsigned long seed) {
  volatile unsigned long x = seed;
  for (int i = 0; i < 100000; i++) x = x * 6364136223846793005UL + 1442695040888963407UL;
  return x;
}

static void *thread_main(void *arg) {
  unsigned long seed = (unsigned long)arg;
  unsigned long r = churn_work(seed);
  char *p = malloc(32 + seed % 4000);
  if (!p) return NULL;
  memset(p, (int)(r & 0xff), 16);
  r ^= (unsigned char)p[3];
  free(p);
  return (void *)r;
}

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 2000;
  unsigned long sum = 0;
  int created = 0;
  for (int i = 0; i < n; i += 4) {
    pthread_t t[4];
    int k = 0;
    for (; k < 4 && i + k < n; k++) {
      if (pthread_create(&t[k], NULL, thread_main, (void *)(unsigned long)(i + k + 1)) != 0) {
        printf("pthread_create failed at %d\n", i + k);
        return 2;
      }
      created++;
    }
    for (int j = 0; j < k; j++) {
      void *ret;
      pthread_join(t[j], &ret);
      sum += (unsigned long)ret;
    }
  }
  printf("%d threads, checksum %lx\n", created, sum);
  return 0;
}
