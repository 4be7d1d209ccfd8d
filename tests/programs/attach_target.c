/*
 * attach_target.c: a program to attach to while it runs, with a known CPU split.
 *
 * Ground truth
 * ------------
 * The main thread runs rounds until SECONDS have passed. Each round calls three hot
 * functions that do the same per-iteration work (as in cpu_split.c), 16 times, for 50, 30
 * and 20 % of a random number of iterations (6000·k, 3600·k and 2400·k, k from 1 to 16:
 * well under a millisecond each time), on distinct call chains:
 *
 *     main -> run_rounds -> hot_a            50 %
 *     main -> run_rounds -> mid_b -> hot_b   30 %
 *     main -> run_rounds -> hot_c            20 %
 *
 * so any window of the run longer than a few milliseconds splits the main thread's CPU
 * time 50/30/20 over them. LATE_MS milliseconds after the start (or, with LATE_MS -1, at
 * the first round after a SIGUSR1), the program starts one more thread that runs
 * `late_worker` -> `hot_late` until the end: a thread created while a profiler is attached.
 *
 * Built with -O2 -g -fomit-frame-pointer: reaching `main` takes DWARF CFI.
 *
 * Usage: attach_target SECONDS LATE_MS. Prints "ready" (flushed) once running, and "done"
 * at the end; exits with status 7, so that a test sees the status is the program's own.
 */
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile uint64_t sink;
static volatile int stop;
static volatile sig_atomic_t start_late;

static void on_usr1(int sig) {
    (void)sig;
    start_late = 1;
}

static inline __attribute__((always_inline)) uint64_t step(uint64_t x, uint64_t k) {
    x = x * 6364136223846793005ULL + k;
    x ^= x >> 29;
    __asm__ volatile("" : "+r"(x));
    return x;
}

__attribute__((noinline, noclone)) static uint64_t hot_a(uint64_t n) {
    uint64_t x = 1;
    for (uint64_t i = 0; i < n; i++) x = step(x, 0x9e3779b97f4a7c15ULL);
    return x;
}

__attribute__((noinline, noclone)) static uint64_t hot_b(uint64_t n) {
    uint64_t x = 2;
    for (uint64_t i = 0; i < n; i++) x = step(x, 0xbf58476d1ce4e5b9ULL);
    return x;
}

__attribute__((noinline, noclone)) static uint64_t hot_c(uint64_t n) {
    uint64_t x = 3;
    for (uint64_t i = 0; i < n; i++) x = step(x, 0x94d049bb133111ebULL);
    return x;
}

__attribute__((noinline, noclone)) static uint64_t hot_late(uint64_t n) {
    uint64_t x = 4;
    for (uint64_t i = 0; i < n; i++) x = step(x, 0xd6e8feb86659fd93ULL);
    return x;
}

__attribute__((noinline, noclone)) static void mid_b(uint64_t n) {
    sink = hot_b(n);
    sink = sink + 1;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline, noclone)) static void *late_worker(void *arg) {
    (void)arg;
    while (!stop) sink = hot_late(10000);
    return NULL;
}

__attribute__((noinline, noclone)) static void run_rounds(double seconds, double late) {
    double start = now();
    pthread_t late_thread;
    int late_started = 0;
    uint64_t rng = 0x853c49e6748fea9bULL;
    for (;;) {
        for (int i = 0; i < 16; i++) {
            /* Trios of random length (the same 50/30/20 within each): a profiler that
             * samples at a fixed period must not meet the same phase of a regular loop
             * every time (aliasing), which would bias the split. */
            rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
            uint64_t k = 1 + (rng >> 60);
            sink = hot_a(6000 * k);
            mid_b(3600 * k);
            sink = hot_c(2400 * k);
        }
        double t = now() - start;
        if (!late_started && (late < 0 ? start_late : t >= late)) {
            if (pthread_create(&late_thread, NULL, late_worker, NULL) != 0) abort();
            late_started = 1;
        }
        if (t >= seconds) break;
    }
    stop = 1;
    if (late_started) pthread_join(late_thread, NULL);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: attach_target SECONDS LATE_MS\n");
        return 2;
    }
    signal(SIGUSR1, on_usr1);
    printf("ready\n");
    fflush(stdout);
    run_rounds(atof(argv[1]), atof(argv[2]) / 1000.0);
    printf("done\n");
    return 7;
}
