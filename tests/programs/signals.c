/* Signals: what a program can observe of signals sent to it, and of its own timers.
 *
 * Usage: signals MODE [ARGS]
 *   selfkill THREADS   blocks SIGUSR1 (in every thread: THREADS more are created after the
 *                      block and inherit it), sends it to its own process with kill(getpid()),
 *                      waits, then unblocks it; 200 rounds. The handler must not run while
 *                      the signal is blocked, must run exactly once per round as soon as it is
 *                      unblocked, and on the main thread (the only one that unblocks it).
 *   selfkill THREADS fork   the same in a child forked by a multithreaded parent.
 *   signalfd N         a daemon: SIGTERM, SIGHUP and SIGCHLD blocked in every thread (two
 *                      workers, one of them busy) and left at their default actions; a signalfd
 *                      reads N SIGTERM and N SIGHUP sent in pairs by a child process, and N
 *                      SIGCHLD from N children that exit at once; the daemon is busy for a
 *                      moment after each signal, so most arrive while it is not waiting.
 *   sigwait N          the same, read with sigtimedwait, with handlers installed that count
 *                      any of these signals handled instead of waited for (there must be none).
 *   itimer HZ          its own SIGPROF handler and setitimer(ITIMER_PROF) at HZ over 1 s of
 *                      its CPU time: the count of SIGPROFs must fit that CPU time, and each
 *                      must run on the main thread, on the alternate signal stack the handler
 *                      asked for (SA_ONSTACK, as CPython's).
 *   posixtimer CLOCK SIG HZ
 *                      timer_create on CLOCK (process: CLOCK_PROCESS_CPUTIME_ID, thread: the
 *                      main thread's CPU clock) sending SIG (PROF, ALRM or RT = SIGRTMIN+2) at
 *                      HZ over 1 s of CPU time: the count of expirations (signals plus the
 *                      overruns they report) must fit, and every si_value must be the one the
 *                      program set.
 *   rtsignal           takes SIGRTMAX-2 (the signal anyprof's own timers send) for itself: its
 *                      handler reads back as installed, gets exactly the 200 values it sends
 *                      itself with sigqueue over 1 s of CPU and nothing else; then it ignores
 *                      the signal and survives more of it.
 * Output is deterministic ("ok" lines) unless something is wrong ("WRONG ..."); the timer
 * modes print their raw counts on stderr, for the test to measure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t handled;
static volatile sig_atomic_t handled_elsewhere;
static volatile sig_atomic_t bad_value;
static volatile sig_atomic_t expirations; /* timer_create: signals plus their overruns */
static volatile unsigned long sink;
static atomic_int stop_workers;
static pid_t main_tid;

static pid_t gettid_(void) { return (pid_t)syscall(SYS_gettid); }

static double process_cpu(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double thread_cpu(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) static void burn_until(double (*clock)(void), double secs) {
  double end = clock() + secs;
  unsigned long x = 7;
  while (clock() < end) {
    for (int i = 0; i < 20000; i++) x = x * 6364136223846793005UL + 1;
    sink = x;
  }
}

static void sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

static void *busy_worker(void *arg) {
  (void)arg;
  while (!atomic_load(&stop_workers)) burn_until(thread_cpu, 0.005);
  return NULL;
}

static void *sleepy_worker(void *arg) {
  (void)arg;
  while (!atomic_load(&stop_workers)) sleep_ms(2);
  return NULL;
}

static pthread_t workers[16];
static int nworkers;

static void start_workers(int n) {
  for (int i = 0; i < n && i < 16; i++) {
    if (pthread_create(&workers[nworkers], NULL, i % 2 ? sleepy_worker : busy_worker, NULL) != 0) {
      printf("WRONG pthread_create failed\n");
      exit(1);
    }
    nworkers++;
  }
}

static void stop_all_workers(void) {
  atomic_store(&stop_workers, 1);
  for (int i = 0; i < nworkers; i++) pthread_join(workers[i], NULL);
  nworkers = 0;
}

/* ---- selfkill ---------------------------------------------------------------------------- */

static void on_usr1(int sig) {
  (void)sig;
  handled++;
  if (gettid_() != main_tid) handled_elsewhere++;
}

static int selfkill(int threads) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_usr1;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGUSR1, &sa, NULL);
  sigset_t usr1;
  sigemptyset(&usr1);
  sigaddset(&usr1, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &usr1, NULL);
  start_workers(threads); /* they inherit the block */
  int early = 0, wrong_count = 0;
  for (int round = 0; round < 200; round++) {
    handled = 0;
    pthread_sigmask(SIG_BLOCK, &usr1, NULL);
    kill(getpid(), SIGUSR1);
    sleep_ms(round % 10 == 0 ? 20 : 1);
    if (handled != 0) early++;
    pthread_sigmask(SIG_UNBLOCK, &usr1, NULL);
    /* A signal unblocked by sigprocmask is delivered before it returns. */
    if (handled != 1) wrong_count++;
  }
  stop_all_workers();
  if (early) printf("WRONG the handler ran while SIGUSR1 was blocked in %d of 200 rounds\n", early);
  else printf("handler never ran while blocked: ok\n");
  if (wrong_count) printf("WRONG the handler did not run exactly once on unblock in %d rounds\n", wrong_count);
  else printf("handler ran exactly once per unblock: ok\n");
  if (handled_elsewhere) printf("WRONG the handler ran %d times on another thread\n", (int)handled_elsewhere);
  else printf("handler ran on the main thread only: ok\n");
  return 0;
}

