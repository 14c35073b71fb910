/* Idle connections: `idlehold HOST PORT N`.
 * Opens N connections one after another, each proven end to end by a one-byte echo, then
 * prints a line and holds them, idle, until its standard input reaches a line or EOF. */
#include "common.h"

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: idlehold HOST PORT N\n");
        return 2;
    }
    int port = atoi(argv[2]), n = atoi(argv[3]);
    double t0 = now();
    for (int i = 0; i < n; i++) {
        int fd = connect_to(SOCK_STREAM, argv[1], port);
        char c = 'x';
        if (write(fd, &c, 1) != 1 || !read_full(fd, &c, 1)) die("echo");
    }
    printf("{\"held\": %d, \"seconds\": %.3f}\n", n, now() - t0);
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) {}
    return 0;
}
