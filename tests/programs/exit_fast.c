/*
 * exit_fast.c: a program that ends with _exit (no atexit handlers, no destructors) right
 * after its last allocations, for the robustness tests. A profiler that sends its data
 * from a destructor, or on a 20 ms cycle, loses those allocations.
 *
 *   exit_fast direct   allocate, then _exit(0)
 *   exit_fast signal   allocate, then raise SIGTERM, whose handler calls _exit(0)
 *   exit_fast child    fork; the child allocates and calls _exit(0); the parent waits
 *                      for it and returns from main
 *   exit_fast vfork    vfork; the child calls _exit(0) at once (as after a failed exec),
 *                      running on the parent's memory; the parent then allocates and
 *                      returns from main: the child's _exit must not end the parent's
 *                      profile
 *
 * Ground truth: last_allocs() makes 100 blocks of 4096 bytes, kept live, and prints
 * "allocated N" (flushed) with N their total malloc_usable_size, the size a heap profile
 * counts; the program exits 0.
 */
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void *volatile keep[100];

__attribute__((noinline)) static void last_allocs(void) {
    size_t total = 0;
    for (int i = 0; i < 100; i++) {
        keep[i] = malloc(4096);
        memset(keep[i], 1, 64);
        total += malloc_usable_size(keep[i]);
    }
    printf("allocated %zu\n", total);
    fflush(stdout);
}

static void on_term(int sig) {
    (void)sig;
    _exit(0);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "direct";
    if (strcmp(mode, "child") == 0) {
        pid_t pid = fork();
        if (pid == 0) {
            last_allocs();
            _exit(0);
        }
        int status = 0;
        waitpid(pid, &status, 0);
        return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
    }
    if (strcmp(mode, "vfork") == 0) {
        pid_t pid = vfork();
        if (pid == 0) _exit(0);
        int status = 0;
        waitpid(pid, &status, 0);
        last_allocs();
        return 0;
    }
    last_allocs();
    if (strcmp(mode, "signal") == 0) {
        signal(SIGTERM, on_term);
        raise(SIGTERM);
    }
    _exit(0);
}