/* ---- signalfd / sigwait ------------------------------------------------------------------ */

static void on_daemon_signal(int sig) {
  (void)sig;
  handled_elsewhere++;
}

static int ack_pipe[2];

/* The sender: N rounds of SIGTERM and SIGHUP to its parent, back to back; each round after
 * the previous one was acknowledged (standard signals do not queue: two pending SIGTERMs
 * would be one). */
static int wait_ack(void) {
  struct pollfd p = {ack_pipe[0], POLLIN, 0};
  char c;
  return poll(&p, 1, 10000) == 1 && read(ack_pipe[0], &c, 1) == 1;
}

static void sender(pid_t parent, int n) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  for (int i = 0; i < n; i++) {
    kill(parent, SIGTERM);
    kill(parent, SIGHUP);
    if (!wait_ack()) _exit(3);
  }
  _exit(0);
}

/* Waits up to 2 s for one of the daemon signals; returns it, or 0 on timeout. */
static int wait_one(int use_sigwait, int fd, const sigset_t *set) {
  if (use_sigwait) {
    struct timespec timeout = {2, 0};
    siginfo_t info;
    for (;;) {
      int sig = sigtimedwait(set, &info, &timeout);
      if (sig > 0) return sig;
      if (errno != EINTR) return 0;
    }
  }
  struct pollfd p = {fd, POLLIN, 0};
  for (;;) {
    int rc = poll(&p, 1, 2000);
    if (rc < 0 && errno == EINTR) continue;
    if (rc <= 0) return 0;
    struct signalfd_siginfo si;
    if (read(fd, &si, sizeof si) != (ssize_t)sizeof si) return 0;
    return (int)si.ssi_signo;
  }
}

static int daemon_mode(int use_sigwait, int n) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  sigaddset(&set, SIGCHLD);
  if (use_sigwait) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_daemon_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    sigaction(SIGCHLD, &sa, NULL);
  }
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  start_workers(2);
  int fd = -1;
  if (!use_sigwait) {
    fd = signalfd(-1, &set, SFD_CLOEXEC);
    if (fd < 0) {
      printf("WRONG signalfd failed\n");
      return 1;
    }
  }
  if (pipe(ack_pipe) != 0) return 1;
  pid_t parent = getpid();
  pid_t child = fork();
  if (child == 0) sender(parent, n);
  int terms = 0, hups = 0, chlds = 0, other = 0, missing = 0;
  /* Between two waits the daemon is busy for a moment, as daemons are: a signal that arrives
   * then stays pending until the next wait (nothing else may take it). */
  for (int i = 0; i < n && !missing; i++) {
    for (int j = 0; j < 2; j++) {
      int sig = wait_one(use_sigwait, fd, &set);
      if (sig == SIGTERM) terms++;
      else if (sig == SIGHUP) hups++;
      else if (sig == 0) missing++;
      else other++;
      sleep_ms(1);
    }
    if (write(ack_pipe[1], "k", 1) != 1) break;
  }
  /* The sender's exit (or, if a signal went missing, its end now): one SIGCHLD, then reap it. */
  if (terms != n || hups != n) kill(child, SIGKILL);
  int sender_chld = wait_one(use_sigwait, fd, &set) == SIGCHLD;
  waitpid(child, NULL, 0);
  /* N children, one at a time: each exit is one SIGCHLD. */
  for (int i = 0; i < n; i++) {
    pid_t c = fork();
    if (c == 0) _exit(0);
    sleep_ms(1);
    int sig = wait_one(use_sigwait, fd, &set);
    if (sig == SIGCHLD) chlds++;
    else if (sig == 0) missing++;
    else other++;
    waitpid(c, NULL, 0);
    if (sig == 0) break; /* one lost is enough to know; do not wait out the others */
  }
  stop_all_workers();
  const char *how = use_sigwait ? "sigtimedwait" : "signalfd";
  printf("%s: SIGTERM %s\n", how, terms == n ? "all received: ok" : "WRONG some lost");
  printf("%s: SIGHUP %s\n", how, hups == n ? "all received: ok" : "WRONG some lost");
  printf("%s: SIGCHLD %s\n", how, chlds == n && sender_chld ? "all received: ok" : "WRONG some lost");
  if (missing || other) printf("WRONG %d waits timed out, %d unexpected signals\n", missing, other);
  if (handled_elsewhere) printf("WRONG %d signals were handled instead of waited for\n", (int)handled_elsewhere);
  else printf("no signal handled elsewhere: ok\n");
  if (terms != n || hups != n || chlds != n)
    fprintf(stderr, "counts: SIGTERM %d SIGHUP %d SIGCHLD %d of %d\n", terms, hups, chlds, n);
  return 0;
}

