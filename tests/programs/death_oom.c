/* Sudden death by the OOM killer: grows from one known allocation site until the kernel
 * ends it (run it inside a memory cgroup with a limit).
 *
 * Usage: death_oom MAX_MIB
 * grow_until_killed allocates blocks of 1, 2, 3, 4, 1, 2, ... MiB, touching every page, and
 * never frees them. Prints "growing pid=PID" first. If it reaches MAX_MIB without being
 * killed (no limit applied) it says so on stderr and exits with 3.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void *blocks[100000];

__attribute__((noinline)) static size_t grow_until_killed(size_t max_bytes) {
  size_t total = 0;
  for (size_t i = 0; total < max_bytes && i < sizeof blocks / sizeof *blocks; i++) {
    size_t size = (i % 4 + 1) << 20;
    char *p = malloc(size);
    if (!p) break;
    memset(p, 1, size);
    blocks[i] = p;
    total += size;
  }
  return total;
}

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  printf("growing pid=%d\n", (int)getpid());
  fflush(stdout);
  size_t total = grow_until_killed(strtoull(argv[1], NULL, 0) << 20);
  fprintf(stderr, "death_oom: allocated %zu MiB and was not killed: no memory limit?\n",
          total >> 20);
  return 3;
}
