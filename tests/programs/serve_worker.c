/*
 * serve_worker.c: a long-running service for the `anyprof serve` tests. It burns CPU in
 * one named function, allocates from another, and has a second, named thread, so that
 * every endpoint of the daemon has something known to show.
 *
 * Ground truth
 * ------------
 * The main thread runs 10 ms periods until SECONDS have passed (0 = until killed):
 *   - `serve_hot_spin` burns BUSY_PERCENT % of the period (integer work, measured with
 *     CLOCK_MONOTONIC), so a CPU profile of the process has its samples there;
 *   - `serve_alloc_site` then mallocs 8 blocks of 64 KiB (below glibc's mmap threshold)
 *     into a ring of 128 slots, freeing the block it replaces. That is 51 MB/s allocated
 *     (about 100 heap samples a second at the default 512 KiB rate) and 8 MiB live, all of
 *     it allocated by `serve_alloc_site` (the blocks are written after malloc returns, so
 *     the call is not a tail call and the function is on the stack of every sample);
 *   - it sleeps for the rest of the period.
 * A second thread names itself "serve-helper" (pthread_setname_np) and wakes every 20 ms
 * in `serve_helper_loop`, doing a little work.
 *
 * The program prints `ready pid=<pid>` on stdout (flushed) once both threads run, and
 * exits 0 when the time is up.
 *
 * Usage: serve_worker [SECONDS [BUSY_PERCENT [ANY MORE ARGUMENTS...]]]
 *        (defaults 0 and 50; extra arguments are ignored, the tests use them to check
 *        /debug/pprof/cmdline).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SLOTS 128
#define BLOCKS_PER_PERIOD 8
#define BLOCK_SIZE (64 * 1024)
#define PERIOD_NS 10000000LL

static void *ring[SLOTS];
static unsigned ring_next;
static volatile uint64_t sink;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The CPU-hot function: integer work until `until_ns`. */
__attribute__((noinline)) void serve_hot_spin(int64_t until_ns) {
    uint64_t x = sink | 1;
    do {
        for (int i = 0; i < 20000; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
    } while (now_ns() < until_ns);
    sink = x;
}

/* The allocating function: every heap sample of the program is taken in here. */
__attribute__((noinline)) void serve_alloc_site(unsigned count) {
    for (unsigned i = 0; i < count; i++) {
        unsigned slot = ring_next++ % SLOTS;
        free(ring[slot]);
        char *p = malloc(BLOCK_SIZE);
        if (p == NULL) {
            abort();
        }
        /* Using the block after malloc returns keeps the call from being a tail call. */
        p[0] = (char)i;
        p[BLOCK_SIZE - 1] = (char)slot;
        ring[slot] = p;
    }
    __asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) static void serve_helper_loop(void) {
    for (;;) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
        sink += 1;
    }
}

static void *helper_main(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "serve-helper");
    serve_helper_loop();
    return NULL;
}

int main(int argc, char **argv) {
    long seconds = argc > 1 ? atol(argv[1]) : 0;
    long busy = argc > 2 ? atol(argv[2]) : 50;
    if (busy < 0) busy = 0;
    if (busy > 100) busy = 100;

    pthread_t helper;
    if (pthread_create(&helper, NULL, helper_main, NULL) != 0) {
        perror("pthread_create");
        return 1;
    }
    printf("ready pid=%d\n", (int)getpid());
    fflush(stdout);

    int64_t start = now_ns();
    int64_t end = seconds > 0 ? start + seconds * 1000000000LL : INT64_MAX;
    for (int64_t period = start; period < end; period += PERIOD_NS) {
        serve_hot_spin(period + PERIOD_NS * busy / 100);
        serve_alloc_site(BLOCKS_PER_PERIOD);
        int64_t left = period + PERIOD_NS - now_ns();
        if (left > 0) {
            struct timespec ts = {left / 1000000000LL, left % 1000000000LL};
            nanosleep(&ts, NULL);
        } else {
            period = now_ns() - PERIOD_NS; /* fell behind (busy machine): don't catch up */
        }
    }
    return 0;
}
