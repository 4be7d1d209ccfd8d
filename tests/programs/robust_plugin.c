/* The shared object robust_dlopen loads and unloads: one hot function. */
__attribute__((noinline)) unsigned long plugin_hot(unsigned long n) {
  volatile unsigned long x = 1;
  for (unsigned long i = 0; i < n; i++) x = x * 2862933555777941757UL + 3037000493UL;
  return x;
}
