/*
 * The malloc microbenchmark of the heap-profiling overhead benchmark (bench/heap_overhead.py).
 *
 * Each thread does PAIRS iterations of: malloc(size) with size varying over 16..MAX bytes
 * (MAX 271 by default, 4096 for the mixed-size case; a xorshift sequence, so sizes spread over
 * several size classes and the branch predictor cannot learn them), write the first and the last byte, free. Empty asm statements that
 * "use" the pointer and clobber memory keep the compiler from pairing up and deleting the
 * malloc/free (which GCC and clang do for a malloc whose result does not escape).
 *
 * The timed part is the loop only, with CLOCK_MONOTONIC: threads are created first and start
 * together at a barrier, so thread start-up is not counted; each thread times its own loop.
 * Each thread also reads its own CPU time (CLOCK_THREAD_CPUTIME_ID) around the loop: time
 * the thread spent descheduled because of other load on the machine is not in that one.
 *
 *   malloc_pairs PAIRS [THREADS [MAX]]   PAIRS pairs on each of THREADS threads (default 1),
 *       sizes 16..MAX (default 271: 16 + x % 256); prints
 *       "work_seconds=S ns_per_pair=X cpu_ns_per_pair=Y threads=T pairs=N
 *        thread_ns_per_pair=a,b,... checksum=C"   (on one line)
 *       where work_seconds is from the barrier to the last thread's end, ns_per_pair is the
 *       mean over threads of each thread's loop time / PAIRS (the cost of one pair on one
 *       thread: equal to the 1-thread figure when threads scale perfectly) and
 *       thread_ns_per_pair lists it per thread; cpu_ns_per_pair is the same mean in thread
 *       CPU time.
 *
 * Build: cc -O2 -g -pthread malloc_pairs.c -o malloc_pairs
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_THREADS 64

static double clock_seconds(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double now(void) { return clock_seconds(CLOCK_MONOTONIC); }

struct task {
    uint64_t pairs, seed, checksum;
    double start, end, cpu;
};

static pthread_barrier_t barrier;
static int threaded;
static uint64_t size_span = 256; /* sizes are 16 + x % size_span */

__attribute__((noinline)) static uint64_t pairs_loop(uint64_t pairs, uint64_t x) {
    uint64_t sum = 0;
    for (uint64_t i = 0; i < pairs; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        size_t size = 16 + (size_t)(size_span == 256 ? (x & 255) : x % size_span);
        unsigned char *p = malloc(size);
        __asm__ volatile("" : : "r"(p) : "memory");
        if (p == NULL) abort();
        p[0] = (unsigned char)i;
        p[size - 1] = (unsigned char)x;
        sum += p[0];
        __asm__ volatile("" : : "r"(p) : "memory");
        free(p);
    }
    return sum ^ x;
}

static void *run_task(void *arg) {
    struct task *t = arg;
    if (threaded) pthread_barrier_wait(&barrier);
    double cpu_start = clock_seconds(CLOCK_THREAD_CPUTIME_ID);
    t->start = now();
    t->checksum = pairs_loop(t->pairs, t->seed);
    t->end = now();
    t->cpu = clock_seconds(CLOCK_THREAD_CPUTIME_ID) - cpu_start;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 4) {
        fprintf(stderr, "usage: %s PAIRS [THREADS [MAX]]\n", argv[0]);
        return 2;
    }
    uint64_t pairs = strtoull(argv[1], NULL, 10);
    int threads = argc >= 3 ? atoi(argv[2]) : 1;
    if (argc == 4) {
        long max = atol(argv[3]);
        if (max < 16 || max > (1L << 30)) {
            fprintf(stderr, "%s: MAX must be in 16..2^30\n", argv[0]);
            return 2;
        }
        size_span = (uint64_t)(max - 15);
    }
    if (pairs == 0 || threads < 1 || threads > MAX_THREADS) {
        fprintf(stderr, "%s: PAIRS must be > 0 and THREADS in 1..%d\n", argv[0], MAX_THREADS);
        return 2;
    }

    struct task tasks[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    threaded = threads > 1;
    for (int i = 0; i < threads; i++) {
        tasks[i].pairs = pairs;
        tasks[i].seed = 0x9E3779B97F4A7C15ULL * (uint64_t)(i + 1);
    }
    if (threaded) {
        /* The main thread joins the barrier too, so all workers exist before any starts. */
        pthread_barrier_init(&barrier, NULL, (unsigned)threads + 1);
        for (int i = 0; i < threads; i++) {
            if (pthread_create(&ids[i], NULL, run_task, &tasks[i]) != 0) {
                perror("pthread_create");
                return 1;
            }
        }
        pthread_barrier_wait(&barrier);
        for (int i = 0; i < threads; i++) pthread_join(ids[i], NULL);
    } else {
        run_task(&tasks[0]);
    }

    double first = tasks[0].start, last = tasks[0].end, mean = 0, cpu_mean = 0;
    uint64_t checksum = 0;
    char list[MAX_THREADS * 16] = "";
    size_t used = 0;
    for (int i = 0; i < threads; i++) {
        double ns = (tasks[i].end - tasks[i].start) * 1e9 / (double)pairs;
        mean += ns / threads;
        cpu_mean += tasks[i].cpu * 1e9 / (double)pairs / threads;
        if (tasks[i].start < first) first = tasks[i].start;
        if (tasks[i].end > last) last = tasks[i].end;
        checksum ^= tasks[i].checksum;
        used += (size_t)snprintf(list + used, sizeof list - used, "%s%.2f", i ? "," : "", ns);
    }
    printf("work_seconds=%.6f ns_per_pair=%.3f cpu_ns_per_pair=%.3f threads=%d pairs=%llu "
           "thread_ns_per_pair=%s checksum=%016llx\n",
           last - first, mean, cpu_mean, threads, (unsigned long long)pairs, list,
           (unsigned long long)checksum);
    return 0;
}
