/*
 * prefixed_alloc.c: a program with an allocator of its own under prefixed names, as Redis
 * links jemalloc (je_malloc) and Rust programs link tikv-jemallocator (_rjem_malloc), for
 * the heap-transparency tests.
 *
 * je_malloc/je_free hand out blocks of a static arena and never call malloc, so a malloc
 * interposer sees none of them. anyprof record must say so before the summary instead of
 * writing a heap profile that silently lacks them.
 *
 * Ground truth: 10 000 je_malloc/je_free pairs of 64 bytes; prints "allocated N" with N
 * their total size, and exits 0.
 */
#include <stddef.h>
#include <stdio.h>

static unsigned char arena[1 << 20];
static size_t used;

__attribute__((noinline, used)) void *je_malloc(size_t n) {
    n = (n + 15) & ~(size_t)15;
    if (used + n > sizeof arena) used = 0; /* blocks are freed before reuse in this program */
    void *p = arena + used;
    used += n;
    return p;
}

__attribute__((noinline, used)) void je_free(void *p) { (void)p; }

int main(void) {
    size_t total = 0;
    for (int i = 0; i < 10000; i++) {
        char *volatile p = je_malloc(64);
        p[0] = 1;
        total += 64;
        je_free(p);
    }
    printf("allocated %zu\n", total);
    return 0;
}
