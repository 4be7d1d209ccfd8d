/* Sudden death, heap: builds a known live set from one allocation site, says so, and waits
 * to be killed (SIGKILL: no exit handler, no destructor, no last flush of any kind).
 *
 * Usage: death_heap SMALL_BYTES BIG_BLOCKS
 * build_live_set allocates, touching every byte, small blocks whose sizes cycle through
 * 16, 32, 64, ..., 4096 bytes (16 << (i % 9)) until they add up to at least SMALL_BYTES, and
 * BIG_BLOCKS blocks of 1 MiB spread evenly among them. Everything stays live. It then prints
 * "ready pid=PID small_bytes=N small_objects=N big_bytes=N" (exact figures) and sleeps until
 * killed. Ground truth: inuse_space at build_live_set = small_bytes + big_bytes.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BIG (1 << 20)

static void **live;
static size_t nlive;
static size_t small_bytes, small_objects, big_bytes;

__attribute__((noinline)) static void build_live_set(size_t want_small, size_t big_blocks) {
  size_t big_every = big_blocks ? want_small / big_blocks + 1 : (size_t)-1;
  size_t next_big = big_every / 2;
  size_t bigs = 0;
  for (size_t i = 0; small_bytes < want_small; i++) {
    size_t size = (size_t)16 << (i % 9);
    char *p = malloc(size);
    memset(p, (int)i, size);
    live[nlive++] = p;
    small_bytes += size;
    small_objects++;
    if (bigs < big_blocks && small_bytes >= next_big) {
      char *b = malloc(BIG);
      memset(b, 1, BIG);
      live[nlive++] = b;
      big_bytes += BIG;
      bigs++;
      next_big += big_every;
    }
  }
  for (; bigs < big_blocks; bigs++) {
    char *b = malloc(BIG);
    memset(b, 1, BIG);
    live[nlive++] = b;
    big_bytes += BIG;
  }
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: death_heap SMALL_BYTES BIG_BLOCKS\n");
    return 2;
  }
  size_t want_small = strtoull(argv[1], NULL, 0), big_blocks = strtoull(argv[2], NULL, 0);
  /* Room for every pointer (the smallest block is 16 bytes), allocated here, not at the site. */
  live = calloc(want_small / 16 + 16 + big_blocks, sizeof *live);
  if (!live) return 2;
  build_live_set(want_small, big_blocks);
  printf("ready pid=%d small_bytes=%zu small_objects=%zu big_bytes=%zu\n", (int)getpid(),
         small_bytes, small_objects, big_bytes);
  fflush(stdout);
  for (;;) pause();
}
