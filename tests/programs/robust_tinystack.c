/* Robustness: code running on small stacks while it is sampled.
 * Usage: robust_tinystack threads|altstack
 *   threads:  8 threads (2 rounds of 4) on PTHREAD_STACK_MIN stacks, each burning about
 *             0.1 s of CPU in tiny_work (with a 1 KiB local buffer) and doing 2000 mallocs.
 *   bypass:   the same, the threads made by libc's own pthread_create (found with dlsym in
 *             libc itself), behind any pthread_create interposer: a profiler does not know
 *             their stack bounds, so it cannot tell how much of their stack is left.
 *   altstack: a SIGUSR1 handler installed with SA_ONSTACK on a SIGSTKSZ sigaltstack burns
 *             about 0.2 s of CPU in altstack_work and mallocs; raised 3 times. The handler
 *             checks that it runs on the alternate stack.
 * Prints deterministic results.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static volatile unsigned long sink;

static double thread_cpu(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) static unsigned long tiny_work(double secs, unsigned long seed) {
  volatile char buf[1024];
  double end = thread_cpu() + secs;
  unsigned long x = seed;
  int n = 0;
  while (thread_cpu() < end || n < 2000) {
    for (int i = 0; i < 2000; i++) x = x * 6364136223846793005UL + 1;
    buf[x % sizeof buf] = (char)x;
    if (n < 2000) {
      char *p = malloc(16 + n % 512);
      p[0] = buf[n % sizeof buf];
      free(p);
      n++;
    }
  }
  return (unsigned long)n;
}

static void *thread_main(void *arg) {
  return (void *)tiny_work(0.1, (unsigned long)arg);
}

typedef int (*create_fn)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);

static int threads(create_fn create) {
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  if (pthread_attr_setstacksize(&attr, PTHREAD_STACK_MIN) != 0) return 2;
  unsigned long total = 0;
  for (int round = 0; round < 2; round++) {
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
      if (create(&t[i], &attr, thread_main, (void *)(unsigned long)(i + 1)) != 0) {
        printf("pthread_create failed\n");
        return 2;
      }
    for (int i = 0; i < 4; i++) {
      void *r;
      pthread_join(t[i], &r);
      total += (unsigned long)r;
    }
  }
  printf("tiny stacks: %lu mallocs done\n", total);
  return 0;
}

static char *alt_base;
static size_t alt_size;
static volatile sig_atomic_t on_alt, runs;

__attribute__((noinline)) static void altstack_work(void) {
  double end = thread_cpu() + 0.2;
  unsigned long x = 17;
  while (thread_cpu() < end) {
    for (int i = 0; i < 2000; i++) x = x * 6364136223846793005UL + 1;
    sink = x;
    free(malloc(16 + x % 256));
  }
}

static void on_usr1(int sig) {
  (void)sig;
  char here;
  if (&here >= alt_base && &here < alt_base + alt_size) on_alt++;
  altstack_work();
  runs++;
}

static int altstack(void) {
  alt_size = SIGSTKSZ;
  alt_base = malloc(alt_size);
  stack_t ss = {.ss_sp = alt_base, .ss_size = alt_size, .ss_flags = 0};
  if (sigaltstack(&ss, NULL) != 0) return 2;
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_usr1;
  sa.sa_flags = SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGUSR1, &sa, NULL);
  for (int i = 0; i < 3; i++) raise(SIGUSR1);
  printf("altstack handler ran %d times, %d on the alternate stack\n", (int)runs, (int)on_alt);
  return 0;
}

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "threads";
  if (strcmp(mode, "threads") == 0) return threads(pthread_create);
  if (strcmp(mode, "bypass") == 0) {
    void *libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
    create_fn create = libc ? (create_fn)dlsym(libc, "pthread_create") : NULL;
    if (!create) return 2;
    return threads(create);
  }
  if (strcmp(mode, "altstack") == 0) return altstack();
  return 2;
}
