/* A single-threaded program (so it runs without a thread of anyprof's) that forks, and whose
 * child starts a thread: the two cases where our thread starts in an unusual place.
 *
 *   fork_thread atfork   A library-style pthread_atfork child handler starts the child's
 *                        thread, from inside fork(), while fork's handlers run.
 *   fork_thread _Fork    The child is made with _Fork(), which runs no fork handler (ours
 *                        neither), and starts a thread itself; it leaves with _exit.
 *
 * Either way: main_burn runs about 0.5 s of CPU in the parent before the fork, the child's
 * thread runs child_burn for about 0.3 s of CPU and allocates, the child exits with 0, and
 * the parent runs main_burn again for 0.3 s after the child exited, then exits with 0 if the
 * child did ("child=0" on stdout). tests/tests/thread_free.rs. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

pid_t _Fork(void);

static volatile unsigned long sink;
static pthread_t child_thread;
static int child_thread_started;

static double cpu_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

__attribute__((noinline)) static void burn(double seconds) {
    double end = cpu_now() + seconds;
    void *blocks[32];
    while (cpu_now() < end) {
        for (int i = 0; i < 32; i++) blocks[i] = malloc(16 + i * 97);
        for (int i = 0; i < 32; i++) free(blocks[i]);
        for (int i = 0; i < 20000; i++) sink += i;
    }
}

__attribute__((noinline)) static void main_burn(double seconds) { burn(seconds); }

__attribute__((noinline)) static void *child_burn(void *arg) {
    (void)arg;
    burn(0.3);
    return NULL;
}

static void start_child_thread(void) {
    child_thread_started = pthread_create(&child_thread, NULL, child_burn, NULL) == 0;
}

int main(int argc, char **argv) {
    int with_fork_handler = argc > 1 && strcmp(argv[1], "atfork") == 0;
    if (with_fork_handler) pthread_atfork(NULL, NULL, start_child_thread);
    main_burn(0.5);
    fflush(stdout);
    pid_t pid = with_fork_handler ? fork() : _Fork();
    if (pid < 0) {
        perror("fork");
        return 2;
    }
    if (pid == 0) {
        if (!with_fork_handler) start_child_thread();
        if (!child_thread_started) _exit(3);
        pthread_join(child_thread, NULL);
        if (with_fork_handler) exit(0);
        _exit(0);
    }
    int status = 0;
    if (waitpid(pid, &status, 0) != pid) {
        perror("waitpid");
        return 2;
    }
    main_burn(0.3);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    printf("child=%d\n", code);
    return code;
}
