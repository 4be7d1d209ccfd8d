/*
 * posix_spawn and vfork+exec: children started the two ways glibc and shells use, without
 * atfork handlers running in the child. Prints each child's exit status and its own line;
 * the output must be the same with and without the profiler.
 */
#define _GNU_SOURCE
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

int main(void) {
    for (int i = 0; i < 20; i++) {
        pid_t pid;
        char *argv[] = {"/bin/echo", "spawned", NULL};
        fflush(stdout);
        if (posix_spawn(&pid, "/bin/echo", NULL, NULL, argv, environ) != 0) {
            printf("posix_spawn failed\n");
            return 1;
        }
        int status;
        waitpid(pid, &status, 0);
        printf("spawn %d status %d\n", i, WEXITSTATUS(status));
        fflush(stdout);
        pid_t v = vfork();
        if (v == 0) {
            execl("/bin/sh", "sh", "-c", "echo vforked; exit 3", (char *)NULL);
            _exit(127);
        }
        waitpid(v, &status, 0);
        printf("vfork %d status %d\n", i, WEXITSTATUS(status));
    }
    return 0;
}
