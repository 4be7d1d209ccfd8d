/* A library single_thread.c loads with dlopen and runs: about the given seconds of thread CPU
 * time in plugin_inner, called from plugin_burn. tests/tests/thread_free.rs. */
#include <time.h>

static volatile unsigned long sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

__attribute__((noinline)) void plugin_inner(void) {
    for (int i = 0; i < 20000; i++) sink += i;
}

void plugin_burn(double seconds) {
    double end = now() + seconds;
    while (now() < end) plugin_inner();
}
