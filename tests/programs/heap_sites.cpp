/*
 * heap_sites.cpp: allocation sites whose totals are known, for the heap-profile tests.
 *
 * Ground truth
 * ------------
 * Each site is its own non-inlined function, called from main, that calls the
 * allocator itself (so it is the leaf of its samples once the allocator's frames are
 * removed). No site tail-calls the allocator: every pointer is used after the call
 * (an empty asm statement that takes it as input), so each site keeps a frame of its
 * own. The sites are `extern "C"`, so their names in a profile are plain.
 *
 *   site_small        16M x malloc(64), each freed at once         (>= 512 MiB allocated)
 *   site_large        600 x malloc(1 MiB), each freed at once      (>= 512 MiB allocated)
 *   site_live         600 x malloc(1 MiB), never freed             (>= 512 MiB live at exit)
 *   site_grow         72 cycles of realloc doubling a buffer from 4 KiB to 4 MiB, then
 *                     freed; the last cycle's buffer is kept       (>= 512 MiB allocated)
 *   site_zeroed       600 x calloc(256, 4096), each freed          (>= 512 MiB allocated)
 *   site_aligned      16384 x posix_memalign(4096, 64 KiB), freed  (>= 512 MiB allocated)
 *   site_aligned_mix  4096 x aligned_alloc(64, 4096) + 4096 x memalign(256, 12288), freed
 *   site_cxx_array    4096 x new Obj[1024] (24 KiB); all but the last 1024 deleted.
 *                     libstdc++'s operator new calls malloc, so these samples have
 *                     `operator new` frames below the site; the tests skip them.
 *   site_leak         16384 x malloc(64 KiB), pointers dropped     (>= 512 MiB live at exit)
 *
 * The sites of small objects allocate about 1 GiB, so that their estimates at the default
 * rate (about 2000 samples, 2 % standard deviation) stay far inside the tests' 10 % bound.
 *
 * Every successful realloc counts as one allocation of its new block (and a free of the
 * old one), as anyprof (and Go's MemStats) count it. Sizes are usable sizes
 * (malloc_usable_size), which is what the profiler records. Blocks of 128 KiB and more
 * are mmapped (M_MMAP_THRESHOLD is fixed, which also turns off glibc's dynamic
 * threshold), so large blocks are never touched: calloc needs no memset, and the live
 * set costs address space, not memory.
 *
 * Each allocation call is marked with a comment `alloc: SITE` on its line: samples are
 * attributed to return address - 1, so the site's leaf frame must be on that line.
 *
 * Output: one line per site,
 *   site NAME objects=N alloc_bytes=B live_objects=M live_bytes=L size=S
 * (S = the usable size of every object if they all have the same, else 0), then `done`.
 *
 * Usage:
 *   heap_sites [DIVISOR]   all sites, every count divided by DIVISOR (at least 1 each);
 *                          default 1 (well under 1 s on a fast machine, with or without
 *                          the profiler at its default rate)
 *   heap_sites count N     only site_small, with N objects (for exact counter differences)
 *   heap_sites hold SECS   a small live set, then SECS seconds of allocating every 10 ms
 *                          (prints `ready` first, flushed) for periodic/on-signal profiles
 */
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <new>
#include <type_traits>

struct Tally {
    const char *name;
    unsigned long objects, alloc_bytes, live_objects, live_bytes;
    size_t size; /* the common usable size; (size_t)-1 = mixed */
    bool any;
};

static void add(Tally *t, void *p, bool live) {
    size_t u = malloc_usable_size(p);
    t->objects++;
    t->alloc_bytes += u;
    if (live) {
        t->live_objects++;
        t->live_bytes += u;
    }
    if (!t->any) {
        t->size = u;
        t->any = true;
    } else if (t->size != u) {
        t->size = (size_t)-1;
    }
}

static void print(const Tally *t) {
    printf("site %s objects=%lu alloc_bytes=%lu live_objects=%lu live_bytes=%lu size=%zu\n",
           t->name, t->objects, t->alloc_bytes, t->live_objects, t->live_bytes,
           t->size == (size_t)-1 ? (size_t)0 : t->size);
}

/* Keeps a pointer "used" after the call that produced it: no tail call, no elision. */
static inline void use(void *p) { __asm__ volatile("" : : "r"(p) : "memory"); }

static unsigned long scaled(unsigned long n, unsigned long divisor) {
    unsigned long k = n / divisor;
    return k ? k : 1;
}

/* Reachable at exit, so "live" is not a leak-checker's leak. */
static void *live_set[600];

struct Obj {
    double x, y, z;
    Obj() : x(1), y(2), z(3) {}
};
/* A trivially destructible element type: new[] adds no array cookie, so the pointer
 * new[] returns is the block malloc returned and malloc_usable_size applies to it. */
static_assert(std::is_trivially_destructible<Obj>::value, "no array cookie");
static_assert(sizeof(Obj) == 24, "Obj is 24 bytes");
static Obj *cxx_live[1024];

