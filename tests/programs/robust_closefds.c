/* Robustness: a program that closes every descriptor it did not open (as daemons do) and
 * then reuses the numbers.
 *
 * Usage: robust_closefds DIR
 * At start it notes which descriptors 3..1023 are open (it opened none) and closes them all.
 * Phase A: it opens DIR/out.txt and, on each noted number, a file of its own (dup2), then
 * works (CPU in work_after_close, mallocs) for about 0.4 s while writing known lines to
 * every one of them and to stdout. It then reads its files back: anything it did not write
 * is someone else's bytes. Phase B: it again notes and closes every descriptor it did not
 * open, puts one end of a SOCK_SEQPACKET socketpair on each noted number, works again, and
 * checks that nothing arrived at the other ends. Prints the verdicts (deterministic).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXFD 1024
static volatile unsigned long sink;
static int mine[MAXFD];
static int noted[MAXFD];
static int nnoted;

static double thread_cpu(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) static void work_after_close(double secs) {
  double end = thread_cpu() + secs;
  unsigned long x = 5;
  while (thread_cpu() < end) {
    for (int i = 0; i < 20000; i++) x = x * 6364136223846793005UL + 1;
    sink = x;
    char *p = malloc(64 + (x % 2000));
    p[0] = 1;
    free(p);
  }
}

/* Notes and closes every open descriptor 3..MAXFD-1 the program did not open itself. */
static void close_foreign(void) {
  nnoted = 0;
  for (int fd = 3; fd < MAXFD; fd++) {
    if (mine[fd]) continue;
    if (fcntl(fd, F_GETFD) >= 0) {
      noted[nnoted++] = fd;
      close(fd);
    }
  }
}

static void put(int fd, const char *text) {
  size_t len = strlen(text);
  if (write(fd, text, len) != (ssize_t)len) {
    fprintf(stderr, "write to fd %d failed: %s\n", fd, strerror(errno));
    exit(2);
  }
}

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  char path[4096], line[256];
  close_foreign();
  snprintf(path, sizeof path, "%s/out.txt", argv[1]);
  int out = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (out < 0) return 2;
  mine[out] = 1;
  put(out, "out.txt opened after closing everything\n");

  /* Phase A: files on the noted numbers. */
  int a_count = nnoted;
  int a_fds[MAXFD];
  for (int k = 0; k < a_count; k++) {
    snprintf(path, sizeof path, "%s/reuse_a_%d.txt", argv[1], k);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return 2;
    if (fd != noted[k]) {
      dup2(fd, noted[k]);
      close(fd);
    }
    a_fds[k] = noted[k];
    mine[noted[k]] = 1;
  }
  for (int round = 0; round < 8; round++) {
    work_after_close(0.05);
    snprintf(line, sizeof line, "phase A round %d\n", round);
    put(out, line);
    put(1, line);
    for (int k = 0; k < a_count; k++) put(a_fds[k], line);
  }
  int a_clean = 1;
  for (int k = 0; k < a_count; k++) {
    char expect[4096] = "", got[8192];
    for (int round = 0; round < 8; round++) {
      snprintf(line, sizeof line, "phase A round %d\n", round);
      strcat(expect, line);
    }
    ssize_t n = pread(a_fds[k], got, sizeof got - 1, 0);
    if (n != (ssize_t)strlen(expect) || memcmp(got, expect, (size_t)n) != 0) a_clean = 0;
    close(a_fds[k]);
    mine[a_fds[k]] = 0;
  }
  printf("phase A: reused descriptors hold only the program's bytes: %s\n", a_clean ? "ok" : "WRONG");
  fflush(stdout);

  /* Phase B: close what appeared meanwhile, put sockets on those numbers and the old ones. */
  int b_nums[MAXFD], b_count = 0;
  for (int k = 0; k < a_count; k++) b_nums[b_count++] = a_fds[k];
  close_foreign();
  for (int k = 0; k < nnoted; k++) b_nums[b_count++] = noted[k];
  int peers[MAXFD];
  for (int k = 0; k < b_count; k++) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK, 0, sv) != 0) return 2;
    if (sv[0] != b_nums[k]) {
      dup2(sv[0], b_nums[k]);
      close(sv[0]);
    }
    mine[b_nums[k]] = 1;
    mine[sv[1]] = 1;
    peers[k] = sv[1];
  }
  for (int round = 0; round < 8; round++) {
    work_after_close(0.05);
    snprintf(line, sizeof line, "phase B round %d\n", round);
    put(out, line);
    put(1, line);
  }
  int b_clean = 1;
  for (int k = 0; k < b_count; k++) {
    char buf[65536];
    ssize_t n = recv(peers[k], buf, sizeof buf, MSG_DONTWAIT);
    if (n >= 0) b_clean = 0;
  }
  printf("phase B: reused socket numbers received nothing: %s\n", b_clean ? "ok" : "WRONG");
  put(out, "end\n");
  close(out);
  return 0;
}
