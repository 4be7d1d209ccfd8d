/*
 * cxx_new_forms.cpp: every x86_64 form of C++ operator new and delete, at sites whose totals
 * are known, and the ways a new reports running out of memory (std::bad_alloc, nullptr,
 * new-handlers), for the tests of anyprof's operator new/delete interposition.
 *
 * Ground truth
 * ------------
 * Each site is its own non-inlined `extern "C"` function (plain names in a profile) that
 * calls one form of operator new itself, so it is the first frame of its samples once the
 * `operator new` frames of libstdc++ are skipped. Every pointer is used after the call (an
 * empty asm statement), so no call is a tail call and none is elided. Blocks that are not
 * kept are freed at once, each site with its own delete forms:
 *
 *   site_new                    new Obj                      [_Znwm]
 *                               freed by ::operator delete(p) [_ZdlPv] or delete p [_ZdlPvm]
 *   site_new_array              new Obj[1 + i % 50]          [_Znam]
 *                               freed by ::operator delete[](p) [_ZdaPv] or
 *                               ::operator delete[](p, bytes) [_ZdaPvm]
 *   site_new_nothrow            new (std::nothrow) Obj       [_ZnwmRKSt9nothrow_t]
 *                               freed by ::operator delete(p, std::nothrow)
 *   site_new_array_nothrow      new (std::nothrow) Obj[1 + i % 30]      [_ZnamRKSt9nothrow_t]
 *                               freed by ::operator delete[](p, std::nothrow)
 *   site_new_aligned            new A64 (alignas(64)) and ::operator new(300, align 256)
 *                               [_ZnwmSt11align_val_t]; freed by delete p
 *                               [_ZdlPvmSt11align_val_t] or ::operator delete(p, align 256)
 *                               [_ZdlPvSt11align_val_t]
 *   site_new_aligned_page       ::operator new(5000, align 4096) [_ZnwmSt11align_val_t];
 *                               freed by ::operator delete(p, 5000, align 4096)
 *   site_new_array_aligned      new A64[1 + i % 20]          [_ZnamSt11align_val_t]
 *                               freed by ::operator delete[](p, align 64) [_ZdaPvSt11align_val_t]
 *                               or ::operator delete[](p, bytes, align 64) [_ZdaPvmSt11...]
 *   site_new_aligned_nothrow    new (std::nothrow) A64       [_ZnwmSt11align_val_tRKSt9nothrow_t]
 *                               freed by ::operator delete(p, align 64, std::nothrow)
 *   site_new_array_aligned_nothrow  new (std::nothrow) A64[1 + i % 10]
 *                               [_ZnamSt11align_val_tRKSt9nothrow_t]; freed by
 *                               ::operator delete[](p, align 64, std::nothrow)
 *
 * Each site makes N = 2000 allocations and keeps the last 100 live (reachable from a global
 * array) until exit. Element types are trivially destructible, so new[] adds no array
 * cookie and the pointer it returns is the block the allocator returned. Sizes are usable
 * sizes (malloc_usable_size), which is what the profiler records.
 *
 * Output on stdout: one line per site, `site NAME objects=N live_objects=M`, then the
 * out-of-memory checks, one line each, then `done`: the same text with any allocator and
 * whatever the heap's layout. The usable sizes are not on stdout, since they depend on the
 * layout (glibc's aligned blocks carry 0 to 16 bytes of slack, depending on where the block
 * falls), which a profiler that allocates in the process changes. They go to TALLY_FILE,
 * one line per site:
 *   site NAME objects=N alloc_bytes=B live_objects=M live_bytes=L
 *
 * Usage:
 *   cxx_new_forms [TALLY_FILE]    the sites, then the out-of-memory checks
 *   cxx_new_forms nothrow-first   only: with a new-handler installed, the process's very
 *                                 first operator new is a nothrow new that cannot succeed
 */
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <new>
#include <type_traits>

struct Tally {
    const char *name;
    unsigned long objects, alloc_bytes, live_objects, live_bytes;
};

static void add(Tally *t, void *p, bool live) {
    size_t u = malloc_usable_size(p);
    t->objects++;
    t->alloc_bytes += u;
    if (live) {
        t->live_objects++;
        t->live_bytes += u;
    }
}

