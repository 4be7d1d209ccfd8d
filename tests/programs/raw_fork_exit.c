/* Forks with the raw system call (no atfork handlers run, as with Chromium's zygote or
 * _Fork), lets the child end through exit() (destructors run), then keeps working. The
 * child must not end its parent's profile: burn_after_the_child must be sampled. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double cpu_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) static unsigned long burn(double seconds) {
    volatile unsigned long x = 0;
    double until = cpu_seconds() + seconds;
    while (cpu_seconds() < until)
        for (int i = 0; i < 100000; i++) x += i ^ (x >> 3);
    return x;
}

__attribute__((noinline)) unsigned long burn_before_the_fork(void) { return burn(0.3); }
__attribute__((noinline)) unsigned long burn_after_the_child(void) { return burn(0.8); }

int main(void) {
    burn_before_the_fork();
    long pid = syscall(SYS_fork);
    if (pid == 0) exit(0);
    int status = 0;
    waitpid((pid_t)pid, &status, 0);
    burn_after_the_child();
    printf("child exited %d\n", WEXITSTATUS(status));
    return 0;
}
