/* Burns CPU in `work`, prints, then execs a shell that loops and prints: the exec'd image
 * is profiled as its own process unless ANYPROF_EXEC=off takes the library out of LD_PRELOAD. */
#include <unistd.h>
#include <stdio.h>
#include <stdint.h>
__attribute__((noinline)) uint64_t work(uint64_t n){ volatile uint64_t x=0; for(uint64_t i=0;i<n;i++) x+=i*i; return x; }
int main(){ work(100000000); printf("before exec\n"); fflush(stdout); execl("/bin/sh","sh","-c","i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; echo after exec",(char*)0); return 1; }
