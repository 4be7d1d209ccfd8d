/*
 * squat_listener.c: the attacker of the security tests (tests/tests/security_preload.rs).
 * Run as an unprivileged user, it listens on SOCK_SEQPACKET sockets at the paths given
 * (where a victim might look for the anyprof daemon) and reports every connection.
 *
 * It binds and listens on every PATH (mode 0777, so that anyone may connect), prints
 * `listening` on stdout (flushed), then accepts until its stdin reaches end of file,
 * printing `connection <PATH>` for each connection accepted and then `data <PATH> <BYTES>`
 * if the peer sent anything within 500 ms (a peer that checks SO_PEERCRED after connect
 * and then hangs up sends nothing). At the end it prints `done`,
 * removes the socket files it still finds at their paths, and exits 0. Exit status 2: a
 * path could not be bound.
 *
 * Usage: squat_listener PATH...
 */
#define _GNU_SOURCE
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_PATHS 16

int main(int argc, char **argv) {
    int n = argc - 1;
    if (n < 1 || n > MAX_PATHS) {
        fprintf(stderr, "usage: squat_listener PATH... (1 to %d paths)\n", MAX_PATHS);
        return 2;
    }
    struct pollfd pfds[MAX_PATHS + 1];
    umask(0);
    for (int i = 0; i < n; i++) {
        int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        strncpy(addr.sun_path, argv[i + 1], sizeof addr.sun_path - 1);
        if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 16) != 0) {
            perror(argv[i + 1]);
            return 2;
        }
        pfds[i] = (struct pollfd){.fd = fd, .events = POLLIN};
    }
    pfds[n] = (struct pollfd){.fd = 0, .events = POLLIN};
    printf("listening\n");
    fflush(stdout);
    for (;;) {
        if (poll(pfds, n + 1, -1) < 0) continue;
        for (int i = 0; i < n; i++) {
            if (pfds[i].revents & POLLIN) {
                int c = accept4(pfds[i].fd, NULL, NULL, SOCK_CLOEXEC);
                if (c >= 0) {
                    printf("connection %s\n", argv[i + 1]);
                    struct pollfd in = {.fd = c, .events = POLLIN};
                    char buf[65536];
                    ssize_t got = 0;
                    if (poll(&in, 1, 500) > 0) got = recv(c, buf, sizeof buf, MSG_DONTWAIT);
                    if (got > 0) printf("data %s %zd\n", argv[i + 1], got);
                    fflush(stdout);
                    close(c);
                }
            }
        }
        if (pfds[n].revents) {
            char buf[64];
            if (read(0, buf, sizeof buf) <= 0) break;
        }
    }
    for (int i = 0; i < n; i++) {
        struct stat st;
        if (lstat(argv[i + 1], &st) == 0 && S_ISSOCK(st.st_mode)) unlink(argv[i + 1]);
    }
    printf("done\n");
    fflush(stdout);
    return 0;
}
