/* Descriptors: a program that looks for descriptors it did not open, in every way a test
 * suite or a daemon does, while its threads allocate and burn CPU.
 *
 * Usage: fd_observer          (the program)
 *        fd_observer child    (what it runs as its child)
 * Run it with only stdin, stdout and stderr open: those, and a /dev/null it opens and dup2s
 * to fd 7 (not close-on-exec, for its child), are its own. It lists /proc/self/fd at start
 * and prints the list ("start: 0 1 2"). Then, while three threads allocate (16 B..4 KiB) and burn
 * CPU for 2 s, the main thread lists /proc/self/fd and probes fcntl(F_GETFD) on 0..1023
 * over and over, noting any descriptor it did not open. Then it closes every descriptor
 * 3..1023 it did not open (a close-all loop) and notes which close() succeeded, works
 * 0.3 s more and looks again. Last it forks and execs "fd_observer child", which prints
 * the descriptors it inherited, by listing and by fcntl probes. Every line is deterministic;
 * a descriptor of someone else's is printed with its readlink target. Exits 1 if it saw
 * one, else 0.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXFD 1024
#define MAXFOREIGN 16

static int own[MAXFD];
static char foreign[MAXFOREIGN][160];
static int nforeign;
static volatile unsigned long sink;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Notes a descriptor the program did not open (once per fd and way it was seen). */
static void note_foreign(int fd, const char *how) {
  char link[64], target[96] = "?";
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, target, sizeof target - 1);
  target[n > 0 ? n : 1] = 0;
  char line[160];
  snprintf(line, sizeof line, "fd %d (%s) seen by %s", fd, target, how);
  for (int i = 0; i < nforeign; i++)
    if (strcmp(foreign[i], line) == 0) return;
  if (nforeign < MAXFOREIGN) strcpy(foreign[nforeign++], line);
}

/* The descriptors in /proc/self/fd other than the listing's own; returns how many. */
static int list_fds(int *out, int max) {
  DIR *d = opendir("/proc/self/fd");
  if (!d) {
    perror("opendir /proc/self/fd");
    exit(2);
  }
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    int fd = atoi(e->d_name);
    if (fd == dirfd(d)) continue;
    if (n < max) out[n++] = fd;
  }
  closedir(d);
  /* readdir order is the kernel's: sort. */
  for (int i = 1; i < n; i++)
    for (int j = i; j > 0 && out[j - 1] > out[j]; j--) {
      int t = out[j];
      out[j] = out[j - 1];
      out[j - 1] = t;
    }
  return n;
}

static void look(const char *when) {
  int fds[MAXFD];
  int n = list_fds(fds, MAXFD);
  char how[64];
  for (int i = 0; i < n; i++)
    if (fds[i] >= MAXFD || !own[fds[i]]) {
      snprintf(how, sizeof how, "listing %s", when);
      note_foreign(fds[i], how);
    }
  for (int fd = 0; fd < MAXFD; fd++)
    if (!own[fd] && fcntl(fd, F_GETFD) >= 0) {
      snprintf(how, sizeof how, "fcntl probe %s", when);
      note_foreign(fd, how);
    }
}

__attribute__((noinline)) static void busy_work(double seconds) {
  double end = now() + seconds;
  void *slots[64] = {0};
  unsigned long x = (unsigned long)&slots;
  while (now() < end) {
    for (int i = 0; i < 64; i++) {
      x = x * 6364136223846793005UL + 1442695040888963407UL;
      free(slots[i]);
      size_t size = 16 + (x >> 33) % 4080;
      slots[i] = malloc(size);
      memset(slots[i], (int)x, size < 64 ? size : 64);
    }
    for (int i = 0; i < 20000; i++) x = x * 6364136223846793005UL + 1;
    sink = x;
  }
  for (int i = 0; i < 64; i++) free(slots[i]);
}

static void *worker(void *arg) {
  busy_work(*(double *)arg);
  return NULL;
}

static void print_fds(const char *label, const int *fds, int n) {
  printf("%s:", label);
  for (int i = 0; i < n; i++) printf(" %d", fds[i]);
  printf("\n");
}

static int child(void) {
  int fds[MAXFD];
  int n = list_fds(fds, MAXFD);
  print_fds("child listing", fds, n);
  n = 0;
  for (int fd = 0; fd < MAXFD; fd++)
    if (fcntl(fd, F_GETFD) >= 0) fds[n++] = fd;
  print_fds("child fcntl probe", fds, n);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 2 && strcmp(argv[1], "child") == 0) return child();
  int fds[MAXFD];
  int n = list_fds(fds, MAXFD);
  print_fds("start", fds, n);
  own[0] = own[1] = own[2] = 1;
  look("at start");
  int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (null < 0 || dup2(null, 7) != 7) {
    perror("/dev/null");
    return 2;
  }
  own[null] = own[7] = 1;

  double seconds = 2.0;
  pthread_t threads[3];
  for (int i = 0; i < 3; i++) pthread_create(&threads[i], NULL, worker, &seconds);
  double end = now() + seconds;
  int rounds = 0;
  while (now() < end) {
    look("while threads run");
    rounds++;
  }
  for (int i = 0; i < 3; i++) pthread_join(threads[i], NULL);
  printf("looked %s\n", rounds >= 10 ? "at least 10 times" : "fewer than 10 times");

  int closed = 0;
  for (int fd = 3; fd < MAXFD; fd++)
    if (!own[fd] && close(fd) == 0) {
      closed++;
      char line[160];
      snprintf(line, sizeof line, "fd %d closed by the close-all loop", fd);
      if (nforeign < MAXFOREIGN) strcpy(foreign[nforeign++], line);
    }
  printf("close-all loop: closed %d descriptor(s) the program did not open\n", closed);
  busy_work(0.3);
  look("after the close-all loop");

  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) {
    execl("/proc/self/exe", "fd_observer", "child", (char *)NULL);
    _exit(127);
  }
  int status;
  waitpid(pid, &status, 0);
  printf("child exited with %d\n", WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
  if (nforeign == 0) {
    printf("saw no descriptor the program did not open\n");
    return 0;
  }
  for (int i = 0; i < nforeign; i++) printf("FOREIGN %s\n", foreign[i]);
  return 1;
}
