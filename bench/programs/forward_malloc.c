/* The floor of any malloc interposer, for `make bench` (bench/heap_overhead.py).
 *
 * A preload that defines malloc, free, calloc and realloc and does nothing but call glibc's
 * own (`__libc_*`, exported for exactly this). What it costs a program is what interposition
 * itself costs: one more jump per call through the PLT and a body that cannot be inlined.
 * Everything anyprof adds beyond this row is its own work: exact counters, the sampling
 * countdown and the free filter. Build: cc -O2 -shared -fPIC forward_malloc.c
 */
#include <stddef.h>

extern void *__libc_malloc(size_t size);
extern void __libc_free(void *p);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t size);

void *malloc(size_t size) { return __libc_malloc(size); }
void free(void *p) { __libc_free(p); }
void *calloc(size_t n, size_t size) { return __libc_calloc(n, size); }
void *realloc(void *p, size_t size) { return __libc_realloc(p, size); }
