/* A stand-in for a hostile user's process (tests/tests/security_peer.rs): opens COUNT
 * connections to the collector's SOCK_SEQPACKET socket given as argv[1] and never sends
 * anything on them. Prints "connected N\n" once N connections are open (it stops at the
 * first that fails). Then, for each line read on stdin, prints "closed M\n": how many of
 * those connections the collector has closed by now. Exits at end of input. */
#define _GNU_SOURCE /* POLLRDHUP */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s SOCKET COUNT\n", argv[0]);
        return 2;
    }
    long count = atol(argv[2]);
    struct rlimit lim;
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
        lim.rlim_cur = lim.rlim_max;
        setrlimit(RLIMIT_NOFILE, &lim);
    }
    struct pollfd *fds = calloc((size_t)count, sizeof *fds);
    if (!fds)
        return 1;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
    long open = 0;
    while (open < count) {
        int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
            perror("connect");
            if (fd >= 0)
                close(fd);
            break;
        }
        fds[open].fd = fd;
        fds[open].events = POLLIN | POLLRDHUP;
        open++;
    }
    printf("connected %ld\n", open);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        long closed = 0;
        for (long i = 0; i < open; i++)
            fds[i].revents = 0;
        if (poll(fds, (nfds_t)open, 0) < 0) {
            perror("poll");
            return 1;
        }
        for (long i = 0; i < open; i++)
            if (fds[i].revents & (POLLHUP | POLLRDHUP | POLLERR))
                closed++;
        printf("closed %ld\n", closed);
        fflush(stdout);
    }
    return 0;
}
