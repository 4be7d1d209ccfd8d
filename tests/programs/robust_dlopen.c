/* Robustness: dlopen / call / dlclose in a loop.
 * Usage: robust_dlopen PATH_TO_PLUGIN [CYCLES, default 2000] [ITERATIONS per call, default 200000]
 * Each cycle opens the plugin, calls plugin_hot, allocates, and closes it. Prints a checksum.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  int cycles = argc > 2 ? atoi(argv[2]) : 2000;
  unsigned long iters = argc > 3 ? strtoul(argv[3], NULL, 10) : 200000;
  unsigned long sum = 0;
  for (int i = 0; i < cycles; i++) {
    void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      fprintf(stderr, "dlopen: %s\n", dlerror());
      return 3;
    }
    unsigned long (*hot)(unsigned long) = (unsigned long (*)(unsigned long))dlsym(h, "plugin_hot");
    if (!hot) {
      fprintf(stderr, "dlsym: %s\n", dlerror());
      return 3;
    }
    sum ^= hot(iters + (unsigned long)(i % 7));
    char *p = malloc(100 + i % 50);
    p[0] = 1;
    free(p);
    if (dlclose(h) != 0) {
      fprintf(stderr, "dlclose: %s\n", dlerror());
      return 3;
    }
  }
  printf("%d cycles, checksum %lx\n", cycles, sum);
  return 0;
}
