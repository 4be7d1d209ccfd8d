/* A program that does little but malloc and free, from one function, `churn`: CPU samples
 * that interrupt anyprof's malloc hooks land in libanyprof.so, and tests/tests/naming.rs
 * checks that they show as one `[anyprof]` frame right under `churn`. */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) static unsigned long churn(long rounds) {
    unsigned long sum = 0;
    void *keep[64] = {0};
    for (long i = 0; i < rounds; i++) {
        int slot = i & 63;
        free(keep[slot]);
        keep[slot] = malloc(16 + (i % 200));
        sum += (unsigned long)keep[slot] & 0xff;
    }
    for (int i = 0; i < 64; i++)
        free(keep[i]);
    return sum;
}

int main(int argc, char **argv) {
    long rounds = argc > 1 ? atol(argv[1]) : 20000000L;
    printf("%lu\n", churn(rounds));
    return 0;
}