/* ---- itimer and timer_create ------------------------------------------------------------- */

#define PROGRAM_VALUE 0x5eed

/* The timer handlers ask for the alternate signal stack (SA_ONSTACK), as CPython does. */
static char alt_stack[64 * 1024];
static volatile sig_atomic_t off_alt_stack;

static void on_tick(int sig, siginfo_t *info, void *uc) {
  (void)sig;
  (void)uc;
  char here;
  if (&here < alt_stack || &here >= alt_stack + sizeof alt_stack) off_alt_stack++;
  handled++;
  if (gettid_() != main_tid) handled_elsewhere++;
  if (info->si_code == SI_TIMER) {
    expirations += 1 + info->si_overrun;
    if (info->si_value.sival_int != PROGRAM_VALUE) bad_value++;
  }
}

static int install_tick_handler(int sig) {
  stack_t ss = {.ss_sp = alt_stack, .ss_size = sizeof alt_stack, .ss_flags = 0};
  sigaltstack(&ss, NULL);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_tick;
  sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  return sigaction(sig, &sa, NULL);
}

/* The verdict: the count must be within 10 % of one signal per period of CPU time (the bare
 * run lands within a few signals of it: the kernel checks CPU timers at every tick and moves
 * an interval timer's expiry on by exactly one period per signal). */
static void verdict(const char *what, int got, double cpu, int hz) {
  double expected = cpu * hz;
  fprintf(stderr, "%s: %d signals for %.3f s of CPU at %d Hz (expected %.0f)\n", what, got, cpu,
          hz, expected);
  if (got >= 0.9 * expected - 2 && got <= 1.1 * expected + 2)
    printf("%s: count fits the CPU time: ok\n", what);
  else
    printf("%s: WRONG %d signals for %.3f s of CPU (expected about %.0f)\n", what, got, cpu,
           expected);
  /* The program has no other thread: a signal handled elsewhere was taken by someone else's.
   * (CPython, for one, loses it: its handler only wakes the interpreter from the main thread.) */
  if (handled_elsewhere)
    printf("%s: WRONG %d signals were handled on a thread that is not the program's\n", what,
           (int)handled_elsewhere);
  if (off_alt_stack)
    printf("%s: WRONG %d signals were handled off the alternate stack the handler asked for\n",
           what, (int)off_alt_stack);
  if (bad_value) printf("%s: WRONG %d signals carried a value the program did not set\n", what,
                        (int)bad_value);
}

static int itimer(int hz) {
  install_tick_handler(SIGPROF);
  long usec = 1000000 / hz;
  struct itimerval it = {{0, usec}, {0, usec}};
  double before = process_cpu();
  setitimer(ITIMER_PROF, &it, NULL);
  burn_until(process_cpu, 1.0);
  struct itimerval off = {{0, 0}, {0, 0}};
  setitimer(ITIMER_PROF, &off, NULL);
  verdict("itimer", handled, process_cpu() - before, hz);
  return 0;
}

