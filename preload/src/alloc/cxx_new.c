/*
 * Slow paths of the interposed C++ operator new/delete (the exported symbols are trampolines
 * in cxx.rs, which also explains the modes). They are C, not Rust, because a C++ exception
 * thrown by the next operator new must unwind through this frame to the program's handler:
 * the preload is built with panic=abort, and a Rust frame on that path would abort instead.
 * Compiled with -fexceptions so that the cleanup of the re-entrancy flag runs during such an
 * unwind.
 *
 * Contract (as for all of alloc/): no locks, no allocation of our own, nothing that can
 * throw except the next operator new itself.
 */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define HIDDEN __attribute__((visibility("hidden")))

/* Operator numbers, as in cxx.rs's NAMES. */
enum {
    NEW, NEW_ARRAY, NEW_NOTHROW, NEW_ARRAY_NOTHROW,
    NEW_ALIGNED, NEW_ARRAY_ALIGNED, NEW_ALIGNED_NOTHROW, NEW_ARRAY_ALIGNED_NOTHROW,
    DELETE, DELETE_ARRAY, DELETE_SIZED, DELETE_ARRAY_SIZED,
    DELETE_NOTHROW, DELETE_ARRAY_NOTHROW, DELETE_ALIGNED, DELETE_ARRAY_ALIGNED,
    DELETE_SIZED_ALIGNED, DELETE_ARRAY_SIZED_ALIGNED,
    DELETE_ALIGNED_NOTHROW, DELETE_ARRAY_ALIGNED_NOTHROW,
};

/* From cxx.rs. */
void anyprof_cxx_decide(void);
bool anyprof_cxx_is_decided(void);
uintptr_t anyprof_cxx_lookup(uint32_t form);
uintptr_t anyprof_cxx_next(uint32_t form);
uint8_t anyprof_cxx_enter(void);
void anyprof_cxx_leave(uint8_t was);
void anyprof_cxx_allocated(void *p);
bool anyprof_cxx_freeing(void *p);
void *anyprof_cxx_malloc(size_t size, size_t align);
void anyprof_cxx_free(void *p);
uintptr_t anyprof_cxx_thrower(uint32_t form);

typedef void *(*new_fn)(size_t);
typedef void *(*new_nothrow_fn)(size_t, const void *);
typedef void *(*new_aligned_fn)(size_t, size_t);
typedef void *(*new_aligned_nothrow_fn)(size_t, size_t, const void *);
typedef void (*delete_fn)(void *);
typedef void (*delete_sized_fn)(void *, size_t);
typedef void (*delete_nothrow_fn)(void *, const void *);
typedef void (*delete_sized_aligned_fn)(void *, size_t, size_t);
typedef void (*delete_aligned_nothrow_fn)(void *, size_t, const void *);

/* The next operator's route: decided, or (on a thread that finds another deciding) 0, the
 * malloc route. */
static uintptr_t route(uint32_t form) {
    if (!anyprof_cxx_is_decided())
        anyprof_cxx_decide();
    return anyprof_cxx_next(form);
}

/* Calls of the next operator in accounting mode, with the re-entrancy flag set for their
 * duration: the cleanup clears it again when the call returns and when it throws. */
static void leave(uint8_t *was) { anyprof_cxx_leave(*was); }
#define IN_SCOPE(expr)                                                                        \
    ({                                                                                        \
        __attribute__((cleanup(leave))) uint8_t was_ = anyprof_cxx_enter();                  \
        expr;                                                                                 \
    })

/* The malloc route of a throwing new: out of memory, let the next operator new (which runs
 * the new-handler and throws std::bad_alloc) have its turn; without one, there is no way
 * to throw from here. */
static void *out_of_memory(uint32_t form, size_t size, size_t align) {
    uintptr_t f = anyprof_cxx_thrower(form);
    if (!f)
        abort();
    if (form == NEW_ALIGNED || form == NEW_ARRAY_ALIGNED)
        return ((new_aligned_fn)f)(size, align);
    return ((new_fn)f)(size);
}

static void *new_throwing(uint32_t form, size_t size) {
    uintptr_t f = route(form);
    if (!f) {
        void *p = anyprof_cxx_malloc(size, 0);
        return p ? p : out_of_memory(form, size, 0);
    }
    void *p = IN_SCOPE(((new_fn)f)(size)); /* may throw */
    anyprof_cxx_allocated(p);
    return p;
}

static void *new_aligned(uint32_t form, size_t size, size_t align) {
    uintptr_t f = route(form);
    if (!f) {
        void *p = anyprof_cxx_malloc(size, align);
        return p ? p : out_of_memory(form, size, align);
    }
    void *p = IN_SCOPE(((new_aligned_fn)f)(size, align));
    anyprof_cxx_allocated(p);
    return p;
}

/* The malloc route of a nothrow new, out of memory: the next nothrow new runs the
 * new-handler as the program expects, and returns null if that does not help. */
static void *nothrow_out_of_memory(uint32_t form, size_t size, size_t align, const void *tag) {
    uintptr_t f = anyprof_cxx_thrower(form);
    if (!f)
        return NULL;
    if (form == NEW_ALIGNED_NOTHROW || form == NEW_ARRAY_ALIGNED_NOTHROW)
        return ((new_aligned_nothrow_fn)f)(size, align, tag);
    return ((new_nothrow_fn)f)(size, tag);
}

