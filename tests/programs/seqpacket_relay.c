/* A stand-in for a hostile preloaded process (tests/tests/security_peer.rs): connects to the
 * collector's SOCK_SEQPACKET socket given as argv[1] and sends, one datagram each, the
 * messages read from stdin, each framed as a 4-byte little-endian length then its bytes.
 * Messages are built by the test with the wire crate's encoders, so this program knows
 * nothing of the protocol. At end of input it prints "sent N\n" and keeps the connection
 * open until it is killed (the collector lists only connected processes). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int read_all(void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(0, (char *)buf + got, n - got);
        if (r <= 0)
            return 0;
        got += (size_t)r;
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SOCKET < framed-messages\n", argv[0]);
        return 2;
    }
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("connect");
        return 1;
    }
    static unsigned char buf[1 << 20];
    unsigned long sent = 0;
    for (;;) {
        unsigned char len_bytes[4];
        if (!read_all(len_bytes, 4))
            break;
        uint32_t len = (uint32_t)len_bytes[0] | (uint32_t)len_bytes[1] << 8 |
                       (uint32_t)len_bytes[2] << 16 | (uint32_t)len_bytes[3] << 24;
        if (len > sizeof buf || !read_all(buf, len))
            return 3;
        if (send(fd, buf, len, MSG_NOSIGNAL) != (ssize_t)len) {
            perror("send");
            break;
        }
        sent++;
    }
    printf("sent %lu\n", sent);
    fflush(stdout);
    for (;;)
        pause();
}
