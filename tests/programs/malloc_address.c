/* A program that imports malloc and takes its address, like CPython's allocator table
 * (PyMem_RawMalloc's default is &malloc). Built -no-pie, the executable then owns a
 * canonical PLT entry for malloc that dlsym returns, although its calls reach the
 * interposer as always. Prints a checksum of what it allocated through the pointer. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *(*volatile alloc_fn)(size_t);
void (*volatile free_fn)(void *);

int main(void) {
    /* Taken in code (not a data initializer): non-PIC code loads the address as an
     * immediate, which the linker points at a canonical PLT entry. */
    alloc_fn = malloc;
    free_fn = free;
    unsigned long sum = 0;
    for (int i = 0; i < 1000; i++) {
        char *p = alloc_fn(64 + i);
        memset(p, i & 0xff, 64 + i);
        sum += (unsigned char)p[i];
        free_fn(p);
    }
    printf("sum %lu\n", sum);
    return 0;
}
