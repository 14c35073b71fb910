/* Minimal C reference forwarder: `reference_fwd tcp:LISTEN:TARGET udp:LISTEN:TARGET ...`
 * (127.0.0.1 at both ends). The bench runs it next to fastfwd to show what user space can
 * reach on the same box in the same run; it is a yardstick, not a product (no config, no
 * logging, no timeouts beyond what keeps the UDP table bounded).
 *
 * One process, one thread, one epoll loop.
 * TCP: each connection relays both ways with splice(2) through a 1 MiB pipe per direction.
 *   Pipes are taken from a small pool when a direction has something to read and given back
 *   as soon as it is drained, so an idle connection holds its two sockets and nothing else.
 *   Sockets are edge-triggered; a connection is pumped until every direction is blocked.
 * UDP: recvmmsg batches of 32 on the listening socket; a session per client address with its
 *   own connected upstream socket; runs of datagrams go out with one sendmmsg, and replies
 *   return to the client through the listening socket. */
#include "../load/common.h"
#include <signal.h>
#include <stdbool.h>
#include <sys/epoll.h>
#include <sys/resource.h>

#define PIPE_SIZE (1 << 20)
#define PIPE_POOL 4        /* spare pipes kept open: few, so idle connections cost 2 fds */
#define PUMP_ROUNDS 8      /* splice rounds per wake-up before other connections get a turn */
#define ACCEPT_BATCH 64
#define UDP_BATCH 32
#define UDP_ROUNDS 8       /* batches per wake-up while they come full: fewer epoll_wait calls */
#define UDP_MAX 65536
#define UDP_BUCKETS 1024
#define UDP_SESSIONS 4096  /* per listener; when full, sessions idle this long are dropped: */
#define UDP_IDLE_S 30
#define UDP_RCVBUF (4 << 20)
#define MAXEV 256

/* Everything registered with epoll starts with a handler; epoll_event.data.ptr points at it. */
struct handler {
    void (*on_event)(struct handler *, uint32_t events);
    bool dead; /* closed during this batch of events: ignore what is still queued for it */
};

static int ep;

static void watch(struct handler *h, int fd, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = h};
    if (epoll_ctl(ep, op, fd, &ev) < 0) die("epoll_ctl");
}

/* Objects closed while handling a batch are freed after it: a later event of the same batch
 * may still point at them. */
static void **graves;
static size_t ngraves, graves_cap;

static void bury(void *p) {
    if (ngraves == graves_cap) {
        graves_cap = graves_cap ? 2 * graves_cap : 64;
        if (!(graves = realloc(graves, graves_cap * sizeof *graves))) die("realloc");
    }
    graves[ngraves++] = p;
}

/* ---- TCP ---- */

struct end {
    struct handler h;
    int fd;
    struct conn *conn;
    /* Edge-triggered: set by an event, cleared by EAGAIN, so no call is made that epoll
     * already said would block. */
    bool readable, writable;
};

/* One direction: bytes read from end[i] wait in the pipe for end[!i]. */
struct dir {
    int pipe[2]; /* -1 while drained */
    size_t queued;
    bool eof, shut;
};

struct conn {
    struct end end[2]; /* 0: the client, 1: the upstream */
    struct dir dir[2];
    bool connecting;
};

struct tcp_listener {
    struct handler h;
    int fd;
    struct sockaddr_in target;
};

static int pool[PIPE_POOL][2], pooled;

static int pipe_get(int p[2]) {
    if (pooled) {
        memcpy(p, pool[--pooled], sizeof pool[0]);
        return 0;
    }
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) return -1;
    fcntl(p[1], F_SETPIPE_SZ, PIPE_SIZE); /* a smaller pipe still works, only slower */
    return 0;
}

/* Only empty pipes come back: a pooled pipe carries nothing over to its next user. */
static void pipe_put(int p[2]) {
    if (pooled < PIPE_POOL) {
        memcpy(pool[pooled++], p, sizeof pool[0]);
    } else {
        close(p[0]);
        close(p[1]);
    }
    p[0] = p[1] = -1;
}

