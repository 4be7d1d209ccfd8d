/* Robustness: the profiler's signals never make a system call fail with EINTR.
 *
 * A busy thread burns CPU (so it is sampled) while the main thread does blocking reads of a
 * pipe (fed one byte at a time by a writer thread that sleeps between writes with usleep)
 * and then sleeps with nanosleep and usleep in a loop. Every EINTR seen is counted: read()
 * must be restarted by SA_RESTART, and the sleeping threads use next to no CPU, so per-thread
 * CPU timers should not interrupt them. Prints the counts.
 * Usage: robust_eintr [BYTES, default 3000] [SLEEPS, default 2000]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static atomic_int done;
static int fds[2];
static int bytes;
static atomic_int writer_eintr;
static volatile unsigned long sink;

static void *busy(void *arg) {
  (void)arg;
  unsigned long x = 3;
  while (!atomic_load(&done)) {
    for (int i = 0; i < 100000; i++) x = x * 6364136223846793005UL + 1;
    sink = x;
  }
  return NULL;
}

static void *writer(void *arg) {
  (void)arg;
  for (int i = 0; i < bytes; i++) {
    char c = (char)i;
    while (write(fds[1], &c, 1) < 0) {
      if (errno != EINTR) return NULL;
      atomic_fetch_add(&writer_eintr, 1);
    }
    if (i % 2 == 0 && usleep(100) != 0 && errno == EINTR) atomic_fetch_add(&writer_eintr, 1);
  }
  close(fds[1]);
  return NULL;
}

int main(int argc, char **argv) {
  bytes = argc > 1 ? atoi(argv[1]) : 3000;
  int sleeps = argc > 2 ? atoi(argv[2]) : 2000;
  if (pipe(fds) != 0) return 2;
  pthread_t b, w;
  pthread_create(&b, NULL, busy, NULL);
  pthread_create(&w, NULL, writer, NULL);
  int read_eintr = 0, got = 0;
  unsigned sum = 0;
  for (;;) {
    unsigned char c;
    ssize_t n = read(fds[0], &c, 1);
    if (n == 1) {
      got++;
      sum += c;
    } else if (n == 0) {
      break;
    } else if (errno == EINTR) {
      read_eintr++;
    } else {
      perror("read");
      return 2;
    }
  }
  pthread_join(w, NULL);
  int nanosleep_eintr = 0, usleep_eintr = 0;
  for (int i = 0; i < sleeps; i++) {
    struct timespec ts = {0, 100000};
    if (nanosleep(&ts, NULL) != 0 && errno == EINTR) nanosleep_eintr++;
    if (i % 4 == 0 && usleep(50) != 0 && errno == EINTR) usleep_eintr++;
  }
  atomic_store(&done, 1);
  pthread_join(b, NULL);
  printf("read %d bytes, sum %u\n", got, sum);
  printf("read EINTR: %d\n", read_eintr);
  printf("nanosleep EINTR: %d\n", nanosleep_eintr);
  printf("usleep EINTR: %d\n", usleep_eintr);
  printf("writer EINTR: %d\n", (int)atomic_load(&writer_eintr));
  return 0;
}
