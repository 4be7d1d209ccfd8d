/* Counts how often the preloaded library looks up `sigaction` and `signal` with dlsym while
 * the program calls them (from a signal handler too). The program defines `dlsym` itself and
 * exports it (-rdynamic), so the library's calls reach this one first; RTLD_NEXT lookups are
 * answered from libc, which is what follows the library for these names.
 * Usage: sigaction_lookups. Prints `sigaction lookups N, signal lookups M`. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void *(*real_dlsym)(void *, const char *);
static void *libc_handle;
static volatile int sigaction_lookups, signal_lookups;

void *dlsym(void *handle, const char *name) {
    if (!real_dlsym)
        real_dlsym = (void *(*)(void *, const char *))dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
    if (!real_dlsym)
        real_dlsym = (void *(*)(void *, const char *))dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
    if (strcmp(name, "sigaction") == 0)
        sigaction_lookups++;
    if (strcmp(name, "signal") == 0)
        signal_lookups++;
    if (handle == RTLD_NEXT) {
        /* Our caller is the library, not this program: what follows it is libc. */
        if (!libc_handle)
            libc_handle = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
        return libc_handle ? real_dlsym(libc_handle, name) : NULL;
    }
    return real_dlsym(handle, name);
}

static void on_usr1(int sig) {
    /* A handler that changes dispositions, as some programs' handlers do. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGUSR2, &sa, NULL);
    signal(SIGUSR2, SIG_DFL);
    (void)sig;
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    for (int i = 0; i < 200; i++) {
        sigaction(SIGUSR1, &sa, NULL);
        signal(SIGHUP, SIG_IGN);
        raise(SIGUSR1);
    }
    printf("sigaction lookups %d, signal lookups %d\n", sigaction_lookups, signal_lookups);
    return 0;
}