static void conn_close(struct conn *c) {
    for (int i = 0; i < 2; i++) {
        close(c->end[i].fd);
        c->end[i].h.dead = true;
        struct dir *d = &c->dir[i];
        if (d->pipe[0] < 0) continue;
        if (d->queued) { /* bytes still inside: this pipe is no good to anyone else */
            close(d->pipe[0]);
            close(d->pipe[1]);
        } else {
            pipe_put(d->pipe);
        }
    }
    bury(c);
}

/* One read and one write for direction i: 1 if it moved bytes or saw EOF, 0 if it has to
 * wait for an event, -1 on an error that ends the connection. */
static int step(struct conn *c, int i) {
    struct dir *d = &c->dir[i];
    struct end *src = &c->end[i], *dst = &c->end[!i];
    int moved = 0;
    ssize_t n;
    /* Only into an empty pipe: then EAGAIN means the socket is empty, not the pipe full. */
    if (!d->queued && !d->eof && src->readable) {
        if (d->pipe[0] < 0 && pipe_get(d->pipe) < 0) return -1;
        n = splice(src->fd, NULL, d->pipe[1], NULL, PIPE_SIZE, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n > 0) d->queued = (size_t)n;
        else if (n == 0) d->eof = true;
        else if (errno == EAGAIN) src->readable = false;
        else return -1;
        moved = n >= 0;
    }
    if (d->queued && dst->writable) {
        n = splice(d->pipe[0], NULL, dst->fd, NULL, d->queued, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n > 0) d->queued -= (size_t)n, moved = 1;
        else if (n < 0 && errno == EAGAIN) dst->writable = false;
        else return -1;
    }
    if (!d->queued) {
        if (d->pipe[0] >= 0) pipe_put(d->pipe);
        if (d->eof && !d->shut) { /* the source's EOF, passed on once everything before it was */
            shutdown(dst->fd, SHUT_WR);
            d->shut = true;
        }
    }
    return moved;
}

/* Pumped until no direction can move: each one then waits for a read or a write that
 * returned EAGAIN, and that socket's next edge wakes it. */
static void pump(struct conn *c) {
    for (int round = 0; round < PUMP_ROUNDS; round++) {
        int a = step(c, 0), b = a < 0 ? -1 : step(c, 1);
        if (a < 0 || b < 0 || (c->dir[0].shut && c->dir[1].shut)) {
            conn_close(c);
            return;
        }
        if (!a && !b) return;
    }
    /* Still moving after its share: re-arming makes epoll report the ready ends again after
     * the others have had their turn. */
    for (int i = 0; i < 2; i++)
        watch(&c->end[i].h, c->end[i].fd, EPOLLIN | EPOLLOUT | EPOLLET, EPOLL_CTL_MOD);
}

static void on_end(struct handler *h, uint32_t events) {
    struct end *e = (struct end *)h;
    struct conn *c = e->conn;
    /* An error or hang-up is also readiness: the next call returns it (or the EOF). */
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) e->readable = true;
    if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) e->writable = true;
    if (c->connecting) {
        if (e == &c->end[0]) return; /* the client's bytes wait until the upstream is there */
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(e->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || (events & (EPOLLERR | EPOLLHUP))) {
            conn_close(c);
            return;
        }
        c->connecting = false;
    }
    pump(c);
    /* A reset end: what it had sent is passed on above, then the connection ends. */
    if (events & EPOLLERR && !e->h.dead) conn_close(c);
}

