/* Robustness: fork while other threads are inside malloc/free.
 *
 * Four threads churn malloc/free of pseudo-random sizes while the main thread forks 200
 * times; each child does a few mallocs, prints nothing and leaves with _exit(0); the parent
 * waits for each. Prints a fixed summary. A deadlock in a child (a lock copied while held)
 * shows as a hang.
 * Usage: robust_fork_churn [FORKS, default 200].
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static atomic_int stop;

static void *churn(void *arg) {
  unsigned seed = (unsigned)(unsigned long)arg;
  void *slots[32] = {0};
  while (!atomic_load(&stop)) {
    unsigned r = rand_r(&seed);
    unsigned i = r % 32;
    free(slots[i]);
    size_t size = 1 + (rand_r(&seed) % 5000);
    if (r % 17 == 0) size = 100000 + rand_r(&seed) % 200000;
    slots[i] = malloc(size);
    if (slots[i]) memset(slots[i], 1, size < 64 ? size : 64);
  }
  for (int i = 0; i < 32; i++) free(slots[i]);
  return NULL;
}

int main(int argc, char **argv) {
  int forks = argc > 1 ? atoi(argv[1]) : 200;
  pthread_t t[4];
  for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, churn, (void *)(unsigned long)(i + 1));
  int ok = 0;
  for (int n = 0; n < forks; n++) {
    pid_t pid = fork();
    if (pid < 0) {
      perror("fork");
      return 2;
    }
    if (pid == 0) {
      void *p[8];
      for (int i = 0; i < 8; i++) p[i] = malloc(16 << i);
      for (int i = 0; i < 8; i++) free(p[i]);
      char *s = strdup("child");
      free(s);
      _exit(0);
    }
    int status;
    if (waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0) ok++;
  }
  atomic_store(&stop, 1);
  for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
  printf("%d of %d children exited 0\n", ok, forks);
  return ok == forks ? 0 : 1;
}
