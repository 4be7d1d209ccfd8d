/* Threads that come and go while the profiler dumps every thread's stack: each short-lived
 * thread has a 64 MiB stack (more than glibc's 40 MiB stack cache, so its stack is unmapped
 * as soon as it is joined), recurses a little, sleeps a moment in a system call (so that a
 * thread dump unwinds it from the background thread, not through a signal) and returns.
 * Usage: dump_churn SECONDS. Prints `ready pid=N`, then `churned N` at the end. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static volatile int stop;
static volatile long churned;

__attribute__((noinline)) static int churn_leaf(int depth) {
    volatile char pad[512];
    pad[0] = (char)depth;
    if (depth > 0)
        return churn_leaf(depth - 1) + pad[0];
    struct timespec nap = {0, 300 * 1000};
    nanosleep(&nap, NULL);
    return pad[0];
}

static void *short_lived(void *arg) {
    (void)arg;
    churn_leaf(20);
    return NULL;
}

static void *churner(void *arg) {
    (void)arg;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 << 20);
    while (!stop) {
        pthread_t t;
        if (pthread_create(&t, &attr, short_lived, NULL) != 0)
            continue;
        pthread_join(t, NULL);
        __atomic_add_fetch(&churned, 1, __ATOMIC_RELAXED);
    }
    pthread_attr_destroy(&attr);
    return NULL;
}

int main(int argc, char **argv) {
    int seconds = argc > 1 ? atoi(argv[1]) : 5;
    printf("ready pid=%d\n", (int)getpid());
    fflush(stdout);
    pthread_t c[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&c[i], NULL, churner, NULL);
    sleep((unsigned)seconds);
    stop = 1;
    for (int i = 0; i < 4; i++)
        pthread_join(c[i], NULL);
    printf("churned %ld\n", churned);
    return 0;
}
