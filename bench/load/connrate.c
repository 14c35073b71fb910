/* Connection rate: `connrate HOST PORT CONCURRENCY WARMUP SECS SOURCES`.
 * CONCURRENCY connections in flight, each: connect, send 64 bytes, read the 64-byte echo,
 * close, start the next. Client addresses rotate over 127.0.1.1..SOURCES so the run does
 * not run out of local ports (TIME_WAIT). Reports completions/s in the window and the
 * connect-to-echo latency p50/p99. */
#include "common.h"
#include <signal.h>
#include <sys/epoll.h>

#define MSG 64

struct slot {
    int fd;
    int got;
    double started;
};

static struct sockaddr_in target;
static int sources, next_source, ep;
static long errors;

static void start(struct slot *s) {
    for (;;) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
        if (fd < 0) die("socket");
        /* Let connect() pick the port per 4-tuple, not bind(): far more ports per address. */
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000100u + 1 + (uint32_t)(next_source++ % sources));
        s->started = now();
        if (bind(fd, (struct sockaddr *)&src, sizeof src) == 0 &&
            (connect(fd, (struct sockaddr *)&target, sizeof target) == 0 || errno == EINPROGRESS)) {
            s->fd = fd;
            s->got = -1; /* -1: connecting */
            struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = s};
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
            return;
        }
        errors++;
        close(fd);
    }
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: connrate HOST PORT CONCURRENCY WARMUP SECS SOURCES\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    target = addr_of(argv[1], atoi(argv[2]));
    int conc = atoi(argv[3]);
    double warmup = atof(argv[4]), secs = atof(argv[5]);
    sources = atoi(argv[6]);
    ep = epoll_create1(0);
    struct slot *slots = calloc((size_t)conc, sizeof *slots);
    size_t cap = 1 << 20, n = 0;
    double *lat = malloc(cap * sizeof *lat);
    char msg[MSG] = {0}, buf[MSG];
    struct epoll_event evs[256];
    for (int i = 0; i < conc; i++) start(&slots[i]);
    double t0 = now() + warmup, t1 = t0 + secs;
    int open = 0;
    long done = 0, errors0 = 0;
    for (;;) {
        double t = now();
        if (!open && t >= t0) {
            open = 1;
            errors0 = errors;
            window_open();
        }
        if (t >= t1) break;
        int k = epoll_wait(ep, evs, 256, 10);
        for (int i = 0; i < k; i++) {
            struct slot *s = evs[i].data.ptr;
            int ok = 1;
            if (s->got < 0) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                ok = !err && write(s->fd, msg, MSG) == MSG;
                if (ok) {
                    s->got = 0;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
                    epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
                }
            } else {
                ssize_t r = read(s->fd, buf, (size_t)(MSG - s->got));
                if (r < 0 && errno == EAGAIN) continue;
                ok = r > 0;
                if (ok && (s->got += (int)r) < MSG) continue;
                if (ok) {
                    double end = now();
                    if (open && end < t1) {
                        done++;
                        if (n == cap) lat = realloc(lat, (cap *= 2) * sizeof *lat);
                        lat[n++] = end - s->started;
                    }
                } else {
                    errors++; /* closed or reset before the whole echo came back: a failure too */
                }
                close(s->fd);
                start(s);
                continue;
            }
            if (!ok) {
                errors++;
                close(s->fd);
                start(s);
            }
        }
    }
    double p50 = quantile(lat, n, 0.5), p99 = quantile(lat, n, 0.99);
    printf("{\"conns\": %ld, \"seconds\": %.6f, \"conns_s\": %.1f, \"p50_us\": %.1f, "
           "\"p99_us\": %.1f, \"errors\": %ld}\n",
           done, secs, done / secs, p50 * 1e6, p99 * 1e6, errors - errors0);
    fflush(stdout);
    _exit(0);
}
