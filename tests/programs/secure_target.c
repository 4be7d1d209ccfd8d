/*
 * secure_target.c: the victim of the security tests (tests/tests/security_preload.rs). Run
 * setuid root by `nobody`, or as root with a squatted socket nearby, it must behave exactly
 * as without the preload.
 *
 * Ground truth
 * ------------
 * It allocates and frees 2000 blocks of 1..64 KiB and burns about MILLIS ms of CPU (default
 * 300) in integer work, then prints on stdout:
 *   result=<checksum>          the same with and without the preload
 *   secure=<0|1>               getauxval(AT_SECURE): 1 when run setuid by another user
 *   ld_preload=<value|unset>   LD_PRELOAD as the program sees it (glibc clears it when secure)
 *   libanyprof=<yes|no>        whether an object named libanyprof* is mapped: proof the
 *                              library was loaded, so the tests cannot pass vacuously
 * and exits 0.
 *
 * Usage: secure_target [MILLIS]
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <time.h>

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int libanyprof_mapped(void) {
    FILE *maps = fopen("/proc/self/maps", "r");
    if (!maps) return 0;
    char line[4096];
    int found = 0;
    while (fgets(line, sizeof line, maps))
        if (strstr(line, "libanyprof")) found = 1;
    fclose(maps);
    return found;
}

int main(int argc, char **argv) {
    long millis = argc > 1 ? atol(argv[1]) : 300;
    uint64_t sum = 0;
    for (int i = 0; i < 2000; i++) {
        size_t size = 1024 + (size_t)(i * 7919) % (63 * 1024);
        unsigned char *p = malloc(size);
        if (!p) return 2;
        memset(p, i & 0xff, size);
        sum += p[size / 2] + size;
        free(p);
    }
    double start = now_ms();
    volatile uint64_t x = 1;
    while (now_ms() - start < (double)millis)
        for (int i = 0; i < 100000; i++) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    const char *preload = getenv("LD_PRELOAD");
    printf("result=%llu\n", (unsigned long long)sum);
    printf("secure=%lu\n", getauxval(AT_SECURE));
    printf("ld_preload=%s\n", preload ? preload : "unset");
    printf("libanyprof=%s\n", libanyprof_mapped() ? "yes" : "no");
    return 0;
}
