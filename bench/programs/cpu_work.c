/*
 * The CPU-bound program of the overhead benchmark (bench/overhead.py).
 *
 * It does a fixed number of work units, so a profiler's cost shows up as extra time, and
 * prints how long the work itself took (CLOCK_MONOTONIC around the work, threads created and
 * joined inside the timed part), so that start-up and shutdown costs of a profiler can be told
 * apart from its cost while the program runs.
 *
 * A unit is the two kinds of stack a sampler meets most: a recursion of our own functions
 * eight frames deep ending in an arithmetic loop, and libc's qsort calling back into our
 * comparison function (unwound through libc without frame pointers).
 *
 *   cpu_work UNITS [THREADS]     do UNITS units split over THREADS threads (default 1) and print
 *                                "work_seconds=S units=U threads=T checksum=X"
 *   cpu_work --calibrate SECONDS do units for about SECONDS on one thread and print
 *                                "units_per_second=R"
 *
 * Build: cc -O2 -g -pthread cpu_work.c -o cpu_work   (no frame pointers, as x86-64 -O2 does)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SORT_LEN 64
#define DEPTH 8

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

__attribute__((noinline)) static uint64_t mix(uint64_t x, int rounds) {
    for (int i = 0; i < rounds; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        x ^= x >> 29;
    }
    return x;
}

/* Not a tail call (the xor after it), so each level keeps its frame. */
__attribute__((noinline)) static uint64_t descend(int depth, uint64_t x) {
    if (depth == 0) return mix(x, 1500);
    return descend(depth - 1, x + (uint64_t)depth) ^ (uint64_t)depth;
}

static int compare_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

__attribute__((noinline)) static uint64_t sort_step(uint64_t seed) {
    uint32_t values[SORT_LEN];
    for (int i = 0; i < SORT_LEN; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        values[i] = (uint32_t)(seed >> 33);
    }
    qsort(values, SORT_LEN, sizeof values[0], compare_u32);
    return (uint64_t)values[0] ^ ((uint64_t)values[SORT_LEN - 1] << 32);
}

__attribute__((noinline)) static uint64_t work_unit(uint64_t seed) {
    return descend(DEPTH, seed) + sort_step(seed);
}

struct task {
    uint64_t first, count, checksum;
};

static void *run_task(void *arg) {
    struct task *t = arg;
    uint64_t sum = 0;
    for (uint64_t u = t->first; u < t->first + t->count; u++) sum += work_unit(u);
    t->checksum = sum;
    return NULL;
}

static int calibrate(double seconds) {
    uint64_t units = 0, sum = 0;
    double start = now(), elapsed;
    do {
        for (int i = 0; i < 64; i++) sum += work_unit(units++);
        elapsed = now() - start;
    } while (elapsed < seconds);
    printf("units_per_second=%.1f checksum=%016llx\n", (double)units / elapsed,
           (unsigned long long)sum);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--calibrate") == 0) return calibrate(atof(argv[2]));
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s UNITS [THREADS] | --calibrate SECONDS\n", argv[0]);
        return 2;
    }
    uint64_t units = strtoull(argv[1], NULL, 10);
    int threads = argc == 3 ? atoi(argv[2]) : 1;
    if (units == 0 || threads < 1 || threads > 256) {
        fprintf(stderr, "%s: UNITS must be > 0 and THREADS in 1..256\n", argv[0]);
        return 2;
    }

    struct task tasks[256];
    pthread_t ids[256];
    double start = now();
    for (int i = 0; i < threads; i++) {
        tasks[i].first = units * (uint64_t)i / (uint64_t)threads;
        tasks[i].count = units * (uint64_t)(i + 1) / (uint64_t)threads - tasks[i].first;
        if (threads == 1) {
            run_task(&tasks[i]);
        } else if (pthread_create(&ids[i], NULL, run_task, &tasks[i]) != 0) {
            perror("pthread_create");
            return 1;
        }
    }
    uint64_t checksum = 0;
    for (int i = 0; i < threads; i++) {
        if (threads > 1) pthread_join(ids[i], NULL);
        checksum ^= tasks[i].checksum;
    }
    double elapsed = now() - start;
    printf("work_seconds=%.6f units=%llu threads=%d checksum=%016llx\n", elapsed,
           (unsigned long long)units, threads, (unsigned long long)checksum);
    return 0;
}
