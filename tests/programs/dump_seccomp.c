/* A program that puts every one of its threads (SECCOMP_FILTER_FLAG_TSYNC: a preloaded
 * profiler's too) under a seccomp filter that kills the process on process_vm_readv, as
 * sandboxes do for calls they do not expect, while one of its threads is blocked in a
 * system call. A thread dump must not make that call.
 * Usage: dump_seccomp SECONDS. Prints `ready pid=N`, then `survived` when it exits normally. */
#define _GNU_SOURCE
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) static void *sandboxed_sleeper(void *arg) {
    (void)arg;
    for (;;) {
        struct timespec nap = {1, 0};
        nanosleep(&nap, NULL);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int seconds = argc > 1 ? atoi(argv[1]) : 4;
    pthread_t t;
    if (pthread_create(&t, NULL, sandboxed_sleeper, NULL) != 0) {
        fprintf(stderr, "pthread_create failed\n");
        return 1;
    }
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_process_vm_readv, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof filter / sizeof filter[0], filter};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog) != 0) {
        perror("seccomp");
        return 1;
    }
    printf("ready pid=%d\n", (int)getpid());
    fflush(stdout);
    sleep((unsigned)seconds);
    printf("survived\n");
    return 0;
}
