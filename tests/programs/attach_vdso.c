/*
 * attach_vdso.c: a program that spends most of its time in the vDSO, to attach to.
 *
 * Ground truth: the main thread calls clock_gettime(CLOCK_MONOTONIC) in a loop from
 * `spin_clock` until SECONDS have passed; glibc answers it in the vDSO without entering the
 * kernel, so most CPU samples interrupt vDSO code, and reaching `main` from there takes the
 * vDSO's own unwind tables. Built with -O2 -g -fomit-frame-pointer.
 *
 * Usage: attach_vdso SECONDS. Prints "ready" (flushed) once running, "done" at the end.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile long sink;

__attribute__((noinline, noclone)) static double spin_clock(double seconds) {
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    double t;
    do {
        clock_gettime(CLOCK_MONOTONIC, &now);
        sink += now.tv_nsec;
        t = (now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9;
    } while (t < seconds);
    return t;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: attach_vdso SECONDS\n");
        return 2;
    }
    printf("ready\n");
    fflush(stdout);
    spin_clock(atof(argv[1]));
    printf("done\n");
    return 0;
}
