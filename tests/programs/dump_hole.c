/* A thread blocked in a system call whose stack, above its stack pointer, has a page that is
 * no longer mapped (what a thread dump finds when the thread exits and its stack is unmapped
 * while the dump unwinds it, made to happen every time): the thread recurses, unmaps a page
 * holding its callers' frames, then sleeps for good. A thread dump must end that stack at
 * the hole instead of faulting in the background thread.
 * Usage: dump_hole SECONDS. Prints `ready pid=N`, then `survived` when it exits normally. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t holed = PTHREAD_COND_INITIALIZER;
static int ready;

__attribute__((noinline)) static void hole_then_sleep(int depth, volatile char *above) {
    volatile char pad[1024];
    pad[0] = (char)depth;
    if (depth == 24)
        above = pad; /* 16 frames (16 KiB) above the deepest one */
    if (depth > 0) {
        hole_then_sleep(depth - 1, above);
        return;
    }
    uintptr_t page = (uintptr_t)above & ~(uintptr_t)4095;
    if (munmap((void *)page, 4096) != 0) {
        perror("munmap");
        exit(2);
    }
    pthread_mutex_lock(&lock);
    ready = 1;
    pthread_cond_signal(&holed);
    pthread_mutex_unlock(&lock);
    for (;;) {
        struct timespec nap = {1, 0};
        nanosleep(&nap, NULL);
    }
}

static void *holder(void *arg) {
    (void)arg;
    hole_then_sleep(40, NULL);
    return NULL;
}

int main(int argc, char **argv) {
    int seconds = argc > 1 ? atoi(argv[1]) : 3;
    pthread_t t;
    pthread_create(&t, NULL, holder, NULL);
    pthread_mutex_lock(&lock);
    while (!ready)
        pthread_cond_wait(&holed, &lock);
    pthread_mutex_unlock(&lock);
    printf("ready pid=%d\n", (int)getpid());
    fflush(stdout);
    sleep((unsigned)seconds);
    printf("survived\n");
    fflush(stdout);
    exit(0); /* the holder never returns into its unmapped frames */
}