static void print(const Tally *t, FILE *tally_file) {
    printf("site %s objects=%lu live_objects=%lu\n", t->name, t->objects, t->live_objects);
    if (tally_file)
        fprintf(tally_file, "site %s objects=%lu alloc_bytes=%lu live_objects=%lu live_bytes=%lu\n",
                t->name, t->objects, t->alloc_bytes, t->live_objects, t->live_bytes);
}

/* Keeps a pointer "used" after the call that produced it: no tail call, no elision. */
static inline void use(void *p) { __asm__ volatile("" : : "r"(p) : "memory"); }

/* A size the compiler cannot see through. */
static size_t opaque(size_t n) {
    __asm__ volatile("" : "+r"(n));
    return n;
}

struct Obj {
    double x, y, z;
};
struct alignas(64) A64 {
    char bytes[64];
};
static_assert(std::is_trivially_destructible<Obj>::value, "no array cookie");
static_assert(std::is_trivially_destructible<A64>::value, "no array cookie");
static_assert(sizeof(Obj) == 24 && sizeof(A64) == 64, "sizes");

enum { N = 2000, KEEP = 100, SITES = 9 };
/* The live set: reachable at exit, so not a leak. */
static void *live_set[SITES][KEEP];

static bool kept(int site, unsigned i, void *p) {
    if (i < N - KEEP)
        return false;
    live_set[site][i - (N - KEEP)] = p;
    return true;
}

extern "C" {

__attribute__((noinline, noclone)) void site_new(Tally *t) {
    for (unsigned i = 0; i < N; i++) {
        Obj *p = new Obj; /* alloc: site_new */
        use(p);
        bool live = kept(0, i, p);
        add(t, p, live);
        if (live)
            continue;
        if (i % 2)
            delete p; /* sized: _ZdlPvm */
        else
            ::operator delete(p);
    }
}

__attribute__((noinline, noclone)) void site_new_array(Tally *t) {
    for (unsigned i = 0; i < N; i++) {
        size_t n = opaque(1 + i % 50);
        Obj *p = new Obj[n]; /* alloc: site_new_array */
        use(p);
        bool live = kept(1, i, p);
        add(t, p, live);
        if (live)
            continue;
        if (i % 2)
            ::operator delete[](p, n * sizeof(Obj));
        else
            ::operator delete[](p);
    }
}

__attribute__((noinline, noclone)) void site_new_nothrow(Tally *t) {
    for (unsigned i = 0; i < N; i++) {
        Obj *p = new (std::nothrow) Obj; /* alloc: site_new_nothrow */
        use(p);
        if (!p)
            abort();
        bool live = kept(2, i, p);
        add(t, p, live);
        if (!live)
            ::operator delete(p, std::nothrow);
    }
}

__attribute__((noinline, noclone)) void site_new_array_nothrow(Tally *t) {
    for (unsigned i = 0; i < N; i++) {
        Obj *p = new (std::nothrow) Obj[opaque(1 + i % 30)]; /* alloc: site_new_array_nothrow */
        use(p);
        if (!p)
            abort();
        bool live = kept(3, i, p);
        add(t, p, live);
        if (!live)
            ::operator delete[](p, std::nothrow);
    }
}

__attribute__((noinline, noclone)) void site_new_aligned(Tally *t) {
    for (unsigned i = 0; i < N; i++) {
        void *p;
        if (i % 2) {
            p = new A64; /* alloc: site_new_aligned */
        } else {
            p = ::operator new(300, std::align_val_t(256)); /* alloc: site_new_aligned */
        }
        use(p);
        if (((uintptr_t)p & (i % 2 ? 63 : 255)) != 0)
            abort();
        bool live = kept(4, i, p);
        add(t, p, live);
        if (live)
            continue;
        if (i % 2)
            delete static_cast<A64 *>(p); /* sized aligned: _ZdlPvmSt11align_val_t */
        else
            ::operator delete(p, std::align_val_t(256));
    }
}

__attribute__((noinline, noclone)) void site_new_aligned_page(Tally *t) {
    for (unsigned i = 0; i < N; i++) {
        void *p = ::operator new(5000, std::align_val_t(4096)); /* alloc: site_new_aligned_page */
        use(p);
        if (((uintptr_t)p & 4095) != 0)
            abort();
        bool live = kept(5, i, p);
        add(t, p, live);
        if (!live)
            ::operator delete(p, 5000, std::align_val_t(4096));
    }
}

__attribute__((noinline, noclone)) void site_new_array_aligned(Tally *t) {
    for (unsigned i = 0; i < N; i++) {
        size_t n = opaque(1 + i % 20);
        A64 *p = new A64[n]; /* alloc: site_new_array_aligned */
        use(p);
        if (((uintptr_t)p & 63) != 0)
            abort();
        bool live = kept(6, i, p);
        add(t, p, live);
        if (live)
            continue;
        if (i % 2)
            ::operator delete[](p, n * sizeof(A64), std::align_val_t(64));
        else
            ::operator delete[](p, std::align_val_t(64));
    }
}

__attribute__((noinline, noclone)) void site_new_aligned_nothrow(Tally *t) {
    for (unsigned i = 0; i < N; i++) {
        A64 *p = new (std::nothrow) A64; /* alloc: site_new_aligned_nothrow */
        use(p);
        if (!p || ((uintptr_t)p & 63) != 0)
            abort();
        bool live = kept(7, i, p);
        add(t, p, live);
        if (!live)
            ::operator delete(p, std::align_val_t(64), std::nothrow);
    }
}

__attribute__((noinline, noclone)) void site_new_array_aligned_nothrow(Tally *t) {
    for (unsigned i = 0; i < N; i++) {
        A64 *p = new (std::nothrow) A64[opaque(1 + i % 10)]; /* alloc: site_new_array_aligned_nothrow */
        use(p);
        if (!p || ((uintptr_t)p & 63) != 0)
            abort();
        bool live = kept(8, i, p);
        add(t, p, live);
        if (!live)
            ::operator delete[](p, std::align_val_t(64), std::nothrow);
    }
}

} /* extern "C" */

