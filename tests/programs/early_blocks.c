/* Frees the 1000 blocks of 1000 bytes that early_blocks_lib's constructor allocated before
 * the profiler's constructor ran, then keeps 1 MiB live until it exits. A profiler that
 * counts the frees but not the allocations reports more frees than allocations and a live
 * heap short by a megabyte.
 * Link with the library: cc early_blocks.c PATH/early_blocks_lib -Wl,-rpath,DIR.
 * Prints "kept 1048576". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern void *early_blocks[1000];

int main(void) {
    for (int i = 0; i < 1000; i++) free(early_blocks[i]);
    char *kept = malloc(1 << 20);
    if (!kept) return 1;
    memset(kept, 1, 1 << 20);
    printf("kept %d\n", 1 << 20);
    fflush(stdout);
    return kept[4096] == 1 ? 0 : 1;
}
