/*
 * heap_threads.c: a multithreaded, allocation-heavy program with deterministic output,
 * for the heap-profiling transparency tests.
 *
 * Ground truth
 * ------------
 * Four threads each run the same allocation workload, seeded by their index: a pool of
 * 256 slots in which blocks of pseudo-random sizes (1 B to 4 KiB or to 64 KiB, and one in
 * 97 of 256 KiB to 2.25 MiB, which glibc mmaps) are allocated with malloc, calloc, realloc,
 * posix_memalign, strdup and asprintf, filled with a pattern, checked and freed. Each
 * thread folds what it reads back into a checksum that depends only on its index, and
 * checks what malloc_usable_size says of its small blocks. The
 * threads then print, strictly in turn (a mutex and condition variable pass the turn
 * from thread 1 to thread 4), one line to stdout (flushed before the turn passes) and
 * one to stderr (unbuffered). main prints a summary to both streams and exits with
 * status 5. A block that reads back wrong (an allocator that returned overlapping or
 * unaligned memory, or lost a realloc's contents) makes the program print `CORRUPT`
 * and exit with status 99.
 *
 * So stdout, stderr and the exit status are the same bytes on every run, and a heap
 * profiler that is transparent must not change them.
 *
 * Usage: heap_threads [ROUNDS_PER_THREAD]  (default 200000, well under a second).
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NTHREADS 4
#define SLOTS 256

static pthread_mutex_t turn_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t turn_changed = PTHREAD_COND_INITIALIZER;
static int turn = 1; /* index of the thread allowed to print next */
static long rounds = 200000;
static int corrupt;

struct slot {
    unsigned char *p;
    size_t len;
    unsigned char fill;
};

static uint64_t next(uint64_t *x) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static size_t pick_size(uint64_t *rng) {
    uint64_t r = next(rng);
    if (r % 97 == 0) return (256u << 10) + (size_t)(r >> 40) % (2u << 20);
    /* Half of them small (glibc's heap chunks below 4 KiB, which a sampled block is
     * promoted from). */
    if (r & (1u << 10)) return 1 + (size_t)(r >> 20) % 4096;
    return 1 + (size_t)(r >> 20) % (64u << 10);
}

/* Checks that a slot still holds its pattern and folds it into the checksum. */
static uint64_t check(struct slot *s, uint64_t sum) {
    if (!s->p) return sum;
    if (s->p[0] != s->fill || s->p[s->len - 1] != s->fill || s->p[s->len / 2] != s->fill)
        corrupt = 1;
    if (malloc_usable_size(s->p) < s->len) corrupt = 1;
    return sum * 31 + s->len + s->fill;
}

/* Writes the pattern: the first 256 bytes, the middle and the last byte (large blocks
 * stay mostly untouched, so the run stays short). */
static void fill(struct slot *s, unsigned char value) {
    s->fill = value;
    memset(s->p, value, s->len < 256 ? s->len : 256);
    s->p[s->len / 2] = value;
    s->p[s->len - 1] = value;
}

/* Set in main when malloc is glibc's (its usable sizes, not another allocator's classes). */
static int glibc_sizes;

/* malloc_usable_size of a small block just allocated (not reallocated, which may keep a
 * larger or mmapped chunk): glibc gives the block its size rounded up to a chunk, or a
 * chunk up to 31 bytes larger when the rest would be too small to split off. A profiler
 * that moves a sampled block to a larger one must not let it show. */
static uint64_t note_usable(const struct slot *s, uint64_t sum) {
    if (!glibc_sizes || !s->p || s->len > 4096) return sum;
    size_t usable = malloc_usable_size(s->p);
    if (usable < s->len || usable >= s->len + 64) {
        fprintf(stderr, "CORRUPT: malloc_usable_size %zu of a block of %zu bytes\n", usable, s->len);
        corrupt = 1;
    }
    return sum;
}

