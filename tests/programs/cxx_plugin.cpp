/*
 * cxx_plugin.cpp: a C++ plugin for cxx_plugin_host.c, which dlopen()s it with
 * RTLD_NOW | RTLD_LOCAL. The host is C and does not link libstdc++, so libstdc++ arrives
 * with the plugin and is not in the global scope: a preloaded library that looks up the next
 * operator new with dlsym(RTLD_NEXT) does not find it.
 *
 * Build: c++ -shared -fPIC -O2 -g -o libcxx_plugin.so cxx_plugin.cpp
 *
 * Ground truth
 * ------------
 *   site_plugin   N x new Obj[1 + i % 40] (24-byte trivially destructible Obj: no array
 *                 cookie) and N x new Obj, for N = 3000; the last 200 of each are kept live
 *                 until exit (reachable from a global array), the others deleted at once
 *                 (delete[] and sized delete). One non-inlined extern "C" function, the
 *                 first frame of its samples apart from `operator new` frames.
 *
 * Exported (extern "C"):
 *   int plugin_run(char *out, size_t len)
 *       runs site_plugin, then throws and catches a std::runtime_error in the plugin; writes
 *       the deterministic part of the result to `out` (one line per fact) and returns 0.
 *   int plugin_tally(char *out, size_t len)
 *       after plugin_run: the site's usable sizes (malloc_usable_size, which depends on the
 *       heap's layout), `site plugin objects=N alloc_bytes=B live_objects=M live_bytes=L`.
 *   int plugin_oom(char *out, size_t len)
 *       the ways a new reports running out of memory, inside the plugin: a huge new caught
 *       as std::bad_alloc, a huge nothrow new returning null, and a new-handler that counts
 *       its calls and throws on the third.
 */
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace {

struct Obj {
    double x, y, z;
};
static_assert(std::is_trivially_destructible<Obj>::value, "no array cookie");

enum { N = 3000, KEEP = 200 };
void *live_arrays[KEEP];
void *live_objects[KEEP];

struct Tally {
    unsigned long objects, alloc_bytes, live_objects, live_bytes;
} tally;

inline void use(void *p) { __asm__ volatile("" : : "r"(p) : "memory"); }

size_t opaque(size_t n) {
    __asm__ volatile("" : "+r"(n));
    return n;
}

void add(void *p, bool live) {
    size_t u = malloc_usable_size(p);
    tally.objects++;
    tally.alloc_bytes += u;
    if (live) {
        tally.live_objects++;
        tally.live_bytes += u;
    }
}

int handler_calls;

void counting_handler() {
    if (++handler_calls >= 3)
        throw std::bad_alloc();
}

/* Runs `alloc` and says what happened, appended to `out`. */
template <typename F> void attempt(std::string &out, const char *what, F alloc) {
    handler_calls = 0;
    const char *outcome = "returned non-null";
    try {
        void *p = alloc();
        use(p);
        if (!p)
            outcome = "returned null";
    } catch (const std::bad_alloc &) {
        outcome = "threw std::bad_alloc";
    } catch (...) {
        outcome = "threw something else";
    }
    char line[200];
    snprintf(line, sizeof line, "plugin %s: %s, new-handler calls %d\n", what, outcome,
             handler_calls);
    out += line;
}

int copy_out(const std::string &s, char *out, size_t len) {
    if (s.size() + 1 > len)
        return 1;
    memcpy(out, s.c_str(), s.size() + 1);
    return 0;
}

__attribute__((noinline)) void thrower(int n) {
    throw std::runtime_error("plugin exception number " + std::to_string(n) +
                             ", long enough not to fit in a small string");
}

} // namespace

extern "C" {

__attribute__((noinline, noclone)) void site_plugin() {
    for (unsigned i = 0; i < N; i++) {
        size_t n = opaque(1 + i % 40);
        Obj *a = new Obj[n]; /* alloc: site_plugin */
        use(a);
        bool live = i >= N - KEEP;
        add(a, live);
        if (live)
            live_arrays[i - (N - KEEP)] = a;
        else
            delete[] a;
        Obj *o = new Obj; /* alloc: site_plugin */
        use(o);
        add(o, live);
        if (live)
            live_objects[i - (N - KEEP)] = o;
        else
            delete o;
    }
}

__attribute__((visibility("default"))) int plugin_run(char *out, size_t len) {
    site_plugin();
    std::string s = "plugin objects=" + std::to_string(tally.objects) +
                    " live_objects=" + std::to_string(tally.live_objects) + "\n";
    for (int k = 1; k <= 3; k++) {
        try {
            thrower(k);
        } catch (const std::exception &e) {
            s += std::string("plugin caught: ") + e.what() + "\n";
        }
    }
    return copy_out(s, out, len);
}

__attribute__((visibility("default"))) int plugin_tally(char *out, size_t len) {
    char line[200];
    snprintf(line, sizeof line,
             "site plugin objects=%lu alloc_bytes=%lu live_objects=%lu live_bytes=%lu\n",
             tally.objects, tally.alloc_bytes, tally.live_objects, tally.live_bytes);
    return copy_out(line, out, len);
}

__attribute__((visibility("default"))) int plugin_oom(char *out, size_t len) {
    const size_t huge = opaque(SIZE_MAX / 2);
    std::string s;
    std::set_new_handler(nullptr);
    attempt(s, "new huge", [&] { return ::operator new(huge); });
    attempt(s, "nothrow new huge", [&] { return ::operator new(huge, std::nothrow); });
    std::set_new_handler(counting_handler);
    attempt(s, "new huge, handler throws on call 3", [&] { return ::operator new(huge); });
    attempt(s, "nothrow new huge, handler throws on call 3",
            [&] { return ::operator new(huge, std::nothrow); });
    std::set_new_handler(nullptr);
    return copy_out(s, out, len);
}

} /* extern "C" */
