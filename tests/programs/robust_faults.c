/* Robustness: a program that must not notice what happens to the collector.
 *
 * Usage: robust_faults PREFIX [ITERATIONS, default 1000] [EXIT_CODE, default 0]
 * Writes PREFIX.pid (its pid) at once, then does ITERATIONS rounds of: about 1 ms of CPU,
 * 200 malloc/free of many different sizes (many distinct heap buckets, so a profiler has a
 * lot to send), and one line written with write(2) to PREFIX.out. It then appends
 * "complete N" to PREFIX.out and writes its own run time (CLOCK_MONOTONIC, nanoseconds) to
 * PREFIX.time, prints "done" and exits with EXIT_CODE. It does not touch SIGPIPE: a write to
 * a dead socket without MSG_NOSIGNAL would kill it and leave PREFIX.out incomplete.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;

static long long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double thread_cpu(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) static void faults_work(double secs) {
  double end = thread_cpu() + secs;
  unsigned long x = 11;
  while (thread_cpu() < end) {
    for (int i = 0; i < 5000; i++) x = x * 6364136223846793005UL + 1;
    sink = x;
  }
}

__attribute__((noinline)) static void faults_alloc(int round) {
  for (int i = 0; i < 200; i++) {
    size_t size = 16 + (size_t)((round * 200 + i) * 37 % 4096);
    char *p = malloc(size);
    p[0] = (char)i;
    sink += (unsigned char)p[0];
    free(p);
  }
}

static void write_file(const char *path, const char *text) {
  char tmp[4096];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) exit(2);
  if (write(fd, text, strlen(text)) != (ssize_t)strlen(text)) exit(2);
  close(fd);
  rename(tmp, path);
}

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  long long start = now_ns();
  const char *prefix = argv[1];
  int iterations = argc > 2 ? atoi(argv[2]) : 1000;
  int code = argc > 3 ? atoi(argv[3]) : 0;
  char path[4096], text[256];
  snprintf(path, sizeof path, "%s.pid", prefix);
  snprintf(text, sizeof text, "%d\n", (int)getpid());
  write_file(path, text);
  snprintf(path, sizeof path, "%s.out", prefix);
  int out = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (out < 0) return 2;
  for (int i = 0; i < iterations; i++) {
    faults_work(0.001);
    faults_alloc(i);
    int n = snprintf(text, sizeof text, "line %d\n", i);
    if (write(out, text, n) != n) return 2;
  }
  int n = snprintf(text, sizeof text, "complete %d\n", iterations);
  if (write(out, text, n) != n) return 2;
  close(out);
  snprintf(path, sizeof path, "%s.time", prefix);
  snprintf(text, sizeof text, "%lld\n", now_ns() - start);
  write_file(path, text);
  printf("done\n");
  return code;
}
