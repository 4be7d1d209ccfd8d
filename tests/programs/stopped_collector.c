/*
 * CPU work with the deepest stacks the profiler records, until told to stop: the program of
 * the stopped-collector test (tests/tests/robustness.rs). Every CPU sample then takes the most
 * room in the shared region's message ring, so a collector that is stopped while this runs
 * lets the ring fill up in the fewest CPU-seconds.
 *
 *   stopped_collector FLAG THREADS
 *       THREADS threads spin at the bottom of a 200-deep recursion (deeper than the profiler's
 *       128 frames) until the file FLAG exists, then the program prints "done" and exits 0.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static const char *flag;
static volatile unsigned long sink;

__attribute__((noinline)) static unsigned long spin_deep(int depth) {
    if (depth > 0) {
        unsigned long r = spin_deep(depth - 1);
        __asm__ volatile("" : : "r"(r) : "memory");
        return r + 1;
    }
    unsigned long x = 1;
    while (access(flag, F_OK) != 0)
        for (int i = 0; i < 200000; i++) x = x * 6364136223846793005UL + 1;
    return x;
}

static void *run(void *arg) {
    (void)arg;
    sink = spin_deep(200);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s FLAG THREADS\n", argv[0]);
        return 2;
    }
    flag = argv[1];
    int threads = atoi(argv[2]);
    pthread_t ids[64];
    if (threads < 1 || threads > 64) return 2;
    for (int i = 0; i < threads; i++) pthread_create(&ids[i], NULL, run, NULL);
    for (int i = 0; i < threads; i++) pthread_join(ids[i], NULL);
    puts("done");
    return 0;
}
