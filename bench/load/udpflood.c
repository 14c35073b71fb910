/* UDP flood into a counting sink: `udpflood SINK_PORT HOST PORT SIZE WARMUP SECS`.
 * One thread binds SINK_PORT on loopback and counts datagrams (recvmmsg); another sends
 * SIZE-byte datagrams to HOST:PORT as fast as it can (sendmmsg), where a forwarder relays
 * them to the sink (or HOST:PORT is the sink itself: the direct path). Reports datagrams
 * delivered per second of sending and the share lost. */
#include "common.h"
#include <pthread.h>
#include <stdatomic.h>

#define BATCH 64

static atomic_ullong sent, received;
static atomic_int stop;
static int out_fd, in_fd;
static size_t size;

/* Points each of the BATCH messages at its own buffer of len bytes. */
static void init_batch(struct mmsghdr *msgs, struct iovec *iov, char (*buf)[2048], size_t len) {
    memset(msgs, 0, BATCH * sizeof *msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i] = (struct iovec){buf[i], len};
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
}

static void *sender(void *arg) {
    (void)arg;
    static char buf[BATCH][2048];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    init_batch(msgs, iov, buf, size);
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        int r = sendmmsg(out_fd, msgs, BATCH, 0);
        if (r > 0) atomic_fetch_add_explicit(&sent, (unsigned long long)r, memory_order_relaxed);
    }
    return NULL;
}

static void *sink(void *arg) {
    (void)arg;
    static char buf[BATCH][2048];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    init_batch(msgs, iov, buf, sizeof buf[0]);
    for (;;) {
        int r = recvmmsg(in_fd, msgs, BATCH, 0, NULL);
        if (r > 0) atomic_fetch_add_explicit(&received, (unsigned long long)r, memory_order_relaxed);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: udpflood SINK_PORT HOST PORT SIZE WARMUP SECS\n");
        return 2;
    }
    in_fd = listener(SOCK_DGRAM, atoi(argv[1]));
    int rcvbuf = 8 << 20;
    setsockopt(in_fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf);
    out_fd = connect_to(SOCK_DGRAM, argv[2], atoi(argv[3]));
    size = (size_t)atoi(argv[4]);
    double warmup = atof(argv[5]), secs = atof(argv[6]);
    pthread_t ts, tr;
    pthread_create(&tr, NULL, sink, NULL);
    pthread_create(&ts, NULL, sender, NULL);
    usleep((useconds_t)(warmup * 1e6));
    unsigned long long s0 = atomic_load(&sent), r0 = atomic_load(&received);
    double t0 = now();
    window_open();
    usleep((useconds_t)(secs * 1e6));
    unsigned long long s1 = atomic_load(&sent);
    double t1 = now();
    atomic_store(&stop, 1);
    usleep(200000); /* let datagrams still queued in the forwarder arrive */
    unsigned long long r1 = atomic_load(&received);
    double delivered = (double)(r1 - r0), total = (double)(s1 - s0);
    printf("{\"sent\": %llu, \"delivered\": %llu, \"seconds\": %.6f, \"delivered_s\": %.1f, "
           "\"sent_s\": %.1f, \"loss\": %.4f}\n",
           s1 - s0, r1 - r0, t1 - t0, delivered / (t1 - t0), total / (t1 - t0),
           total > 0 ? (total > delivered ? 1 - delivered / total : 0) : 0);
    fflush(stdout);
    _exit(0);
}
