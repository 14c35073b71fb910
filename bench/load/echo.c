/* Echo server on one port number, TCP and UDP: `echo PORT`.
 * One epoll loop; TCP connections echo until the peer closes, UDP datagrams go back to
 * their sender. Holds as many connections as the open-files limit allows. */
#include "common.h"
#include <signal.h>
#include <sys/epoll.h>

#define MAXEV 256

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: echo PORT\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int port = atoi(argv[1]);
    int tcp = listener(SOCK_STREAM, port), udp = listener(SOCK_DGRAM, port);
    set_nonblock(tcp);
    set_nonblock(udp);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN}, evs[MAXEV];
    ev.data.fd = tcp;
    epoll_ctl(ep, EPOLL_CTL_ADD, tcp, &ev);
    ev.data.fd = udp;
    epoll_ctl(ep, EPOLL_CTL_ADD, udp, &ev);
    static char buf[65536];
    for (;;) {
        int n = epoll_wait(ep, evs, MAXEV, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == tcp) {
                int c, one = 1;
                while ((c = accept4(tcp, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    ev.data.fd = c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                }
            } else if (fd == udp) {
                struct sockaddr_in from;
                socklen_t len = sizeof from;
                ssize_t r;
                while ((r = recvfrom(udp, buf, sizeof buf, 0, (struct sockaddr *)&from, &len)) >= 0) {
                    sendto(udp, buf, (size_t)r, 0, (struct sockaddr *)&from, len);
                    len = sizeof from;
                }
            } else {
                ssize_t r = read(fd, buf, sizeof buf);
                if (r < 0 && errno == EAGAIN) continue;
                /* Small messages: a short write is not expected; a failed one ends the connection. */
                if (r <= 0 || write(fd, buf, (size_t)r) != r) close(fd);
            }
        }
    }
}
