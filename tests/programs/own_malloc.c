/*
 * own_malloc.c: a program that brings its own malloc, linked into the executable (as a
 * statically linked allocator would be), for the heap-transparency tests.
 *
 * The executable defines malloc, free, calloc and realloc (forwarding to glibc's
 * __libc_* functions, so the program behaves like any other). Because the executable comes
 * first in the global lookup scope, every call in the process reaches these definitions and
 * never the preload's: a heap profiler cannot see them, and must say so rather than write an
 * empty heap profile without a word.
 *
 * Ground truth: 100 000 malloc/free pairs of 1000..1099 bytes; prints
 * "allocated N" with N their total size, and exits 0.
 */
#include <stddef.h>
#include <stdio.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);

void *malloc(size_t n) { return __libc_malloc(n); }
void free(void *p) { __libc_free(p); }
void *calloc(size_t n, size_t size) { return __libc_calloc(n, size); }
void *realloc(void *p, size_t n) { return __libc_realloc(p, n); }

int main(void) {
    size_t total = 0;
    for (int i = 0; i < 100000; i++) {
        size_t n = 1000 + i % 100;
        char *volatile p = malloc(n);
        p[0] = 1;
        total += n;
        free(p);
    }
    printf("allocated %zu\n", total);
    return 0;
}