static int posixtimer(const char *clock_name, const char *sig_name, int hz) {
  int sig = strcmp(sig_name, "PROF") == 0   ? SIGPROF
            : strcmp(sig_name, "ALRM") == 0 ? SIGALRM
                                            : SIGRTMIN + 2;
  install_tick_handler(sig);
  int thread_clock = strcmp(clock_name, "thread") == 0;
  clockid_t clock = CLOCK_PROCESS_CPUTIME_ID;
  if (thread_clock) pthread_getcpuclockid(pthread_self(), &clock);
  struct sigevent sev;
  memset(&sev, 0, sizeof sev);
  if (thread_clock) {
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev._sigev_un._tid = gettid_();
  } else {
    sev.sigev_notify = SIGEV_SIGNAL;
  }
  sev.sigev_signo = sig;
  sev.sigev_value.sival_int = PROGRAM_VALUE;
  timer_t timer;
  if (timer_create(clock, &sev, &timer) != 0) {
    printf("WRONG timer_create failed: %s\n", strerror(errno));
    return 1;
  }
  long ns = 1000000000L / hz;
  struct itimerspec spec = {{0, ns}, {0, ns}};
  double (*cpu_clock)(void) = thread_clock ? thread_cpu : process_cpu;
  double before = cpu_clock();
  timer_settime(timer, 0, &spec, NULL);
  burn_until(cpu_clock, 1.0);
  timer_delete(timer);
  char what[64];
  snprintf(what, sizeof what, "timer_create %s %s", clock_name, sig_name);
  /* A POSIX timer that expires again while its signal is still pending counts an overrun
   * instead of sending a second signal: expirations, not signals, are its rate. */
  verdict(what, expirations, cpu_clock() - before, hz);
  return 0;
}

/* ---- the real-time signal anyprof's timers use --------------------------------------------- */

static volatile sig_atomic_t queued_ok;

static void on_rt(int sig, siginfo_t *info, void *uc) {
  (void)sig;
  (void)uc;
  handled++;
  if (gettid_() != main_tid) handled_elsewhere++;
  if (info->si_code == SI_QUEUE && info->si_value.sival_int == PROGRAM_VALUE) queued_ok++;
  else bad_value++;
}

/* The program takes SIGRTMAX-2 for itself: it installs a handler, reads it back, sends itself
 * 200 values with sigqueue while burning 1 s of CPU, then ignores the signal and sends more. */
static int rt_signal(void) {
  int sig = SIGRTMAX - 2;
  struct sigaction old;
  memset(&old, 0, sizeof old);
  sigaction(sig, NULL, &old);
  printf("initial action is SIG_DFL: %s\n", old.sa_handler == SIG_DFL ? "ok" : "WRONG");
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_rt;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaddset(&sa.sa_mask, SIGUSR2);
  sigaction(sig, &sa, NULL);
  memset(&old, 0, sizeof old);
  sigaction(sig, NULL, &old);
  printf("handler back: %s\n",
         old.sa_sigaction == on_rt && (old.sa_flags & SA_SIGINFO) && sigismember(&old.sa_mask, SIGUSR2) == 1
             ? "ok"
             : "WRONG");
  int rounds = 200;
  for (int i = 0; i < rounds; i++) {
    union sigval v = {.sival_int = PROGRAM_VALUE};
    sigqueue(getpid(), sig, v);
    burn_until(thread_cpu, 0.005);
  }
  printf("every value queued arrived once: %s\n", queued_ok == rounds ? "ok" : "WRONG");
  if (bad_value) printf("WRONG %d signals the program did not send reached its handler\n", (int)bad_value);
  if (handled_elsewhere) printf("WRONG %d handled on a thread that is not the program's\n", (int)handled_elsewhere);
  signal(sig, SIG_IGN);
  for (int i = 0; i < 20; i++) {
    union sigval v = {.sival_int = PROGRAM_VALUE};
    sigqueue(getpid(), sig, v);
    burn_until(thread_cpu, 0.005);
  }
  printf("ignored and survived: ok\n");
  return 0;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  main_tid = gettid_();
  const char *mode = argc > 1 ? argv[1] : "";
  int n = argc > 2 ? atoi(argv[2]) : 0;
  if (strcmp(mode, "selfkill") == 0 && argc > 3 && strcmp(argv[3], "fork") == 0) {
    /* The same in a forked child (where a profiler starts its threads anew). */
    start_workers(1);
    pid_t child = fork();
    if (child == 0) {
      main_tid = gettid_();
      stop_workers = 0;
      nworkers = 0;
      exit(selfkill(n));
    }
    stop_all_workers();
    int status = 0;
    waitpid(child, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  if (strcmp(mode, "selfkill") == 0) return selfkill(n);
  if (strcmp(mode, "signalfd") == 0) return daemon_mode(0, n > 0 ? n : 50);
  if (strcmp(mode, "sigwait") == 0) return daemon_mode(1, n > 0 ? n : 50);
  if (strcmp(mode, "itimer") == 0) return itimer(n > 0 ? n : 100);
  if (strcmp(mode, "rtsignal") == 0) return rt_signal();
  if (strcmp(mode, "posixtimer") == 0 && argc > 4)
    return posixtimer(argv[2], argv[3], atoi(argv[4]));
  fprintf(stderr, "usage: signals selfkill|signalfd|sigwait|itimer|posixtimer|rtsignal ...\n");
  return 2;
}
