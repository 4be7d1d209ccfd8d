/* The parent allocates 160 blocks of 64 KiB at parent_site and keeps them; its forked child
 * frees half of them and allocates 80 blocks at child_site. Each heap profile must hold only
 * what its own process allocated. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>
void *blocks[160];
__attribute__((noinline)) void *parent_site(size_t n) { void *p = malloc(n); memset(p, 1, n); return p; }
__attribute__((noinline)) void *child_site(size_t n) { void *p = malloc(n); memset(p, 2, n); return p; }
int main(void) {
    for (int i = 0; i < 160; i++) blocks[i] = parent_site(64 * 1024);
    pid_t pid = fork();
    if (pid == 0) {
        for (int i = 0; i < 80; i++) free(blocks[i]);
        for (int i = 0; i < 80; i++) child_site(64 * 1024);
        exit(0);
    }
    waitpid(pid, 0, 0);
    return 0;
}
