#include <stddef.h>
struct s { int a; long b; };
__attribute__((noinline)) static long f(struct s *p, size_t n) { long t = 0; for (size_t i = 0; i < n; i++) t += p[i].a * p[i].b; return t; }
static inline long g(long x) { return x * 3 + 1; }
int main(int argc, char **argv) { struct s v[2] = {{argc, 2}, {3, (long)argv}}; return (int)g(f(v, 2)); }
