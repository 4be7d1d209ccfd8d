/*
 * http_client.c: the HTTP client of the `anyprof serve` security tests, run as another user
 * (nobody) to play a local attacker or an ordinary user.
 *
 * Modes
 * -----
 *   http_client get PORT PATH [HOST]
 *       One `GET PATH HTTP/1.1` to 127.0.0.1:PORT with `Host: HOST` (default
 *       127.0.0.1:PORT) and `Connection: close`; copies the whole response (status line,
 *       headers, body) to stdout. Exits 0 when a response arrived, 1 otherwise. Gives up
 *       after 30 s.
 *
 *   http_client stall PORT COUNT SECONDS
 *       Opens COUNT connections to 127.0.0.1:PORT and sends on each only the start of a
 *       request (`GET /debug/pprof/ HTTP/1.1\r\nHost: 127.0.0.1\r\n`, never the blank line
 *       that ends the headers). Prints `connected N` (N = connections that succeeded), then
 *       every 250 ms counts the connections the server has closed (EOF or reset) and prints
 *       `closed K` whenever K changes. Exits 0 once all are closed, or after SECONDS with
 *       `timeout K`. Raises its descriptor limit to the hard limit first.
 *
 * Every line is flushed as written.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int connect_to(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int get(int port, const char *path, const char *host) {
    char default_host[64];
    if (!host) {
        snprintf(default_host, sizeof default_host, "127.0.0.1:%d", port);
        host = default_host;
    }
    int fd = connect_to(port);
    if (fd < 0) {
        perror("connect");
        return 1;
    }
    char request[4096];
    int n = snprintf(request, sizeof request,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: anyprof-tests\r\n"
                     "Connection: close\r\n\r\n",
                     path, host);
    if (n < 0 || (size_t)n >= sizeof request || write(fd, request, (size_t)n) != n) {
        perror("write");
        return 1;
    }
    double deadline = now() + 30;
    size_t total = 0;
    char buf[65536];
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int left = (int)((deadline - now()) * 1000);
        if (left <= 0 || poll(&p, 1, left) <= 0)
            break;
        ssize_t got = read(fd, buf, sizeof buf);
        if (got <= 0)
            break;
        fwrite(buf, 1, (size_t)got, stdout);
        total += (size_t)got;
    }
    fflush(stdout);
    close(fd);
    return total > 0 ? 0 : 1;
}

static int stall(int port, int count, int seconds) {
    struct rlimit lim;
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0) {
        lim.rlim_cur = lim.rlim_max;
        setrlimit(RLIMIT_NOFILE, &lim);
    }
    int *fds = calloc((size_t)count, sizeof *fds);
    char *closed = calloc((size_t)count, 1);
    if (!fds || !closed)
        return 2;
    static const char half[] = "GET /debug/pprof/ HTTP/1.1\r\nHost: 127.0.0.1\r\n";
    int connected = 0;
    for (int i = 0; i < count; i++) {
        fds[i] = connect_to(port);
        if (fds[i] < 0) {
            closed[i] = 1;
            continue;
        }
        connected++;
        /* A server that closed it at once makes this fail: that counts as closed below. */
        if (send(fds[i], half, sizeof half - 1, MSG_NOSIGNAL) < 0)
            continue;
    }
    printf("connected %d\n", connected);
    fflush(stdout);
    double deadline = now() + seconds;
    int reported = -1;
    for (;;) {
        int n_closed = 0;
        for (int i = 0; i < count; i++) {
            if (closed[i]) {
                n_closed++;
                continue;
            }
            struct pollfd p = {.fd = fds[i], .events = POLLIN | POLLRDHUP};
            if (poll(&p, 1, 0) > 0) {
                char buf[4096];
                ssize_t got = recv(fds[i], buf, sizeof buf, MSG_DONTWAIT);
                if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR) ||
                    (p.revents & (POLLHUP | POLLERR | POLLRDHUP))) {
                    closed[i] = 1;
                    close(fds[i]);
                    n_closed++;
                }
            }
        }
        if (n_closed != reported) {
            printf("closed %d\n", n_closed);
            fflush(stdout);
            reported = n_closed;
        }
        if (n_closed == count)
            return 0;
        if (now() >= deadline) {
            printf("timeout %d\n", n_closed);
            fflush(stdout);
            return 0;
        }
        usleep(250 * 1000);
    }
}

int main(int argc, char **argv) {
    if (argc >= 4 && strcmp(argv[1], "get") == 0)
        return get(atoi(argv[2]), argv[3], argc > 4 ? argv[4] : NULL);
    if (argc == 5 && strcmp(argv[1], "stall") == 0)
        return stall(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    fprintf(stderr, "usage: http_client get PORT PATH [HOST] | stall PORT COUNT SECONDS\n");
    return 2;
}
