/*
 * The bundled example for `make demo`: a small program whose CPU time goes to a few
 * recognisable places, so the first profile you see has something to say.
 *
 *   - count_primes: a naive trial-division loop (pure computation in our own code);
 *   - sort_records: libc's qsort calling back into compare_records (a stack that goes
 *     main -> sort_records -> qsort (libc) -> compare_records, unwound through libc
 *     without frame pointers);
 *   - checksum_worker: the same work on a second thread named "checksum".
 *
 * Build: cc -O2 -g -pthread demo.c -o demo   (no frame pointers needed)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct record {
    uint32_t key;
    char name[28];
};

__attribute__((noinline)) static int is_prime(uint64_t n) {
    if (n < 2) return 0;
    for (uint64_t d = 2; d * d <= n; d++)
        if (n % d == 0) return 0;
    return 1;
}

__attribute__((noinline)) static uint64_t count_primes(uint64_t limit) {
    uint64_t count = 0;
    for (uint64_t n = 0; n < limit; n++) count += is_prime(n);
    return count;
}

static int compare_records(const void *a, const void *b) {
    const struct record *x = a, *y = b;
    if (x->key != y->key) return x->key < y->key ? -1 : 1;
    return strcmp(x->name, y->name);
}

__attribute__((noinline)) static uint32_t sort_records(size_t n, unsigned seed) {
    struct record *r = malloc(n * sizeof *r);
    if (!r) return 0;
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        r[i].key = seed >> 16;
        snprintf(r[i].name, sizeof r[i].name, "record-%zu", i);
    }
    qsort(r, n, sizeof *r, compare_records);
    uint32_t first = r[0].key;
    free(r);
    return first;
}

__attribute__((noinline)) static uint64_t checksum(const unsigned char *p, size_t n, int rounds) {
    uint64_t h = 1469598103934665603ull;
    for (int r = 0; r < rounds; r++)
        for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static void *checksum_worker(void *arg) {
    (void)arg;
    pthread_setname_np(pthread_self(), "checksum");
    static unsigned char buf[1 << 20];
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (unsigned char)i;
    static uint64_t result;
    result = checksum(buf, sizeof buf, 400);
    return &result;
}

int main(int argc, char **argv) {
    int scale = argc > 1 ? atoi(argv[1]) : 1;
    if (scale < 1) scale = 1;
    pthread_t worker;
    pthread_create(&worker, NULL, checksum_worker, NULL);
    uint64_t primes = count_primes(1500000ull * scale);
    uint32_t first = 0;
    for (int i = 0; i < 6 * scale; i++) first ^= sort_records(200000, (unsigned)i);
    void *sum;
    pthread_join(worker, &sum);
    printf("primes: %llu, first key: %u, checksum: %016llx\n", (unsigned long long)primes, first,
           (unsigned long long)*(uint64_t *)sum);
    return 0;
}