extern "C" {

__attribute__((noinline, noclone)) void site_small(Tally *t, unsigned long n) {
    for (unsigned long i = 0; i < n; i++) {
        void *p = malloc(64); /* alloc: site_small */
        use(p);
        add(t, p, false);
        free(p);
    }
}

__attribute__((noinline, noclone)) void site_large(Tally *t, unsigned long n) {
    for (unsigned long i = 0; i < n; i++) {
        void *p = malloc(1 << 20); /* alloc: site_large */
        use(p);
        add(t, p, false);
        free(p);
    }
}

__attribute__((noinline, noclone)) void site_live(Tally *t, unsigned long n) {
    for (unsigned long i = 0; i < n && i < 600; i++) {
        void *p = malloc(1 << 20); /* alloc: site_live */
        use(p);
        add(t, p, true);
        live_set[i] = p;
    }
}

__attribute__((noinline, noclone)) void *site_grow(Tally *t, unsigned long cycles) {
    void *keep = NULL;
    for (unsigned long c = 0; c < cycles; c++) {
        void *p = NULL;
        for (size_t size = 4096; size <= (4u << 20); size *= 2) {
            void *q = realloc(p, size); /* alloc: site_grow */
            use(q);
            if (!q) abort();
            p = q;
            add(t, p, false);
        }
        if (c + 1 < cycles) {
            free(p);
        } else {
            keep = p;
            size_t u = malloc_usable_size(p);
            t->live_objects++;
            t->live_bytes += u;
        }
    }
    return keep;
}

__attribute__((noinline, noclone)) void site_zeroed(Tally *t, unsigned long n) {
    for (unsigned long i = 0; i < n; i++) {
        void *p = calloc(256, 4096); /* alloc: site_zeroed */
        use(p);
        add(t, p, false);
        free(p);
    }
}

__attribute__((noinline, noclone)) void site_aligned(Tally *t, unsigned long n) {
    for (unsigned long i = 0; i < n; i++) {
        void *p = NULL;
        if (posix_memalign(&p, 4096, 64 << 10) != 0) abort(); /* alloc: site_aligned */
        use(p);
        add(t, p, false);
        free(p);
    }
}

__attribute__((noinline, noclone)) void site_aligned_mix(Tally *t, unsigned long n) {
    for (unsigned long i = 0; i < n; i++) {
        void *p = aligned_alloc(64, 4096); /* alloc: site_aligned_mix */
        use(p);
        add(t, p, false);
        void *q = memalign(256, 12288); /* alloc: site_aligned_mix */
        use(q);
        add(t, q, false);
        free(p);
        free(q);
    }
}

__attribute__((noinline, noclone)) void site_cxx_array(Tally *t, unsigned long n,
                                                       unsigned long keep) {
    for (unsigned long i = 0; i < n; i++) {
        Obj *a = new Obj[1024]; /* alloc: site_cxx_array */
        use(a);
        bool live = i >= n - keep;
        add(t, a, live);
        if (live)
            cxx_live[i - (n - keep)] = a;
        else
            delete[] a;
    }
}

__attribute__((noinline, noclone)) void site_leak(Tally *t, unsigned long n) {
    for (unsigned long i = 0; i < n; i++) {
        void *p = malloc(64 << 10); /* alloc: site_leak */
        use(p);
        add(t, p, true);
        /* p is dropped: a leak. */
    }
}

} /* extern "C" */

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

int main(int argc, char **argv) {
    mallopt(M_MMAP_THRESHOLD, 128 * 1024);

    if (argc >= 3 && strcmp(argv[1], "count") == 0) {
        Tally small = {"small", 0, 0, 0, 0, 0, false};
        site_small(&small, strtoul(argv[2], NULL, 10));
        print(&small);
        puts("done");
        return 0;
    }

    if (argc >= 3 && strcmp(argv[1], "hold") == 0) {
        long ms = (long)(atof(argv[2]) * 1000);
        Tally live = {"live", 0, 0, 0, 0, 0, false};
        Tally small = {"small", 0, 0, 0, 0, 0, false};
        site_live(&live, 64);
        puts("ready");
        fflush(stdout);
        for (long waited = 0; waited < ms; waited += 10) {
            site_small(&small, 1000);
            sleep_ms(10);
        }
        print(&live);
        puts("done");
        return 0;
    }

    unsigned long d = argc >= 2 ? strtoul(argv[1], NULL, 10) : 1;
    if (d == 0) d = 1;

    Tally small = {"small", 0, 0, 0, 0, 0, false};
    Tally large = {"large", 0, 0, 0, 0, 0, false};
    Tally live = {"live", 0, 0, 0, 0, 0, false};
    Tally grow = {"grow", 0, 0, 0, 0, 0, false};
    Tally zeroed = {"zeroed", 0, 0, 0, 0, 0, false};
    Tally aligned = {"aligned", 0, 0, 0, 0, 0, false};
    Tally aligned_mix = {"aligned_mix", 0, 0, 0, 0, 0, false};
    Tally cxx_array = {"cxx_array", 0, 0, 0, 0, 0, false};
    Tally leak = {"leak", 0, 0, 0, 0, 0, false};

    site_small(&small, scaled(16000000, d));
    site_large(&large, scaled(600, d));
    site_live(&live, scaled(600, d));
    void *kept = site_grow(&grow, scaled(72, d));
    use(kept);
    site_zeroed(&zeroed, scaled(600, d));
    site_aligned(&aligned, scaled(16384, d));
    site_aligned_mix(&aligned_mix, scaled(4096, d));
    unsigned long arrays = scaled(4096, d);
    site_cxx_array(&cxx_array, arrays, scaled(1024, d) < arrays ? scaled(1024, d) : arrays);
    site_leak(&leak, scaled(16384, d));

    const Tally *all[] = {&small, &large, &live, &grow, &zeroed,
                          &aligned, &aligned_mix, &cxx_array, &leak};
    for (const Tally *t : all) print(t);
    puts("done");
    return 0;
}
