/*
 * clone_keeps_socket.c: a process whose connection to anyprof outlives it, for the test that
 * a gone process is not shown under its pid (issue 12 review: a pid reused by another user's
 * process must not inherit the session).
 *
 * It prints `ready pid=<pid>` and waits for a line on stdin. Then it makes a child with
 * clone() without CLONE_VM (so glibc runs no fork handlers and the child keeps every
 * descriptor, anyprof's socket included), prints `child=<pid>`, and ends with _exit(0).
 * The child sleeps for 60 s holding the socket; the test kills it.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static int child_main(void *arg) {
    (void)arg;
    sleep(60);
    return 0;
}

int main(void) {
    printf("ready pid=%d\n", (int)getpid());
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    size_t size = 256 * 1024;
    char *stack = malloc(size);
    if (!stack)
        return 1;
    int child = clone(child_main, stack + size, SIGCHLD, NULL);
    if (child < 0) {
        perror("clone");
        return 1;
    }
    printf("child=%d\n", child);
    fflush(stdout);
    _exit(0);
}
