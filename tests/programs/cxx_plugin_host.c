/*
 * cxx_plugin_host.c: a C program (no libstdc++) that loads a C++ plugin with
 * dlopen(RTLD_NOW | RTLD_LOCAL) and prints what it reports (see cxx_plugin.cpp).
 *
 * Usage:
 *   cxx_plugin_host PLUGIN.so run [TALLY_FILE]
 *       plugin_run's lines on stdout; plugin_tally's line (usable sizes, which depend on the
 *       heap's layout) to TALLY_FILE if given
 *   cxx_plugin_host PLUGIN.so oom
 *       plugin_oom's lines on stdout
 * Then `done`. Exit status 0, or 2 with a message on stderr if something is missing.
 *
 * In run mode the host waits 300 ms after dlopen before calling the plugin: a profiler whose
 * malloc hook may not reach the loader (anyprof) learns about a newly loaded library on its
 * background thread's next cycle, and the test asks for exact stacks at rate 1.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

typedef int (*entry_fn)(char *, size_t);

static char buf[8192];

static entry_fn entry(void *h, const char *name) {
    entry_fn f = (entry_fn)dlsym(h, name);
    if (!f)
        fprintf(stderr, "dlsym %s: %s\n", name, dlerror());
    return f;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s PLUGIN.so run [TALLY_FILE] | oom\n", argv[0]);
        return 2;
    }
    void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "dlopen %s: %s\n", argv[1], dlerror());
        return 2;
    }
    if (strcmp(argv[2], "run") == 0) {
        struct timespec settle = {0, 300 * 1000 * 1000};
        nanosleep(&settle, NULL);
        entry_fn run = entry(h, "plugin_run"), tally = entry(h, "plugin_tally");
        if (!run || !tally)
            return 2;
        if (run(buf, sizeof buf) != 0)
            return 2;
        fputs(buf, stdout);
        if (argc >= 4) {
            if (tally(buf, sizeof buf) != 0)
                return 2;
            FILE *f = fopen(argv[3], "w");
            if (!f || fputs(buf, f) < 0 || fclose(f) != 0) {
                perror(argv[3]);
                return 2;
            }
        }
    } else if (strcmp(argv[2], "oom") == 0) {
        entry_fn oom = entry(h, "plugin_oom");
        if (!oom || oom(buf, sizeof buf) != 0)
            return 2;
        fputs(buf, stdout);
    } else {
        fprintf(stderr, "unknown mode %s\n", argv[2]);
        return 2;
    }
    puts("done");
    return 0;
}