static void *run(void *arg) {
    int index = (int)(intptr_t)arg;
    uint64_t rng = 0x9e3779b97f4a7c15ULL * (uint64_t)index;
    uint64_t sum = (uint64_t)index;
    struct slot pool[SLOTS] = {{0}};

    for (long i = 0; i < rounds; i++) {
        struct slot *s = &pool[next(&rng) % SLOTS];
        sum = check(s, sum);
        unsigned char value = (unsigned char)(i & 0xff);
        switch (next(&rng) % 6) {
        case 0: /* replace with malloc */
            free(s->p);
            s->len = pick_size(&rng);
            s->p = malloc(s->len);
            fill(s, value);
            sum = note_usable(s, sum);
            break;
        case 1: /* replace with calloc, which must be zeroed */
            free(s->p);
            s->len = pick_size(&rng);
            s->p = calloc(1, s->len);
            if (s->p[0] != 0 || s->p[s->len / 2] != 0 || s->p[s->len - 1] != 0) corrupt = 1;
            fill(s, value);
            sum = note_usable(s, sum);
            break;
        case 2: { /* realloc keeps the common prefix */
            size_t len = pick_size(&rng);
            unsigned char old = s->fill;
            size_t kept = s->p ? (len < s->len ? len : s->len) : 0;
            s->p = realloc(s->p, len);
            /* The first 256 bytes of the old block held the pattern. */
            if (kept && (s->p[0] != old || s->p[(kept < 256 ? kept : 256) - 1] != old))
                corrupt = 1;
            s->len = len;
            fill(s, value);
            break;
        }
        case 3: { /* aligned */
            void *p = NULL;
            free(s->p);
            s->len = pick_size(&rng);
            if (posix_memalign(&p, 256, s->len) != 0 || ((uintptr_t)p & 255) != 0) corrupt = 1;
            s->p = p;
            fill(s, value);
            sum = note_usable(s, sum);
            break;
        }
        case 4: { /* strings: strdup and asprintf allocate inside libc */
            char *text = NULL;
            if (asprintf(&text, "thread %d round %ld value %u", index, i, value) < 0) corrupt = 1;
            char *copy = strdup(text);
            sum = sum * 31 + strlen(copy);
            free(text);
            free(s->p);
            s->p = (unsigned char *)copy;
            s->len = strlen(copy) + 1;
            fill(s, value);
            sum = note_usable(s, sum);
            break;
        }
        default: /* free */
            free(s->p);
            s->p = NULL;
            s->len = 0;
            break;
        }
    }
    for (int k = 0; k < SLOTS; k++) {
        sum = check(&pool[k], sum);
        free(pool[k].p);
    }

    pthread_mutex_lock(&turn_lock);
    while (turn != index) pthread_cond_wait(&turn_changed, &turn_lock);
    printf("thread %d: checksum %016" PRIx64 "\n", index, sum);
    fflush(stdout);
    fprintf(stderr, "thread %d done\n", index);
    turn++;
    pthread_cond_broadcast(&turn_changed);
    pthread_mutex_unlock(&turn_lock);
    return (void *)(uintptr_t)(sum & 0xffff);
}

int main(int argc, char **argv) {
    if (argc > 1) rounds = atol(argv[1]);
    /* glibc: 100 bytes take a 112-byte chunk, 104 usable (tcmalloc and jemalloc: 112). */
    void *probe = malloc(100);
    glibc_sizes = probe && malloc_usable_size(probe) == 104;
    free(probe);
    pthread_t threads[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) {
        if (pthread_create(&threads[i], NULL, run, (void *)(intptr_t)(i + 1)) != 0) {
            perror("pthread_create");
            return 1;
        }
    }
    uintptr_t total = 0;
    for (int i = 0; i < NTHREADS; i++) {
        void *ret;
        pthread_join(threads[i], &ret);
        total += (uintptr_t)ret;
    }
    if (corrupt) {
        printf("CORRUPT\n");
        return 99;
    }
    printf("all %d threads done, combined %" PRIuPTR "\n", NTHREADS, total);
    fprintf(stderr, "main: exiting with status 5\n");
    return 5;
}