/* ---- Out of memory ------------------------------------------------------------------- */

/* More than any allocator can give: every malloc of it fails at once. */
static const size_t HUGE_SIZE = SIZE_MAX / 2;

static int handler_calls;
static int handler_limit;

struct Custom {
    int calls;
};

/* Counts its calls; on call number handler_limit throws std::bad_alloc. */
static void handler_then_bad_alloc() {
    if (++handler_calls >= handler_limit)
        throw std::bad_alloc();
}

/* Counts its calls; on call number handler_limit throws a type of the program's own. */
static void handler_then_custom() {
    if (++handler_calls >= handler_limit)
        throw Custom{handler_calls};
}

/* Counts its calls; on call number handler_limit uninstalls itself, so that operator new
 * throws std::bad_alloc on its own. */
static void handler_then_uninstall() {
    if (++handler_calls >= handler_limit)
        std::set_new_handler(nullptr);
}

/* Runs `alloc`; prints whether it returned (null or not) or what it threw, and how many
 * times the new-handler ran. */
template <typename F> static void attempt(const char *what, F alloc) {
    handler_calls = 0;
    const char *outcome = "returned non-null";
    try {
        void *p = alloc();
        use(p);
        if (!p)
            outcome = "returned null";
        else
            abort(); /* cannot happen: nothing has HUGE_SIZE bytes */
    } catch (const std::bad_array_new_length &) {
        outcome = "threw std::bad_array_new_length";
    } catch (const std::bad_alloc &e) {
        outcome = "threw std::bad_alloc";
    } catch (const Custom &c) {
        static char buf[64];
        snprintf(buf, sizeof buf, "threw Custom{%d}", c.calls);
        outcome = buf;
    } catch (...) {
        outcome = "threw something else";
    }
    printf("%s: %s, new-handler calls %d\n", what, outcome, handler_calls);
}

