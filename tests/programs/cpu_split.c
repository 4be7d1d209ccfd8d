/*
 * cpu_split.c: a program whose CPU time splits 50/30/20 over three known functions.
 *
 * Ground truth
 * ------------
 * Three hot functions do the same per-iteration integer work (`step`, always
 * inlined into each of them; an empty asm statement makes the state opaque, so
 * the compiler can neither fold the loop nor vectorise it). They run in turn on
 * distinct call chains:
 *
 *     main -> phase_a -> hot_a            50 % of the iterations
 *     main -> phase_b -> mid_b -> hot_b   30 %
 *     main -> phase_c -> hot_c            20 %
 *
 * Each phase stores the hot function's result in a volatile sink after the call,
 * so none of the calls is a tail call and every frame stays on the stack. Each hot
 * function mixes in its own constant (same instruction count), which keeps GCC's
 * identical-code folding (-fipa-icf, on at -O2) from merging them into one symbol.
 *
 * Because the work per iteration is identical, the inclusive instruction counts
 * (callgrind) of hot_a/hot_b/hot_c are 50/30/20 of their sum up to the few
 * instructions of a call, and so is their CPU time: a correct CPU profiler must
 * attribute 50/30/20 % of the samples to them.
 *
 * The tests build it with `-O2 -g -fomit-frame-pointer`: there are no frame
 * pointers, so reaching `main` and `_start` needs DWARF CFI unwinding.
 *
 * Usage: cpu_split [TOTAL_ITERATIONS]   (default 3000000000, about 4.5 s of CPU
 * on a slow 2-core VM). Prints one line: the combined checksum and the process's
 * CPU time in ns (clock_gettime(CLOCK_PROCESS_CPUTIME_ID)).
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile uint64_t sink;

/* One iteration's work: a multiply-xorshift step. */
static inline __attribute__((always_inline)) uint64_t step(uint64_t x, uint64_t k) {
    x = x * 6364136223846793005ULL + k;
    x ^= x >> 29;
    __asm__ volatile("" : "+r"(x)); /* opaque: no folding, no vectorising */
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

__attribute__((noinline, noclone)) static void phase_a(uint64_t n) { sink = hot_a(n); }

__attribute__((noinline, noclone)) static void mid_b(uint64_t n) { sink = hot_b(n); }

__attribute__((noinline, noclone)) static void phase_b(uint64_t n) {
    mid_b(n);
    sink = sink + 1;
}

__attribute__((noinline, noclone)) static void phase_c(uint64_t n) { sink = hot_c(n); }

int main(int argc, char **argv) {
    uint64_t total = 3000000000ULL;
    if (argc > 1) total = strtoull(argv[1], NULL, 10);
    uint64_t checksum = 0;
    phase_a(total / 100 * 50);
    checksum ^= sink;
    phase_b(total / 100 * 30);
    checksum ^= sink;
    phase_c(total / 100 * 20);
    checksum ^= sink;
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    printf("checksum=%016" PRIx64 " cpu_ns=%" PRIu64 "\n", checksum,
           (uint64_t)(ts.tv_sec * 1000000000LL + ts.tv_nsec));
    return 0;
}
