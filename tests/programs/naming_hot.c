/* A program whose time goes to one static function, `spin`: stripped, nothing names it,
 * and tests/tests/naming.rs checks that its frames are `naming_hot+0xADDR` with ADDR inside
 * `spin` as the unstripped file's symbol table places it. */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) static unsigned long spin(unsigned long n) {
    unsigned long x = 1;
    for (unsigned long i = 0; i < n; i++)
        x = x * 6364136223846793005UL + (i ^ (x >> 29));
    return x;
}

int main(int argc, char **argv) {
    unsigned long n = argc > 1 ? strtoul(argv[1], NULL, 10) : 300000000UL;
    printf("%lu\n", spin(n));
    return 0;
}