static void out_of_memory_checks() {
    const std::align_val_t a64 = std::align_val_t(64), a4096 = std::align_val_t(4096);
    const size_t huge = opaque(HUGE_SIZE);

    std::set_new_handler(nullptr);
    attempt("new huge", [&] { return ::operator new(huge); });
    attempt("new[] huge", [&] { return ::operator new[](huge); });
    attempt("new char[huge]", [&] { return (void *)new char[huge]; });
    attempt("aligned new huge", [&] { return ::operator new(huge, a64); });
    attempt("aligned new[] huge", [&] { return ::operator new[](huge, a4096); });
    attempt("nothrow new huge", [&] { return ::operator new(huge, std::nothrow); });
    attempt("nothrow new[] huge", [&] { return ::operator new[](huge, std::nothrow); });
    attempt("aligned nothrow new huge",
            [&] { return ::operator new(huge, a64, std::nothrow); });
    attempt("aligned nothrow new[] huge",
            [&] { return ::operator new[](huge, a4096, std::nothrow); });

    handler_limit = 3;
    std::set_new_handler(handler_then_bad_alloc);
    attempt("new huge, handler throws bad_alloc on call 3", [&] { return ::operator new(huge); });
    attempt("new[] huge, handler throws bad_alloc on call 3",
            [&] { return ::operator new[](huge); });
    attempt("aligned new huge, handler throws bad_alloc on call 3",
            [&] { return ::operator new(huge, a64); });
    attempt("nothrow new huge, handler throws bad_alloc on call 3",
            [&] { return ::operator new(huge, std::nothrow); });
    attempt("aligned nothrow new[] huge, handler throws bad_alloc on call 3",
            [&] { return ::operator new[](huge, a4096, std::nothrow); });

    handler_limit = 4;
    std::set_new_handler(handler_then_custom);
    attempt("new huge, handler throws Custom on call 4", [&] { return ::operator new(huge); });
    attempt("aligned new[] huge, handler throws Custom on call 4",
            [&] { return ::operator new[](huge, a64); });

    handler_limit = 2;
    std::set_new_handler(handler_then_uninstall);
    attempt("new huge, handler uninstalls itself on call 2", [&] { return ::operator new(huge); });
    handler_limit = 2;
    std::set_new_handler(handler_then_uninstall);
    attempt("nothrow new[] huge, handler uninstalls itself on call 2",
            [&] { return ::operator new[](huge, std::nothrow); });
    std::set_new_handler(nullptr);

    /* After all that, new still works. */
    Obj *o = new Obj();
    use(o);
    printf("new after the failures: %s\n", o && o->x == 0 ? "ok" : "broken");
    delete o;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "nothrow-first") == 0) {
        /* No operator new has run in this process yet (printf-only program). */
        handler_limit = 2;
        std::set_new_handler(handler_then_bad_alloc);
        attempt("first new of the process: nothrow new huge, handler throws bad_alloc on "
                "call 2",
                [] { return ::operator new(opaque(HUGE_SIZE), std::nothrow); });
        std::set_new_handler(nullptr);
        attempt("then new huge", [] { return ::operator new(opaque(HUGE_SIZE)); });
        puts("done");
        return 0;
    }

    Tally sites[SITES] = {
        {"new", 0, 0, 0, 0},
        {"new_array", 0, 0, 0, 0},
        {"new_nothrow", 0, 0, 0, 0},
        {"new_array_nothrow", 0, 0, 0, 0},
        {"new_aligned", 0, 0, 0, 0},
        {"new_aligned_page", 0, 0, 0, 0},
        {"new_array_aligned", 0, 0, 0, 0},
        {"new_aligned_nothrow", 0, 0, 0, 0},
        {"new_array_aligned_nothrow", 0, 0, 0, 0},
    };
    site_new(&sites[0]);
    site_new_array(&sites[1]);
    site_new_nothrow(&sites[2]);
    site_new_array_nothrow(&sites[3]);
    site_new_aligned(&sites[4]);
    site_new_aligned_page(&sites[5]);
    site_new_array_aligned(&sites[6]);
    site_new_aligned_nothrow(&sites[7]);
    site_new_array_aligned_nothrow(&sites[8]);
    /* Opened after the sites ran, so that its buffer is not among their allocations. */
    FILE *tally_file = argc >= 2 ? fopen(argv[1], "w") : NULL;
    if (argc >= 2 && !tally_file) {
        perror(argv[1]);
        return 2;
    }
    for (const Tally &t : sites)
        print(&t, tally_file);
    if (tally_file && fclose(tally_file) != 0) {
        perror(argv[1]);
        return 2;
    }

    out_of_memory_checks();
    puts("done");
    return 0;
}
