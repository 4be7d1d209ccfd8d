/* Prints errno as main finds it and as a forked child finds it after fork() returns, then
 * burns a little CPU (so the recorded run has samples) and exits with 5. A preload's
 * constructor or fork handler that leaves errno changed shows here. */
#include <errno.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void) {
    int at_main = errno;
    printf("errno at main: %d\n", at_main);
    fflush(stdout);
    errno = 0;
    pid_t pid = fork();
    if (pid == 0) {
        printf("errno in the forked child: %d\n", errno);
        fflush(stdout);
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    volatile unsigned long x = 0;
    for (unsigned long i = 0; i < 300000000UL; i++) x += i ^ (x >> 3);
    printf("child status %d\n", status);
    return 5;
}
