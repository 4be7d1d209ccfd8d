/* The floor of any malloc interposer, for `make bench` (bench/heap_overhead.py).
 *
 * A preload that defines malloc, free, calloc and realloc and does nothing but call glibc's
 * own (`__libc_*`, exported for exactly this). What it costs a program is what interposition
 * itself costs: one more jump per call through the PLT and a body that cannot be inlined.
 * Everything anyprof adds beyond this row is its own work: exact counters, the sampling
 * countdown and the free filter. Build: cc -O2 -shared -fPIC forward_malloc.c
 *
 * Built with -DIDLE_THREAD it also starts one thread that only sleeps, as any profiler that
 * keeps a thread of its own does (anyprof's drains the rings). glibc's malloc takes its arena
 * lock only once a process has a second thread, so this row is the floor of such a profiler.
 */
#include <stddef.h>
#ifdef IDLE_THREAD
#include <pthread.h>
#include <unistd.h>

static void *idle(void *arg) {
  (void)arg;
  for (;;) pause();
  return NULL;
}

__attribute__((constructor)) static void start_idle_thread(void) {
  pthread_t t;
  if (pthread_create(&t, NULL, idle, NULL) == 0) pthread_detach(t);
}
#endif

extern void *__libc_malloc(size_t size);
extern void __libc_free(void *p);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t size);

void *malloc(size_t size) { return __libc_malloc(size); }
void free(void *p) { __libc_free(p); }
void *calloc(size_t n, size_t size) { return __libc_calloc(n, size); }
void *realloc(void *p, size_t size) { return __libc_realloc(p, size); }
