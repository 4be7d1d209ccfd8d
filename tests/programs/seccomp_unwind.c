/* A program under a seccomp filter that kills the process on process_vm_readv, as sandboxes
 * do for calls they do not expect (systemd's SystemCallFilter=, browser sandboxes; container
 * profiles answer EPERM instead). It then allocates on a thread created behind any
 * pthread_create interposer (libc's own, found with dlsym in libc itself), whose stack
 * bounds a profiler does not know: a profiler that unwinds such a thread's stack from a
 * malloc hook must not make a system call the program's filter does not expect.
 *
 *   seccomp_unwind kill|errno   prints "allocations: 2000", exits 0
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

static volatile long count;

__attribute__((noinline)) void *seccomp_worker(void *arg) {
    (void)arg;
    for (int i = 0; i < 2000; i++) {
        char *p = malloc(64 + (size_t)(i % 200));
        if (!p) abort();
        p[0] = 1;
        count += p[0];
        free(p);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s kill|errno\n", argv[0]);
        return 2;
    }
    unsigned action = strcmp(argv[1], "kill") == 0 ? SECCOMP_RET_KILL_PROCESS
                                                   : SECCOMP_RET_ERRNO | 1 /* EPERM */;
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_process_vm_readv, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, action),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof filter / sizeof filter[0], filter};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
        perror("seccomp");
        return 1;
    }
    void *libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
    int (*create)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *) =
        libc ? dlsym(libc, "pthread_create") : NULL;
    if (!create) {
        fprintf(stderr, "cannot find libc's pthread_create: %s\n", dlerror());
        return 1;
    }
    pthread_t t;
    if (create(&t, NULL, seccomp_worker, NULL) != 0 || pthread_join(t, NULL) != 0) {
        fprintf(stderr, "pthread_create failed\n");
        return 1;
    }
    printf("allocations: %ld\n", count);
    return 0;
}
