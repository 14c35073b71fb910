/* Helpers shared by the load generators: clocks, errors, socket setup, percentiles. */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static inline double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static inline void die(const char *what) {
    perror(what);
    exit(1);
}

static inline void set_nonblock(int fd) {
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static inline struct sockaddr_in addr_of(const char *host, int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address %s\n", host);
        exit(2);
    }
    return a;
}

static inline int listener(int type, int port) {
    int fd = socket(AF_INET, type, 0), one = 1;
    if (fd < 0) die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = addr_of("127.0.0.1", port);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (type == SOCK_STREAM && listen(fd, 4096) < 0) die("listen");
    return fd;
}

static inline int connect_to(int type, const char *host, int port) {
    int fd = socket(AF_INET, type, 0), one = 1;
    if (fd < 0) die("socket");
    struct sockaddr_in a = addr_of(host, port);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
    if (type == SOCK_STREAM) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* Reads exactly n bytes; returns 0 on EOF or error. */
static inline int read_full(int fd, char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r <= 0) return 0;
        got += (size_t)r;
    }
    return 1;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Sorts v and returns its p-quantile (0 <= p <= 1). */
static inline double quantile(double *v, size_t n, double p) {
    if (n == 0) return 0;
    qsort(v, n, sizeof *v, cmp_double);
    size_t i = (size_t)(p * (n - 1) + 0.5);
    return v[i];
}

/* The harness samples the forwarder's CPU when it reads this line, so print it right
 * when the measured window opens, and flush. */
static inline void window_open(void) {
    puts("window");
    fflush(stdout);
}

/* After ``warmup`` seconds of load, a measured window of ``secs``: *start and *end are what
 * the load's counter read as it opened and closed; returns the window's real length. */
static inline double counted_window(atomic_ullong *counter, double warmup, double secs,
                                    unsigned long long *start, unsigned long long *end) {
    usleep((useconds_t)(warmup * 1e6));
    *start = atomic_load(counter);
    double t0 = now();
    window_open();
    usleep((useconds_t)(secs * 1e6));
    *end = atomic_load(counter);
    return now() - t0;
}
#endif
