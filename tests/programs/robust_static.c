/* Built with -static: a program the profiler cannot enter. Burns about 0.3 s of CPU in
 * static_work, prints "static done" and exits 7. */
#include <stdio.h>
#include <time.h>

static volatile unsigned long sink;

__attribute__((noinline)) void static_work(double secs) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  double end = ts.tv_sec + ts.tv_nsec / 1e9 + secs, now;
  unsigned long x = 13;
  do {
    for (int i = 0; i < 20000; i++) x = x * 6364136223846793005UL + 1;
    sink = x;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    now = ts.tv_sec + ts.tv_nsec / 1e9;
  } while (now < end);
}

int main(void) {
  static_work(0.3);
  printf("static done\n");
  return 7;
}
