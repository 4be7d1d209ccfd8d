/*
 * threads.c: four named threads that burn CPU in the ratio 1:2:3:4.
 *
 * Ground truth
 * ------------
 * Thread i (i = 1..4) names itself "worker-i" with pthread_setname_np and then
 * runs i units of the same integer work (one unit = UNIT_ITERATIONS iterations
 * of a multiply-xorshift step, see `burn`). The main thread only creates and
 * joins them. So the threads' CPU times are close to 1:2:3:4, but the tests do
 * not rely on that: each thread measures its own CPU time with
 * clock_gettime(CLOCK_THREAD_CPUTIME_ID) after its work and prints
 *
 *     worker-<i> tid=<kernel tid> cpu_ns=<thread CPU time in ns>
 *
 * (one line per thread, in join order, printed by main). A CPU profiler sampling
 * at H Hz must give each thread about cpu_ns * H / 1e9 samples (tagged with its
 * tid), whatever else the machine is doing, since the timers count the thread's
 * CPU time, not wall time.
 *
 * Usage: threads [UNIT_ITERATIONS]  (default 350000000: about 0.5 s of CPU per
 * unit, 5 s in total, on a slow 2-core VM).
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NTHREADS 4

struct worker {
    pthread_t thread;
    int index;           /* 1..NTHREADS: also the number of units */
    uint64_t unit;       /* iterations per unit */
    long tid;            /* filled by the thread */
    uint64_t cpu_ns;     /* filled by the thread */
    uint64_t checksum;   /* filled by the thread */
};

__attribute__((noinline)) static uint64_t burn(uint64_t n, uint64_t x) {
    for (uint64_t i = 0; i < n; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        x ^= x >> 29;
        __asm__ volatile("" : "+r"(x)); /* opaque: no folding */
    }
    return x;
}

static void *run_worker(void *arg) {
    struct worker *w = arg;
    char name[16];
    snprintf(name, sizeof name, "worker-%d", w->index);
    pthread_setname_np(pthread_self(), name);
    w->tid = (long)syscall(SYS_gettid);

    uint64_t x = (uint64_t)w->index;
    for (int u = 0; u < w->index; u++) x = burn(w->unit, x);
    w->checksum = x;

    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    w->cpu_ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    return NULL;
}

int main(int argc, char **argv) {
    uint64_t unit = 350000000ULL;
    if (argc > 1) unit = strtoull(argv[1], NULL, 10);
    struct worker workers[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) {
        workers[i] = (struct worker){.index = i + 1, .unit = unit};
        if (pthread_create(&workers[i].thread, NULL, run_worker, &workers[i]) != 0) {
            perror("pthread_create");
            return 1;
        }
    }
    for (int i = 0; i < NTHREADS; i++) {
        pthread_join(workers[i].thread, NULL);
        printf("worker-%d tid=%ld cpu_ns=%" PRIu64 " checksum=%016" PRIx64 "\n", workers[i].index,
               workers[i].tid, workers[i].cpu_ns, workers[i].checksum);
    }
    return 0;
}
