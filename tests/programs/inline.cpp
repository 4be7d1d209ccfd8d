/*
 * inline.cpp: C++ names that need demangling, and a hot loop that exists only
 * as inlined code.
 *
 * Ground truth
 * ------------
 * Nearly all CPU time is spent in the loop of `anyprof_test::inlined_hot_loop`,
 * which is `always_inline`: in the -O2 binary it has no code of its own, only an
 * inlined copy inside `anyprof_test::Worker::run_batch`. The call chain is
 *
 *     main -> anyprof_test::drive<unsigned long>   (function template, not inlined)
 *          -> anyprof_test::Worker::run_batch      (member function, not inlined)
 *             [inlined] anyprof_test::inlined_hot_loop
 *
 * So the leaf of almost every CPU sample is an address inside run_batch whose
 * DWARF inline info says "inlined_hot_loop, inlined into run_batch": a profiler
 * that reports inline frames gives that Location two or more Lines, the first
 * (innermost) for inlined_hot_loop and a later one for run_batch. Every function
 * here has a mangled linkage name (_ZN12anyprof_test...), so the profile must
 * show demangled names with "::" (and "<unsigned long>" for the template) while
 * keeping the mangled form as system_name.
 *
 * Built by the tests with `-O2 -g`.
 *
 * Usage: inline [ITERATIONS]  (default 1000000000: about 1.5 s of CPU on a slow
 * 2-core VM). Prints one line: the checksum.
 */
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace anyprof_test {

static volatile std::uint64_t sink;

// The hot loop. always_inline: it never exists as a function of its own.
__attribute__((always_inline)) inline std::uint64_t inlined_hot_loop(std::uint64_t n,
                                                                     std::uint64_t x) {
    for (std::uint64_t i = 0; i < n; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        x ^= x >> 29;
        __asm__ volatile("" : "+r"(x));  // opaque: no folding, no vectorising
    }
    return x;
}

class Worker {
  public:
    explicit Worker(std::uint64_t seed) : state_(seed) {}

    // Calls the hot loop, which the compiler inlines here.
    __attribute__((noinline)) std::uint64_t run_batch(std::uint64_t n) {
        state_ = inlined_hot_loop(n, state_);
        return state_;
    }

  private:
    std::uint64_t state_;
};

// A function template: its mangled name carries the template argument.
template <typename Count>
__attribute__((noinline)) Count drive(Worker &worker, Count iterations) {
    Count result = worker.run_batch(iterations);
    sink = result;  // after the call: not a tail call, drive stays on the stack
    return result;
}

}  // namespace anyprof_test

int main(int argc, char **argv) {
    std::uint64_t n = 1000000000ULL;
    if (argc > 1) n = std::strtoull(argv[1], nullptr, 10);
    anyprof_test::Worker worker(7);
    std::uint64_t checksum = anyprof_test::drive<std::uint64_t>(worker, n);
    std::printf("checksum %016" PRIx64 "\n", checksum);
    return 0;
}