static void on_accept(struct handler *h, uint32_t events) {
    (void)events;
    struct tcp_listener *l = (struct tcp_listener *)h;
    int one = 1;
    for (int k = 0; k < ACCEPT_BATCH; k++) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return; /* EAGAIN, or out of fds: level-triggered, so it is retried */
        int up = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int r = up < 0 ? -1 : connect(up, (struct sockaddr *)&l->target, sizeof l->target);
        struct conn *c = r == 0 || errno == EINPROGRESS ? malloc(sizeof *c) : NULL;
        if (!c) {
            close(fd);
            if (up >= 0) close(up);
            continue;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(up, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        *c = (struct conn){.connecting = r < 0, .dir = {{.pipe = {-1, -1}}, {.pipe = {-1, -1}}}};
        int fds[2] = {fd, up};
        for (int i = 0; i < 2; i++) {
            c->end[i] = (struct end){.h = {.on_event = on_end}, .fd = fds[i], .conn = c};
            watch(&c->end[i].h, fds[i], EPOLLIN | EPOLLOUT | EPOLLET, EPOLL_CTL_ADD);
        }
    }
}

/* ---- UDP ---- */

struct session {
    struct handler h;
    int fd; /* connected to the target */
    struct sockaddr_in client;
    struct udp_listener *l;
    struct session *next; /* in its hash bucket */
    time_t last_active;
};

struct udp_listener {
    struct handler h;
    int fd;
    struct sockaddr_in target;
    struct session *buckets[UDP_BUCKETS];
    int sessions;
};

/* One batch's buffers, shared: a batch is forwarded before the next one is read. */
static char udp_buf[UDP_BATCH][UDP_MAX];
static struct iovec in_iov[UDP_BATCH], out_iov[UDP_BATCH];
static struct mmsghdr in_msg[UDP_BATCH], out_msg[UDP_BATCH];
static struct sockaddr_in in_addr[UDP_BATCH];

static time_t seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return ts.tv_sec;
}

static unsigned bucket_of(const struct sockaddr_in *a) {
    uint32_t key = a->sin_addr.s_addr ^ ((uint32_t)a->sin_port << 16);
    return (key * 2654435761u) >> 22; /* top 10 bits: UDP_BUCKETS */
}

static int recv_batch(int fd) {
    for (int i = 0; i < UDP_BATCH; i++) {
        in_iov[i] = (struct iovec){udp_buf[i], UDP_MAX};
        in_msg[i].msg_hdr = (struct msghdr){.msg_name = &in_addr[i], .msg_namelen = sizeof in_addr[i],
                                            .msg_iov = &in_iov[i], .msg_iovlen = 1};
    }
    return recvmmsg(fd, in_msg, UDP_BATCH, MSG_DONTWAIT, NULL);
}

/* Sends the n datagrams queued in out_msg, to `to` or (NULL) where fd is connected. A
 * datagram that cannot go (refused by the last ICMP, buffer full) is dropped, as UDP may. */
static void send_batch(int fd, int n, struct sockaddr_in *to) {
    for (int i = 0; i < n; i++) {
        out_msg[i].msg_hdr.msg_name = to;
        out_msg[i].msg_hdr.msg_namelen = to ? sizeof *to : 0;
    }
    for (int sent = 0; sent < n;) {
        int r = sendmmsg(fd, out_msg + sent, (unsigned)(n - sent), MSG_DONTWAIT);
        if (r > 0) sent += r;
        else if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        else sent++;
    }
}

static void queue_out(int k, int i) {
    out_iov[k] = (struct iovec){udp_buf[i], in_msg[i].msg_len};
    out_msg[k].msg_hdr = (struct msghdr){.msg_iov = &out_iov[k], .msg_iovlen = 1};
}

static void session_close(struct session *s) {
    struct session **p = &s->l->buckets[bucket_of(&s->client)];
    while (*p != s) p = &(*p)->next;
    *p = s->next;
    s->l->sessions--;
    close(s->fd);
    s->h.dead = true;
    bury(s);
}

/* Replies from the target go back to the client, from the port it sent to. */
static void on_reply(struct handler *h, uint32_t events) {
    (void)events;
    struct session *s = (struct session *)h;
    for (int round = 0, n = UDP_BATCH; round < UDP_ROUNDS && n == UDP_BATCH; round++) {
        if ((n = recv_batch(s->fd)) <= 0) return;
        for (int i = 0; i < n; i++) queue_out(i, i);
        send_batch(s->l->fd, n, &s->client);
    }
    s->last_active = seconds();
}

