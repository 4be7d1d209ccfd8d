/* A program that sandboxes itself after it started, as browsers and daemons do: its main
 * thread (not the others: no SECCOMP_FILTER_FLAG_TSYNC) installs a seccomp filter that kills
 * the process on perf_event_open, then starts threads that do CPU work. Those threads inherit
 * the filter, so a profiler must not open perf events from them.
 * Usage: perf_sandbox. Prints `survived` when it exits normally. */
#define _GNU_SOURCE
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

__attribute__((noinline)) static void *sandboxed_work(void *arg) {
    volatile unsigned long x = (unsigned long)arg;
    for (int i = 0; i < 20000000; i++) x = x * 6364136223846793005UL + 1442695040888963407UL;
    return (void *)x;
}

static void *idle(void *arg) {
    return arg;
}

int main(void) {
    /* A thread first, so that the process is multi-threaded before the sandbox. */
    pthread_t first;
    if (pthread_create(&first, NULL, idle, NULL) != 0) return 1;
    pthread_join(first, NULL);
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_perf_event_open, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof filter / sizeof filter[0], filter};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0) {
        perror("seccomp");
        return 1;
    }
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        if (pthread_create(&t[i], NULL, sandboxed_work, (void *)(unsigned long)i) != 0) return 1;
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    printf("survived\n");
    return 0;
}
