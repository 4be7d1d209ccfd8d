/* Every thread of the program ends through pthread_exit or by returning from its start
 * routine, never through exit(): glibc then ends the process with exit(0) when the last one
 * is gone (and runs atexit handlers). Both ways: the main thread calls pthread_exit while a
 * worker runs on, and a child forked from a worker thread (as CPython's test_threading does)
 * ends when that thread returns. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void at_exit(void) { printf("atexit\n"); }

static void *forker(void *arg) {
    (void)arg;
    pid_t pid = fork();
    if (pid == 0) {
        printf("child: worker returns\n");
        fflush(stdout);
        return NULL; /* the child's only thread ends here */
    }
    int status = 0;
    waitpid(pid, &status, 0);
    printf("parent: child exited %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    fflush(stdout);
    return NULL;
}

int main(void) {
    atexit(at_exit);
    pthread_t t;
    pthread_create(&t, NULL, forker, NULL);
    pthread_exit(NULL); /* the process lives on until the worker ends */
}
