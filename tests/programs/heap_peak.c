/*
 * A program whose heap peak is known and far above what it keeps live at exit: the ground
 * truth of `PeakHeapAlloc` (tests/tests/heap.rs).
 *
 * It allocates 64 blocks of 1 MiB, holds them all for 300 ms (the preload checks the peak
 * every 20 ms), frees 60 of them, holds the other 4 for 100 ms and exits. It prints, in
 * usable bytes (malloc_usable_size, as the exact counters count):
 *   peak_bytes=P final_bytes=F
 * where P is what the 64 blocks take together and F what the 4 kept ones take.
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BLOCKS 64
#define KEPT 4
#define BLOCK (1 << 20)

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

int main(void) {
    static char *blocks[BLOCKS];
    size_t peak = 0, final = 0;
    for (int i = 0; i < BLOCKS; i++) {
        blocks[i] = malloc(BLOCK);
        if (blocks[i] == NULL) return 1;
        memset(blocks[i], i, 4096); /* touch a page, not all of it */
        peak += malloc_usable_size(blocks[i]);
    }
    sleep_ms(300);
    for (int i = KEPT; i < BLOCKS; i++) free(blocks[i]);
    for (int i = 0; i < KEPT; i++) final += malloc_usable_size(blocks[i]);
    sleep_ms(100);
    printf("peak_bytes=%zu final_bytes=%zu\n", peak, final);
    return 0;
}
