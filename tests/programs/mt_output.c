/*
 * mt_output.c: a multithreaded program with deterministic output, for the
 * transparency tests.
 *
 * Ground truth
 * ------------
 * Four threads each burn a fixed amount of CPU (so a profiler has something to
 * sample while they run) and compute a checksum that depends only on their index.
 * They then print, strictly in turn (a mutex and condition variable pass the
 * turn from thread 1 to thread 4), one line to stdout (flushed before the turn
 * passes) and one to stderr (unbuffered). main prints a summary to both streams
 * and exits with status 7.
 *
 * So stdout, stderr and the exit status are the same bytes on every run, and a
 * profiler that is transparent (LD_PRELOAD library and `anyprof record -q`) must
 * not change them.
 *
 * Usage: mt_output [ITERATIONS_PER_THREAD]  (default 100000000, about 0.15 s of CPU
 * per thread on a slow 2-core VM).
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define NTHREADS 4

static pthread_mutex_t turn_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t turn_changed = PTHREAD_COND_INITIALIZER;
static int turn = 1; /* index of the thread allowed to print next */
static uint64_t iterations = 100000000ULL;

__attribute__((noinline)) static uint64_t burn(uint64_t n, uint64_t x) {
    for (uint64_t i = 0; i < n; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        x ^= x >> 29;
        __asm__ volatile("" : "+r"(x)); /* opaque: no folding */
    }
    return x;
}

static void *run(void *arg) {
    int index = (int)(intptr_t)arg;
    uint64_t checksum = burn(iterations, (uint64_t)index);

    pthread_mutex_lock(&turn_lock);
    while (turn != index) pthread_cond_wait(&turn_changed, &turn_lock);
    printf("thread %d: checksum %016" PRIx64 "\n", index, checksum);
    fflush(stdout);
    fprintf(stderr, "thread %d done (%d of %d)\n", index, index, NTHREADS);
    turn++;
    pthread_cond_broadcast(&turn_changed);
    pthread_mutex_unlock(&turn_lock);
    return (void *)(uintptr_t)(checksum & 0xff);
}

int main(int argc, char **argv) {
    if (argc > 1) iterations = strtoull(argv[1], NULL, 10);
    pthread_t threads[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) {
        if (pthread_create(&threads[i], NULL, run, (void *)(intptr_t)(i + 1)) != 0) {
            perror("pthread_create");
            return 1;
        }
    }
    unsigned low_bytes = 0;
    for (int i = 0; i < NTHREADS; i++) {
        void *ret;
        pthread_join(threads[i], &ret);
        low_bytes += (unsigned)(uintptr_t)ret;
    }
    printf("all %d threads joined, low bytes sum %u\n", NTHREADS, low_bytes);
    fprintf(stderr, "exiting with status 7\n");
    return 7;
}
