/* A library whose constructor allocates (it runs before a preloaded profiler's own
 * constructor: a program's libraries are initialised before the preloaded ones); the
 * program frees the blocks later. Built with -shared -fPIC; see early_blocks.c. */
#include <stdlib.h>

void *early_blocks[1000];

__attribute__((constructor)) static void allocate_early(void) {
    for (int i = 0; i < 1000; i++) early_blocks[i] = malloc(1000);
}
