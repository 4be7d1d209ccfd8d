/*
 * posix_spawn and vfork+exec: children started the two ways glibc and shells use, without
 * atfork handlers running in the child. Prints each child's exit status and its own line;
 * the output must be the same with and without the profiler.
 *
 * `robust_spawn` alone: 20 rounds of posix_spawn(/bin/echo) and vfork+exec(/bin/sh), then one
 * round that starts this program itself both ways, as `robust_spawn child spawned` (posix_spawn)
 * and `robust_spawn child vforked` (vfork+exec, exit status 3). Each such child, the ground
 * truth its profile is checked against:
 *   - site_spawned / site_vforked: exactly 1000 malloc(100) / malloc(200), 900 freed, 100
 *     live at exit (alloc_objects 1000, inuse_objects 100);
 *   - spin_spawned / spin_vforked: about 0.2 s of CPU in that function.
 */
#define _GNU_SOURCE
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static volatile unsigned long sink;
static void *kept[100];

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#define CHILD_WORK(NAME, SIZE)                                                              \
    __attribute__((noinline)) static void site_##NAME(void) {                              \
        for (int i = 0; i < 1000; i++) {                                                   \
            char *p = malloc(SIZE);                                                        \
            __asm__ volatile("" : : "r"(p) : "memory");                                    \
            p[0] = (char)i;                                                                \
            if (i % 10 == 0) kept[i / 10] = p;                                             \
            else free(p);                                                                  \
        }                                                                                  \
    }                                                                                      \
    __attribute__((noinline)) static void spin_##NAME(void) {                              \
        double end = cpu_now() + 0.2;                                                      \
        unsigned long x = 1;                                                               \
        while (cpu_now() < end)                                                            \
            for (int i = 0; i < 10000; i++) x = x * 6364136223846793005UL + SIZE;          \
        sink = x;                                                                          \
    }

/* Different sizes, so that the compiler cannot fold the two functions into one (GCC's
 * -fipa-icf at -O2 would, and both children would show one name). */
CHILD_WORK(spawned, 100)
CHILD_WORK(vforked, 200)

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "child") == 0) {
        if (strcmp(argv[2], "spawned") == 0) {
            site_spawned();
            spin_spawned();
            printf("child spawned done\n");
            return 0;
        }
        site_vforked();
        spin_vforked();
        printf("child vforked done\n");
        return 3;
    }
    int status;
    for (int i = 0; i < 20; i++) {
        pid_t pid;
        char *args[] = {"/bin/echo", "spawned", NULL};
        fflush(stdout);
        if (posix_spawn(&pid, "/bin/echo", NULL, NULL, args, environ) != 0) {
            printf("posix_spawn failed\n");
            return 1;
        }
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
    /* This program itself, both ways, doing known work in named functions. */
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) {
        printf("readlink failed\n");
        return 1;
    }
    self[n] = '\0';
    pid_t pid;
    char *spawned[] = {self, "child", "spawned", NULL};
    fflush(stdout);
    if (posix_spawn(&pid, self, NULL, NULL, spawned, environ) != 0) {
        printf("posix_spawn of itself failed\n");
        return 1;
    }
    waitpid(pid, &status, 0);
    printf("self spawn status %d\n", WEXITSTATUS(status));
    fflush(stdout);
    pid_t v = vfork();
    if (v == 0) {
        execl(self, self, "child", "vforked", (char *)NULL);
        _exit(127);
    }
    waitpid(v, &status, 0);
    printf("self vfork status %d\n", WEXITSTATUS(status));
    return 0;
}
