/* A parent that keeps many small blocks (some of which a heap profiler samples) and forks; the
 * child frees every one of them, keeps one block of 1 MiB and exits. The child's exact
 * counters must come out right: its HeapAlloc at exit is the 1 MiB it keeps plus the little
 * its parent had live besides (stdio), whatever sampled blocks a profiler moved in the parent.
 * tests/tests/heap.rs. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define BLOCKS 400000

static void *blocks[BLOCKS];

int main(void) {
    uint64_t x = 88172645463325252ull;
    for (int i = 0; i < BLOCKS; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        blocks[i] = malloc(16 + x % 240);
        if (!blocks[i]) return 2;
    }
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) return 2;
    if (pid == 0) {
        for (int i = 0; i < BLOCKS; i++) free(blocks[i]);
        volatile char *keep = malloc(1 << 20);
        if (!keep) _exit(2);
        keep[0] = 1;
        exit(0);
    }
    int status = 0;
    if (waitpid(pid, &status, 0) != pid) return 2;
    for (int i = 0; i < BLOCKS; i++) free(blocks[i]);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 3;
}
