/* The library hook_reach dlopens: its constructor allocates (through the program's marked
 * allocation function) before any profiler's background thread can have seen it loaded. */
#include <stddef.h>

void hook_reach_marked_alloc(size_t size);

__attribute__((noinline)) static void plugin_allocates(void) {
    for (int i = 0; i < 200; i++) hook_reach_marked_alloc(64 + (size_t)i);
}

__attribute__((constructor)) static void plugin_start(void) { plugin_allocates(); }