static struct session *session_for(struct udp_listener *l, const struct sockaddr_in *client, time_t now) {
    unsigned b = bucket_of(client);
    for (struct session *s = l->buckets[b]; s; s = s->next)
        if (s->client.sin_addr.s_addr == client->sin_addr.s_addr && s->client.sin_port == client->sin_port)
            return s;
    if (l->sessions == UDP_SESSIONS) { /* full: drop the idle ones, or this datagram */
        for (int i = 0; i < UDP_BUCKETS; i++)
            for (struct session *s = l->buckets[i], *next; s; s = next) {
                next = s->next;
                if (now - s->last_active > UDP_IDLE_S) session_close(s);
            }
        if (l->sessions == UDP_SESSIONS) return NULL;
    }
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct session *s = fd < 0 ? NULL : malloc(sizeof *s);
    if (!s || connect(fd, (struct sockaddr *)&l->target, sizeof l->target) < 0) {
        if (fd >= 0) close(fd);
        free(s);
        return NULL;
    }
    *s = (struct session){.h = {.on_event = on_reply}, .fd = fd, .client = *client, .l = l,
                          .next = l->buckets[b], .last_active = now};
    l->buckets[b] = s;
    l->sessions++;
    watch(&s->h, fd, EPOLLIN, EPOLL_CTL_ADD);
    return s;
}

/* Datagrams from clients: consecutive ones of the same client go upstream in one sendmmsg. */
static void on_datagrams(struct handler *h, uint32_t events) {
    (void)events;
    struct udp_listener *l = (struct udp_listener *)h;
    time_t now = seconds();
    for (int round = 0, n = UDP_BATCH; round < UDP_ROUNDS && n == UDP_BATCH; round++) {
        if ((n = recv_batch(l->fd)) <= 0) return;
        struct session *run = NULL;
        int k = 0;
        for (int i = 0; i < n; i++) {
            struct session *s = session_for(l, &in_addr[i], now);
            if (s != run && k) {
                send_batch(run->fd, k, NULL);
                k = 0;
            }
            run = s;
            if (s) {
                s->last_active = now;
                queue_out(k++, i);
            }
        }
        if (k) send_batch(run->fd, k, NULL);
    }
}

/* ---- setup and loop ---- */

static void add_forward(const char *spec) {
    char proto[4];
    int listen_port, target_port;
    if (sscanf(spec, "%3[a-z]:%d:%d", proto, &listen_port, &target_port) != 3 ||
        (strcmp(proto, "tcp") && strcmp(proto, "udp"))) {
        fprintf(stderr, "bad forward %s: expected tcp:LISTEN:TARGET or udp:LISTEN:TARGET\n", spec);
        exit(2);
    }
    struct sockaddr_in target = addr_of("127.0.0.1", target_port);
    if (!strcmp(proto, "tcp")) {
        struct tcp_listener *l = malloc(sizeof *l);
        if (!l) die("malloc");
        *l = (struct tcp_listener){.h = {.on_event = on_accept},
                                   .fd = listener(SOCK_STREAM, listen_port), .target = target};
        set_nonblock(l->fd);
        watch(&l->h, l->fd, EPOLLIN, EPOLL_CTL_ADD);
    } else {
        struct udp_listener *l = calloc(1, sizeof *l);
        if (!l) die("calloc");
        l->h.on_event = on_datagrams;
        l->fd = listener(SOCK_DGRAM, listen_port);
        l->target = target;
        int size = UDP_RCVBUF; /* absorbs a flood's bursts while replies are being sent */
        if (setsockopt(l->fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
            setsockopt(l->fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
        set_nonblock(l->fd);
        watch(&l->h, l->fd, EPOLLIN, EPOLL_CTL_ADD);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: reference_fwd tcp:LISTEN:TARGET|udp:LISTEN:TARGET ...\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit lim;
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0) { /* two fds per held connection */
        lim.rlim_cur = lim.rlim_max;
        setrlimit(RLIMIT_NOFILE, &lim);
    }
    if ((ep = epoll_create1(EPOLL_CLOEXEC)) < 0) die("epoll_create1");
    for (int i = 1; i < argc; i++) add_forward(argv[i]);
    struct epoll_event evs[MAXEV];
    for (;;) {
        int n = epoll_wait(ep, evs, MAXEV, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct handler *h = evs[i].data.ptr;
            if (!h->dead) h->on_event(h, evs[i].events);
        }
        for (size_t i = 0; i < ngraves; i++) free(graves[i]);
        ngraves = 0;
    }
}
