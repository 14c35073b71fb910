/* Round trip on one connection: `pingpong tcp|udp HOST PORT SIZE WARMUP_N N`.
 * Sends SIZE bytes, waits for the echo, N times after WARMUP_N unmeasured ones; reports
 * the round-trip p50/p99. A UDP datagram not answered within 100 ms counts as lost; after
 * MAX_LOST losses the run stops and reports what it has. */
#include "common.h"
#include <sys/time.h>

#define MAX_LOST 20

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: pingpong tcp|udp HOST PORT SIZE WARMUP_N N\n");
        return 2;
    }
    int udp = !strcmp(argv[1], "udp");
    int fd = connect_to(udp ? SOCK_DGRAM : SOCK_STREAM, argv[2], atoi(argv[3]));
    size_t size = (size_t)atoi(argv[4]);
    long warm = atol(argv[5]), n = atol(argv[6]), lost = 0, k = 0;
    struct timeval tv = {.tv_usec = 100000};
    if (udp) setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char *msg = calloc(1, size), *buf = malloc(size);
    double *rtt = malloc((size_t)n * sizeof *rtt);
    for (long i = 0; i < warm + n; i++) {
        if (i == warm) window_open();
        double t = now();
        if (write(fd, msg, size) != (ssize_t)size) die("write");
        int ok = udp ? read(fd, buf, size) == (ssize_t)size : read_full(fd, buf, size);
        if (!ok && !(udp && errno == EAGAIN)) die("read");
        if (!ok && ++lost == MAX_LOST) break;
        if (ok && i >= warm) rtt[k++] = now() - t;
    }
    double p50 = quantile(rtt, (size_t)k, 0.5), p99 = quantile(rtt, (size_t)k, 0.99);
    printf("{\"n\": %ld, \"p50_us\": %.2f, \"p99_us\": %.2f, \"lost\": %ld}\n", k, p50 * 1e6,
           p99 * 1e6, lost);
    fflush(stdout);
    return 0;
}
