/* Robustness: a program with its own SIGPROF handler and its own ITIMER_PROF.
 *
 * Usage: robust_sigprof signal|sigaction|query
 *   signal:    installs its handler with signal() (after start-up), re-arming it from inside
 *              the handler the SysV way, runs ITIMER_PROF at 100 Hz over about 1 s of CPU and
 *              checks that the number of ticks its handler saw fits its own CPU time.
 *   sigaction: the same with sigaction(SA_SIGINFO); also counts ticks whose si_code says they
 *              came from a POSIX timer (SI_TIMER), which its own itimer never sends.
 *   query:     checks that sigaction(SIGPROF, NULL, &old) reports SIG_DFL before it installs
 *              anything, then exactly its own handler, flags and mask; that signal() returns
 *              its handler; and that SIG_IGN really ignores its own ITIMER_PROF.
 * Output is deterministic ("plausible" / "ok" lines) unless something is wrong ("WRONG ...").
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static volatile sig_atomic_t ticks;
static volatile sig_atomic_t foreign;
static volatile unsigned long sink;

static void on_prof(int sig) {
  (void)sig;
  ticks++;
  signal(SIGPROF, on_prof); /* SysV-style re-arm from inside the handler */
}

static void on_prof_info(int sig, siginfo_t *info, void *uc) {
  (void)sig;
  (void)uc;
  ticks++;
  if (info->si_code == SI_TIMER) foreign++;
}

static double process_cpu(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) static void burn(double secs) {
  double end = process_cpu() + secs;
  unsigned long x = 7;
  while (process_cpu() < end) {
    for (int i = 0; i < 20000; i++) x = x * 6364136223846793005UL + 1;
    sink = x;
  }
}

static void set_timer(long usec) {
  struct itimerval it = {{0, usec}, {0, usec}};
  setitimer(ITIMER_PROF, &it, NULL);
}

static int run_timer(const char *mode) {
  double before = process_cpu();
  set_timer(10000);
  burn(1.0);
  set_timer(0);
  double cpu = process_cpu() - before;
  double expected = cpu / 0.010;
  int got = ticks;
  /* Wide on purpose (kernel tick rounding, load): our own timers leaking in at 250+ per CPU
   * second would more than double the count, and swallowed ticks would leave next to none. */
  if (got >= 0.5 * expected && got <= 2.0 * expected + 5)
    printf("%s: tick count plausible\n", mode);
  else
    printf("%s: WRONG tick count %d for %.3f s of CPU (expected about %.0f)\n", mode, got, cpu,
           expected);
  if (foreign) printf("%s: WRONG %d ticks came from a POSIX timer\n", mode, (int)foreign);
  return 0;
}

static int query(void) {
  struct sigaction old;
  memset(&old, 0, sizeof old);
  if (sigaction(SIGPROF, NULL, &old) != 0) printf("WRONG initial query failed\n");
  else if (old.sa_handler != SIG_DFL) printf("WRONG initial SIGPROF action is not SIG_DFL\n");
  else printf("initial action is SIG_DFL: ok\n");

  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_prof_info;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaddset(&sa.sa_mask, SIGUSR1);
  struct sigaction prev;
  memset(&prev, 0, sizeof prev);
  if (sigaction(SIGPROF, &sa, &prev) != 0) printf("WRONG install failed\n");
  else if (prev.sa_handler != SIG_DFL) printf("WRONG install returned an old action that is not SIG_DFL\n");
  else printf("install returned SIG_DFL: ok\n");

  memset(&old, 0, sizeof old);
  sigaction(SIGPROF, NULL, &old);
  printf("handler back: %s\n", old.sa_sigaction == on_prof_info ? "ok" : "WRONG");
  printf("SA_SIGINFO back: %s\n", (old.sa_flags & SA_SIGINFO) ? "ok" : "WRONG");
  printf("SA_RESTART back: %s\n", (old.sa_flags & SA_RESTART) ? "ok" : "WRONG");
  printf("mask back: %s\n", sigismember(&old.sa_mask, SIGUSR1) == 1 ? "ok" : "WRONG");

  /* The handler really runs for the program's own itimer. */
  set_timer(10000);
  burn(0.2);
  set_timer(0);
  printf("own handler ran: %s\n", ticks > 0 ? "ok" : "WRONG");
  if (foreign) printf("WRONG %d ticks came from a POSIX timer\n", (int)foreign);

  void (*was)(int) = signal(SIGPROF, SIG_IGN);
  printf("signal() returned the handler: %s\n", (void *)was == (void *)on_prof_info ? "ok" : "WRONG");
  memset(&old, 0, sizeof old);
  sigaction(SIGPROF, NULL, &old);
  printf("SIG_IGN back: %s\n", old.sa_handler == SIG_IGN ? "ok" : "WRONG");
  /* Ignored: the program's own ITIMER_PROF must not kill it. */
  set_timer(5000);
  burn(0.2);
  set_timer(0);
  printf("survived its ignored itimer: ok\n");
  return 0;
}

int main(int argc, char **argv) {
  const char *mode = argc > 1 ? argv[1] : "signal";
  if (strcmp(mode, "signal") == 0) {
    signal(SIGPROF, on_prof);
    return run_timer(mode);
  }
  if (strcmp(mode, "sigaction") == 0) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_prof_info;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGPROF, &sa, NULL);
    return run_timer(mode);
  }
  if (strcmp(mode, "query") == 0) return query();
  fprintf(stderr, "unknown mode %s\n", mode);
  return 2;
}