static void *new_nothrow(uint32_t form, size_t size, const void *tag) {
    uintptr_t f = route(form);
    if (!f) {
        void *p = anyprof_cxx_malloc(size, 0);
        return p ? p : nothrow_out_of_memory(form, size, 0, tag);
    }
    void *p = IN_SCOPE(((new_nothrow_fn)f)(size, tag));
    anyprof_cxx_allocated(p);
    return p;
}

static void *new_aligned_nothrow(uint32_t form, size_t size, size_t align, const void *tag) {
    uintptr_t f = route(form);
    if (!f) {
        void *p = anyprof_cxx_malloc(size, align);
        return p ? p : nothrow_out_of_memory(form, size, align, tag);
    }
    void *p = IN_SCOPE(((new_aligned_nothrow_fn)f)(size, align, tag));
    anyprof_cxx_allocated(p);
    return p;
}

HIDDEN void *anyprof_slow_new(size_t size) { return new_throwing(NEW, size); }
HIDDEN void *anyprof_slow_new_array(size_t size) { return new_throwing(NEW_ARRAY, size); }
HIDDEN void *anyprof_slow_new_nothrow(size_t size, const void *tag) {
    return new_nothrow(NEW_NOTHROW, size, tag);
}
HIDDEN void *anyprof_slow_new_array_nothrow(size_t size, const void *tag) {
    return new_nothrow(NEW_ARRAY_NOTHROW, size, tag);
}
HIDDEN void *anyprof_slow_new_aligned(size_t size, size_t align) {
    return new_aligned(NEW_ALIGNED, size, align);
}
HIDDEN void *anyprof_slow_new_array_aligned(size_t size, size_t align) {
    return new_aligned(NEW_ARRAY_ALIGNED, size, align);
}
HIDDEN void *anyprof_slow_new_aligned_nothrow(size_t size, size_t align, const void *tag) {
    return new_aligned_nothrow(NEW_ALIGNED_NOTHROW, size, align, tag);
}
HIDDEN void *anyprof_slow_new_array_aligned_nothrow(size_t size, size_t align,
                                                    const void *tag) {
    return new_aligned_nothrow(NEW_ARRAY_ALIGNED_NOTHROW, size, align, tag);
}

/* Every delete: null is a no-op; the malloc route frees through the hooks; accounting mode
 * accounts, then calls the next definition with the caller's own arguments. */
#define DELETE_BODY(form, call)                                                               \
    if (!p)                                                                                   \
        return;                                                                               \
    uintptr_t f = route(form);                                                                \
    if (!f) {                                                                                 \
        anyprof_cxx_free(p);                                                                  \
        return;                                                                               \
    }                                                                                         \
    if (anyprof_cxx_freeing(p))                                                               \
        IN_SCOPE(call);

HIDDEN void anyprof_slow_delete(void *p) { DELETE_BODY(DELETE, ((delete_fn)f)(p)) }
HIDDEN void anyprof_slow_delete_array(void *p) { DELETE_BODY(DELETE_ARRAY, ((delete_fn)f)(p)) }
HIDDEN void anyprof_slow_delete_sized(void *p, size_t size) {
    DELETE_BODY(DELETE_SIZED, ((delete_sized_fn)f)(p, size))
}
HIDDEN void anyprof_slow_delete_array_sized(void *p, size_t size) {
    DELETE_BODY(DELETE_ARRAY_SIZED, ((delete_sized_fn)f)(p, size))
}
HIDDEN void anyprof_slow_delete_nothrow(void *p, const void *tag) {
    DELETE_BODY(DELETE_NOTHROW, ((delete_nothrow_fn)f)(p, tag))
}
HIDDEN void anyprof_slow_delete_array_nothrow(void *p, const void *tag) {
    DELETE_BODY(DELETE_ARRAY_NOTHROW, ((delete_nothrow_fn)f)(p, tag))
}
HIDDEN void anyprof_slow_delete_aligned(void *p, size_t align) {
    DELETE_BODY(DELETE_ALIGNED, ((delete_sized_fn)f)(p, align))
}
HIDDEN void anyprof_slow_delete_array_aligned(void *p, size_t align) {
    DELETE_BODY(DELETE_ARRAY_ALIGNED, ((delete_sized_fn)f)(p, align))
}
HIDDEN void anyprof_slow_delete_sized_aligned(void *p, size_t size, size_t align) {
    DELETE_BODY(DELETE_SIZED_ALIGNED, ((delete_sized_aligned_fn)f)(p, size, align))
}
HIDDEN void anyprof_slow_delete_array_sized_aligned(void *p, size_t size, size_t align) {
    DELETE_BODY(DELETE_ARRAY_SIZED_ALIGNED, ((delete_sized_aligned_fn)f)(p, size, align))
}
HIDDEN void anyprof_slow_delete_aligned_nothrow(void *p, size_t align, const void *tag) {
    DELETE_BODY(DELETE_ALIGNED_NOTHROW, ((delete_aligned_nothrow_fn)f)(p, align, tag))
}
HIDDEN void anyprof_slow_delete_array_aligned_nothrow(void *p, size_t align, const void *tag) {
    DELETE_BODY(DELETE_ARRAY_ALIGNED_NOTHROW, ((delete_aligned_nothrow_fn)f)(p, align, tag))
}
