/* Does a malloc hook reach the dynamic loader, the file system or a locking libc call?
 *
 * The program marks its own malloc calls (a thread-local flag around each) and interposes
 * the calls a profiler's hook must not make from inside malloc: dl_iterate_phdr (takes the
 * loader's lock), readlink and realpath (the file system), pthread_getattr_np (takes a lock,
 * allocates, and for the main thread reads /proc/self/maps). Built with -rdynamic, its
 * definitions come first in the global scope, so a preloaded library's calls reach them too.
 * Each call made while the flag is set is counted.
 *
 * Two situations make a sampling profiler want those calls (run it at --mem-rate 1):
 *   1. a thread created behind the profiler's back (glibc's pthread_create, found with dlsym
 *      in libc itself, so no pthread_create interposer sees it): its stack bounds are unknown;
 *   2. allocations from the constructor of a library being dlopen'ed: the unwinder does not
 *      know the library yet.
 *
 *   hook_reach PLUGIN.so   prints "forbidden calls from inside malloc: N [names]" and
 *                          "bypass allocations: M", exits 0.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* volatile: malloc cannot see a static, so without it the compiler may drop the marks. */
static __thread volatile int in_malloc;
static int forbidden;
static char names[256];

static void note(const char *what) {
    if (!in_malloc) return;
    if (__atomic_fetch_add(&forbidden, 1, __ATOMIC_RELAXED) == 0 || !strstr(names, what)) {
        size_t n = strlen(names);
        snprintf(names + n, sizeof names - n, " %s", what);
    }
}

int dl_iterate_phdr(int (*cb)(struct dl_phdr_info *, size_t, void *), void *data) {
    int (*real)(int (*)(struct dl_phdr_info *, size_t, void *), void *) =
        dlsym(RTLD_NEXT, "dl_iterate_phdr");
    note("dl_iterate_phdr");
    return real(cb, data);
}

ssize_t readlink(const char *path, char *buf, size_t size) {
    ssize_t (*real)(const char *, char *, size_t) = dlsym(RTLD_NEXT, "readlink");
    note("readlink");
    return real(path, buf, size);
}

char *realpath(const char *path, char *resolved) {
    char *(*real)(const char *, char *) = dlsym(RTLD_NEXT, "realpath");
    note("realpath");
    return real(path, resolved);
}

int pthread_getattr_np(pthread_t thread, pthread_attr_t *attr) {
    int (*real)(pthread_t, pthread_attr_t *) = dlsym(RTLD_NEXT, "pthread_getattr_np");
    note("pthread_getattr_np");
    return real(thread, attr);
}

/* One marked malloc and its free; the plugin's constructor calls it too. */
__attribute__((noinline)) void hook_reach_marked_alloc(size_t size) {
    in_malloc = 1;
    char *p = malloc(size);
    in_malloc = 0;
    __asm__ volatile("" : : "r"(p) : "memory");
    if (p) p[0] = 1;
    free(p);
}

__attribute__((noinline)) static void *bypass_worker(void *arg) {
    (void)arg;
    for (int i = 0; i < 200; i++) hook_reach_marked_alloc(100 + (size_t)i);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PLUGIN.so\n", argv[0]);
        return 2;
    }
    void *libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
    int (*create)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *) =
        libc ? dlsym(libc, "pthread_create") : NULL;
    if (!create) {
        fprintf(stderr, "cannot find libc's pthread_create: %s\n", dlerror());
        return 1;
    }
    pthread_t t;
    if (create(&t, NULL, bypass_worker, NULL) != 0 || pthread_join(t, NULL) != 0) {
        fprintf(stderr, "pthread_create failed\n");
        return 1;
    }
    void *plugin = dlopen(argv[1], RTLD_NOW);
    if (!plugin) {
        fprintf(stderr, "dlopen %s: %s\n", argv[1], dlerror());
        return 1;
    }
    dlclose(plugin);
    printf("forbidden calls from inside malloc: %d%s\n", forbidden, names);
    return 0;
}
