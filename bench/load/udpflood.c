/* UDP flood into a counting sink: `udpflood SINK_PORT HOST PORT SIZE WARMUP SECS`.
 * One thread binds SINK_PORT on loopback and counts datagrams (recvmmsg); another sends
 * SIZE-byte datagrams to HOST:PORT as fast as it can (sendmmsg), where a forwarder relays
 * them to the sink (or HOST:PORT is the sink itself: the direct path). Reports datagrams
 * delivered per second of sending and the share lost.
 * Each datagram carries its sequence number and the sink marks the numbers it got, so
 * "delivered" counts exactly the datagrams sent inside the window: not those queued before
 * it opened, nor the batch still being sent when it closed (counting arrivals between two
 * moments overstated delivery by up to a batch or a socket buffer, and hid small losses
 * behind the clamp to 0). */
#include "common.h"
#include <pthread.h>
#include <stdatomic.h>

#define BATCH 64
#define SEQ_BITS (1u << 27) /* sequence numbers the sink can mark: minutes of flood at 1 M/s */

static atomic_ullong sent;
static _Atomic unsigned long long seen[SEQ_BITS / 64]; /* bit n: datagram n arrived */
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
    unsigned long long seq = 0;
    while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
        for (int i = 0; i < BATCH; i++) {
            unsigned long long n = seq + (unsigned long long)i;
            memcpy(buf[i], &n, sizeof n);
        }
        int r = sendmmsg(out_fd, msgs, BATCH, 0);
        if (r > 0) {
            seq += (unsigned long long)r;
            atomic_store_explicit(&sent, seq, memory_order_relaxed);
        }
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
        for (int i = 0; i < r; i++) {
            unsigned long long n;
            if (msgs[i].msg_len < sizeof n) continue; /* not one of ours (or mangled) */
            memcpy(&n, buf[i], sizeof n);
            if (n >= SEQ_BITS) continue;
            /* The only writer: a relaxed load and store, no locked instruction. */
            _Atomic unsigned long long *w = &seen[n / 64];
            atomic_store_explicit(w, atomic_load_explicit(w, memory_order_relaxed) | (1ull << (n % 64)),
                                  memory_order_relaxed);
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 7 || atoi(argv[4]) < 8) {
        fprintf(stderr, "usage: udpflood SINK_PORT HOST PORT SIZE WARMUP SECS (SIZE >= 8)\n");
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
    unsigned long long s0, s1;
    double elapsed = counted_window(&sent, warmup, secs, &s0, &s1);
    atomic_store(&stop, 1);
    usleep(200000); /* let datagrams still queued in the forwarder arrive */
    if (s1 > SEQ_BITS) {
        fprintf(stderr, "more datagrams than the sink can mark (%llu)\n", s1);
        return 1;
    }
    /* The window's datagrams are numbers s0 .. s1-1: count those that arrived. */
    unsigned long long got = 0;
    for (unsigned long long n = s0; n < s1; n++)
        got += (atomic_load_explicit(&seen[n / 64], memory_order_relaxed) >> (n % 64)) & 1;
    double delivered = (double)got, total = (double)(s1 - s0);
    printf("{\"sent\": %llu, \"delivered\": %llu, \"seconds\": %.6f, \"delivered_s\": %.1f, "
           "\"sent_s\": %.1f, \"loss\": %.4f}\n",
           s1 - s0, got, elapsed, delivered / elapsed, total / elapsed,
           total > 0 ? 1 - delivered / total : 0);
    fflush(stdout);
    _exit(0);
}
