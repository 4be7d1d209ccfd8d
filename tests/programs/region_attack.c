/* A stand-in for a hostile preloaded process (tests/tests/security_peer.rs): hands the
 * collector a shared region the way libanyprof.so does (a Region datagram carrying a memfd,
 * then the hello, then the socket is closed), with the memfd sealed against shrinking and
 * growing or not (argv[2]: "sealed" or "unsealed"). When it reads "cut" on stdin it cuts
 * the memfd to nothing: a collector that mapped an unsealed memfd would then die of SIGBUS
 * at its next read of the region.
 *
 * argv: SOCKET MODE SIZE VERSION. stdin: two messages, each a 4-byte little-endian length
 * then its bytes (the Region message and the hello, built by the test with the wire
 * crate's encoders), then lines. Prints "sent" after the hand-over and "cut RC ERRNO"
 * after the cut, then waits to be killed. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
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

static size_t read_message(unsigned char *buf, size_t max) {
    unsigned char len_bytes[4];
    if (!read_all(len_bytes, 4))
        exit(3);
    uint32_t len = (uint32_t)len_bytes[0] | (uint32_t)len_bytes[1] << 8 |
                   (uint32_t)len_bytes[2] << 16 | (uint32_t)len_bytes[3] << 24;
    if (len > max || !read_all(buf, len))
        exit(3);
    return len;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s SOCKET sealed|unsealed SIZE VERSION\n", argv[0]);
        return 2;
    }
    int sealed = strcmp(argv[2], "sealed") == 0;
    off_t size = (off_t)strtoull(argv[3], 0, 10);
    uint32_t version = (uint32_t)strtoul(argv[4], 0, 10);
    static unsigned char region[64], hello[1 << 16];
    size_t region_len = read_message(region, sizeof region);
    size_t hello_len = read_message(hello, sizeof hello);

    int memfd = memfd_create("anyprof", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (memfd < 0 || ftruncate(memfd, size) != 0) {
        perror("memfd");
        return 1;
    }
    /* The header the collector checks: magic, version, pid, size. */
    uint64_t magic;
    memcpy(&magic, "APRFSHM1", 8);
    uint32_t pid = (uint32_t)getpid();
    uint64_t size64 = (uint64_t)size;
    if (pwrite(memfd, &magic, 8, 0) != 8 || pwrite(memfd, &version, 4, 8) != 4 ||
        pwrite(memfd, &pid, 4, 12) != 4 || pwrite(memfd, &size64, 8, 16) != 8) {
        perror("pwrite");
        return 1;
    }
    if (sealed && fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0) {
        perror("seal");
        return 1;
    }

    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("connect");
        return 1;
    }
    union {
        struct cmsghdr header;
        char space[CMSG_SPACE(sizeof(int))];
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {.iov_base = region, .iov_len = region_len};
    struct msghdr msg = {.msg_iov = &iov,
                         .msg_iovlen = 1,
                         .msg_control = control.space,
                         .msg_controllen = sizeof control.space};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &memfd, sizeof(int));
    if (sendmsg(fd, &msg, MSG_NOSIGNAL) != (ssize_t)region_len ||
        send(fd, hello, hello_len, MSG_NOSIGNAL) != (ssize_t)hello_len) {
        perror("send");
        return 1;
    }
    close(fd);
    printf("sent\n");
    fflush(stdout);

    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "cut", 3) == 0) {
            int rc = ftruncate(memfd, 0);
            printf("cut %d %d\n", rc, rc == 0 ? 0 : errno);
            fflush(stdout);
        }
    }
    for (;;)
        pause();
}
