/* A single-threaded program that looks at what glibc and /proc say about its threads while
 * it is profiled, then (with an argument) loads a library, runs in it, and starts a thread.
 *
 * Prints: "heap_at_start=B", the bytes in use in glibc's heap as main starts (mallinfo2);
 * "before: single=S tasks=N" after a second of CPU and allocation; with "plugin
 * PATH", runs PATH's plugin_burn for about a second (found with dlopen + dlsym); with
 * "thread", then runs a thread for about half a second and prints "after: single=S
 * tasks=N" while it runs. tests/tests/thread_free.rs. */
#include <dirent.h>
#include <dlfcn.h>
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

extern char __libc_single_threaded;
static volatile unsigned long sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

__attribute__((noinline)) static void main_burn(double seconds) {
    double end = now() + seconds;
    void *blocks[64];
    while (now() < end) {
        for (int i = 0; i < 64; i++) blocks[i] = malloc(16 + i * 61);
        for (int i = 0; i < 64; i++) free(blocks[i]);
        for (int i = 0; i < 20000; i++) sink += i;
    }
}

static int tasks(void) {
    int n = 0;
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (e->d_name[0] != '.') n++;
    if (d) closedir(d);
    return n;
}

static volatile int thread_done;
static volatile int thread_tasks;

__attribute__((noinline)) static void *thread_burn(void *arg) {
    (void)arg;
    double end = now() + 0.5;
    thread_tasks = tasks();
    while (now() < end)
        for (int i = 0; i < 20000; i++) sink += i;
    return NULL;
}

int main(int argc, char **argv) {
    size_t at_start = mallinfo2().uordblks;
    printf("heap_at_start=%zu\n", at_start);
    main_burn(1.0);
    printf("before: single=%d tasks=%d\n", __libc_single_threaded, tasks());
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "plugin") && i + 1 < argc) {
            void *h = dlopen(argv[++i], RTLD_NOW);
            if (!h) {
                printf("dlopen: %s\n", dlerror());
                return 1;
            }
            void (*burn)(double) = (void (*)(double))dlsym(h, "plugin_burn");
            if (!burn) return 1;
            burn(1.0);
        } else if (!strcmp(argv[i], "thread")) {
            pthread_t t;
            pthread_create(&t, NULL, thread_burn, NULL);
            pthread_join(t, NULL);
            printf("after: single=%d tasks=%d\n", __libc_single_threaded, thread_tasks);
        }
    }
    return 0;
}
