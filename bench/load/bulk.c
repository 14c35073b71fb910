/* Bulk TCP throughput.
 *   bulk serve PORT                          : send to every connection as fast as possible
 *   bulk recv HOST PORT STREAMS WARMUP SECS  : open STREAMS connections, read everything,
 *                                              report what arrived in the window (receiver side)
 * One thread per stream on both sides, so the streams spread over the cores. */
#include "common.h"
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>

#define CHUNK (256 * 1024)

static atomic_ullong received;
static const char *host;
static int port;

static void *send_forever(void *arg) {
    int fd = (int)(intptr_t)arg;
    static char buf[CHUNK];
    while (write(fd, buf, sizeof buf) > 0) {}
    close(fd);
    return NULL;
}

static void *read_forever(void *arg) {
    (void)arg;
    int fd = connect_to(SOCK_STREAM, host, port);
    char *buf = malloc(CHUNK);
    ssize_t r;
    while ((r = read(fd, buf, CHUNK)) > 0) atomic_fetch_add(&received, (unsigned long long)r);
    fprintf(stderr, "stream ended early\n");
    exit(1);
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    pthread_t t;
    if (argc == 3 && !strcmp(argv[1], "serve")) {
        int lfd = listener(SOCK_STREAM, atoi(argv[2]));
        for (;;) {
            int fd = accept(lfd, NULL, NULL);
            if (fd < 0) continue;
            pthread_create(&t, NULL, send_forever, (void *)(intptr_t)fd);
            pthread_detach(t);
        }
    }
    if (argc != 7 || strcmp(argv[1], "recv")) {
        fprintf(stderr, "usage: bulk serve PORT | bulk recv HOST PORT STREAMS WARMUP SECS\n");
        return 2;
    }
    host = argv[2];
    port = atoi(argv[3]);
    int streams = atoi(argv[4]);
    double warmup = atof(argv[5]), secs = atof(argv[6]);
    for (int i = 0; i < streams; i++) pthread_create(&t, NULL, read_forever, NULL);
    unsigned long long b0, b1;
    double elapsed = counted_window(&received, warmup, secs, &b0, &b1);
    printf("{\"bytes\": %llu, \"seconds\": %.6f, \"gbit_s\": %.4f}\n", b1 - b0, elapsed,
           (b1 - b0) * 8 / elapsed / 1e9);
    fflush(stdout);
    _exit(0);
}
