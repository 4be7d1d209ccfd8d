/* Built with -static: a program the profiler cannot enter (the tests also build it
 * dynamically, as a program it can). Burns about 0.3 s of CPU in static_work, prints
 * "static done" and exits 7.
 *
 * With the argument `echo` it first copies its stdin to stdout and says on stderr how many
 * bytes it read ("static read N bytes"), so a test can see that stdin, stdout and stderr
 * reach it untouched. Any other argument (a script path, when it is a `#!` interpreter) is
 * ignored. */
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "echo") == 0) {
    char buf[4096];
    long total = 0;
    ssize_t n;
    while ((n = read(0, buf, sizeof buf)) > 0) {
      fwrite(buf, 1, (size_t)n, stdout);
      total += n;
    }
    fprintf(stderr, "static read %ld bytes\n", total);
  }
  static_work(0.3);
  printf("static done\n");
  return 7;
}
