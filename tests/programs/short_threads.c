/* Ground truth for sampling threads that live less than a scheduler tick.
 * Usage: short_threads [THREADS, default 10000]
 * Creates THREADS threads, 4 at a time, and joins them. Even-numbered ones run short_a, odd
 * ones short_b, which does twice the work: about 0.3 and 0.6 ms of CPU (well under a
 * millisecond, the sampling period at 1000 Hz, and under a 4 ms scheduler tick).
 * Each thread measures the CPU time of its function with its own CPU clock; the totals are
 * printed at the end, as "short_a NS" and "short_b NS" lines, for the test to compare with
 * the profile.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long long thread_cpu_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec * 1000000000LL + t.tv_nsec;
}

__attribute__((noinline)) static unsigned long spin(unsigned long seed, int rounds) {
  volatile unsigned long x = seed;
  for (int i = 0; i < rounds; i++) x = x * 6364136223846793005UL + 1442695040888963407UL;
  return x;
}

__attribute__((noinline)) static unsigned long short_a(unsigned long seed) {
  return spin(seed, 230000);
}

__attribute__((noinline)) static unsigned long short_b(unsigned long seed) {
  return spin(seed, 460000);
}

struct job {
  unsigned long seed;
  long long cpu_ns;
  unsigned long result;
};

static void *thread_main(void *arg) {
  struct job *job = arg;
  long long start = thread_cpu_ns();
  job->result = (job->seed & 1) ? short_b(job->seed) : short_a(job->seed);
  job->cpu_ns = thread_cpu_ns() - start;
  return NULL;
}

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 10000;
  long long total[2] = {0, 0};
  unsigned long sum = 0;
  for (int i = 0; i < n; i += 4) {
    pthread_t t[4];
    struct job jobs[4];
    int k = 0;
    for (; k < 4 && i + k < n; k++) {
      jobs[k].seed = (unsigned long)(i + k);
      if (pthread_create(&t[k], NULL, thread_main, &jobs[k]) != 0) {
        printf("pthread_create failed at %d\n", i + k);
        return 2;
      }
    }
    for (int j = 0; j < k; j++) {
      pthread_join(t[j], NULL);
      total[jobs[j].seed & 1] += jobs[j].cpu_ns;
      sum += jobs[j].result;
    }
  }
  printf("short_a %lld\nshort_b %lld\nchecksum %lx\n", total[0], total[1], sum);
  return 0;
}
