# cython: language_level=3
"""The data plane: worker threads forwarding TCP and UDP without the GIL.

The Engine is the control plane's handle on them. It binds listening sockets, builds rule
configurations and hands both to the workers as commands; every call that changes
forwarding returns once all workers have applied it, or, inside a batch, when the batch ends.
"""
import errno as errno_mod
import ipaddress
import os

from libc.stdlib cimport calloc, malloc, free
from libc.string cimport memcpy, memset

include "engine.pxd"
include "timers.pyx"
include "pools.pyx"
include "rule.pyx"
include "io_copy.pyx"
include "io_splice.pyx"
include "tcp_relay.pyx"
include "udp_sessions.pyx"
include "worker.pyx"

# counters_t's fields, in order: the engine sums them as an array of uint64_t.
_COUNTERS = ("accepted", "closed", "refused", "connect_failed", "bytes_up", "bytes_down",
             "bytes_spliced", "bytes_copied", "splice_fallbacks", "pipe_shortages", "accept_paused",
             "datagrams_up", "datagrams_down", "sessions_created", "sessions_closed",
             "sessions_evicted", "sessions_expired", "drops", "truncated", "bytes_discarded")
assert len(_COUNTERS) == sizeof(counters_t) // sizeof(uint64_t)

ff_watch_forks()    # once per process: the workers must know when a child holds copies of fds


cdef int parse_addr(str host, int port, addr_t* out) except -1:
    cdef bytes raw = host.encode()
    memset(out, 0, sizeof(addr_t))
    if inet_pton(AF_INET, raw, &out.v4.sin_addr) == 1:
        out.v4.sin_family = AF_INET
        out.v4.sin_port = htons(port)
    elif inet_pton(AF_INET6, raw, &out.v6.sin6_addr) == 1:
        out.v6.sin6_family = AF_INET6
        out.v6.sin6_port = htons(port)
    else:
        raise ValueError(f"{host!r} is not an IPv4 or IPv6 address")
    return 0


cdef tuple format_addr(addr_t* a):
    cdef char text[64]
    if a.sa.sa_family == AF_INET:
        inet_ntop(AF_INET, &a.v4.sin_addr, text, sizeof(text))
        return (text.decode(), ntohs(a.v4.sin_port))
    inet_ntop(AF_INET6, &a.v6.sin6_addr, text, sizeof(text))
    return (text.decode(), ntohs(a.v6.sin6_port))


cdef bint is_wildcard(addr_t* a) noexcept nogil:
    cdef int i
    if a.sa.sa_family == AF_INET:
        return a.v4.sin_addr.s_addr == 0
    for i in range(16):
        if a.v6.sin6_addr.s6_addr[i]:
            return False
    return True


def bind_error(int err, str proto, str host, int port):
    # Say what the user can act on: which port, and what is wrong with it.
    if err == errno_mod.EADDRINUSE:
        return f"{proto} port {port} on {host} is already in use"
    if err == errno_mod.EADDRNOTAVAIL:
        return f"{host} is not an address of this host"
    if err == errno_mod.EACCES:
        return f"no permission to listen on {proto} port {port}"
    return f"cannot listen on {proto} {host} port {port}: {strerror(err).decode()}"


def _raise_nofile_limit():
    # Every relayed connection costs two fds; take all the kernel lets this process have.
    cdef rlimit lim
    if getrlimit(RLIMIT_NOFILE, &lim) == 0 and lim.rlim_cur < lim.rlim_max:
        lim.rlim_cur = lim.rlim_max
        setrlimit(RLIMIT_NOFILE, &lim)


cdef class Engine:
    cdef worker_t* _w
    cdef int _n
    cdef ctl_t _ctl
    cdef dict _rules                # rule id -> address of its rule_t
    cdef int _next_id
    # Inside a batch, commands that need no answer are posted without waiting; what they
    # replaced is kept until the workers have acknowledged them (see batch()).
    cdef int _batch_depth
    cdef list _unacked_cmds         # addresses of posted command arrays
    cdef list _unacked_confs        # addresses of configurations replaced since
    cdef list _unacked_removals     # addresses of removed rules, listeners still open
    cdef readonly int workers
    cdef readonly int pipe_size
    cdef readonly int copy_buffer

    def __cinit__(self):
        self._w = NULL
        self._n = 0
        self._rules = {}
        self._next_id = 1
        self._unacked_cmds = []
        self._unacked_confs = []
        self._unacked_removals = []
        pthread_mutex_init(&self._ctl.lock, NULL)
        pthread_cond_init(&self._ctl.cond, NULL)

    def __init__(self, int workers=0, int pipe_size=1 << 20, int copy_buffer=256 * 1024,
                 int busy_poll_us=0):
        cdef worker_t* w
        cdef int i, rc
        if workers <= 0:
            workers = len(os.sched_getaffinity(0))
        if pipe_size < 4096 or copy_buffer < 4096:
            raise ValueError("pipe_size and copy_buffer must be at least 4096 bytes")
        if busy_poll_us < 0:
            raise ValueError("busy_poll_us must be 0 (off) or more")  # it would poll for ever
        _raise_nofile_limit()
        self.workers = workers
        self.pipe_size = pipe_size
        self.copy_buffer = copy_buffer
        self._w = <worker_t*>calloc(workers, sizeof(worker_t))
        if self._w == NULL:
            raise MemoryError()
        for i in range(workers):
            w = &self._w[i]
            w.id = i
            w.running = 1
            w.ctl = &self._ctl
            w.spin_ns = <uint64_t>busy_poll_us * 1000
            w.epfd = epoll_create1(EPOLL_CLOEXEC)
            w.wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
            w.reserve_fd = -1
            reserve_refill(w)
            pthread_mutex_init(&w.qlock, NULL)
            pool_init(&w.pool, pipe_size, copy_buffer)
            rc = errno if w.epfd < 0 or w.wakefd < 0 or not table_init(&w.sessions, 1024) else 0
            if rc == 0:
                ep_add(w, w.wakefd, EPOLLIN, NULL, TAG_WAKE)
                rc = pthread_create(&w.thread, NULL, worker_main, w)    # returns the error
            if rc != 0:
                # Release what this worker got, so a start that fails (out of fds, say) can
                # be retried without leaking; the workers already started stop in close().
                pthread_mutex_destroy(&w.qlock)
                worker_teardown(w)
                raise OSError(rc, f"cannot start worker {i}: {strerror(rc).decode()}")
            pthread_setname_np(w.thread, f"fastfwd-w{i}".encode())   # as top -H and /proc show it
            self._n = i + 1

    def __dealloc__(self):
        self.close()
        pthread_cond_destroy(&self._ctl.cond)
        pthread_mutex_destroy(&self._ctl.lock)

    # -- commands ----------------------------------------------------------------------------
    cdef void _post(self, int op, rule_t* r, rconf_t* conf, int close_live):
        # Posted to every worker; each runs its commands in order, so a command posted
        # later sees this one applied. Freed once acknowledged (_settle).
        cdef cmd_t* cmds = <cmd_t*>calloc(self._n, sizeof(cmd_t))
        cdef int i
        if cmds == NULL:
            raise MemoryError()
        expect_acks(&self._ctl, self._n)
        for i in range(self._n):
            cmds[i].op = op
            cmds[i].rule = r
            cmds[i].conf = conf
            cmds[i].close_live = close_live
            post_command(&self._w[i], &cmds[i])
        self._unacked_cmds.append(<size_t>cmds)

    cdef void _applied(self):
        # Outside a batch, a call that changes forwarding returns once every worker applied it.
        if not self._batch_depth:
            self._settle()

    cdef void _settle(self):
        """Wait until the workers have run every command posted, then free what those
        commands replaced and close the listeners of the rules they removed."""
        cdef rule_t* r
        cdef int i
        with nogil:
            wait_acks(&self._ctl)
        for address in self._unacked_cmds:
            free(<cmd_t*><size_t>address)
        for address in self._unacked_confs:
            conf_free(<rconf_t*><size_t>address)
        for address in self._unacked_removals:
            r = <rule_t*><size_t>address
            for i in range(r.count):
                if r.listeners[i].fd >= 0:
                    close(r.listeners[i].fd)
                    r.listeners[i].fd = -1
            rule_release(r)
        self._unacked_cmds.clear()
        self._unacked_confs.clear()
        self._unacked_removals.clear()

    def batch(self):
        """A context in which rules are added, configured and pointed without waiting for
        each command's acknowledgement; leaving it waits once for all of them. Loading
        thousands of rules then costs their system calls, not a worker round trip apiece."""
        return _Batch(self)

    cdef rule_t* _rule(self, int rule_id) except NULL:
        if self._w == NULL:
            raise RuntimeError("the engine is closed")
        try:
            return <rule_t*><size_t>self._rules[rule_id]
        except KeyError:
            raise KeyError(f"no rule {rule_id}") from None

    cdef rconf_t* _copy_conf(self, rule_t* r) except NULL:
        cdef rconf_t* old = r.conf
        cdef rconf_t* new = <rconf_t*>malloc(sizeof(rconf_t))
        if new == NULL:
            raise MemoryError()
        new[0] = old[0]
        new.allow = <cidr_t*>malloc(sizeof(cidr_t) * old.nallow) if old.nallow else NULL
        new.source = <addr_t*>malloc(sizeof(addr_t) * old.nsource) if old.nsource else NULL
        if old.nallow:
            memcpy(new.allow, old.allow, sizeof(cidr_t) * old.nallow)
        if old.nsource:
            memcpy(new.source, old.source, sizeof(addr_t) * old.nsource)
        return new

    cdef void _publish(self, rule_t* r, rconf_t* conf, int close_live):
        # Every worker switches to the new configuration before the old one is freed.
        self._unacked_confs.append(<size_t>r.conf)
        r.conf = conf
        self._post(CMD_SET_CONF, r, conf, close_live)
        self._applied()

    # -- sockets -----------------------------------------------------------------------------
    cdef int _bind(self, rule_t* r, int index) except -1:
        cdef addr_t a = r.local
        cdef int family = a.sa.sa_family
        cdef int port, fd
        if self._unacked_removals:
            self._settle()      # a removed rule may still hold the port wanted
        fd = socket(family, (SOCK_STREAM if r.proto == PROTO_TCP else SOCK_DGRAM) | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if family == AF_INET:
            port = ntohs(a.v4.sin_port) + index
            a.v4.sin_port = htons(port)
        else:
            port = ntohs(a.v6.sin6_port) + index
            a.v6.sin6_port = htons(port)
        if fd < 0:
            raise OSError(errno, f"cannot open a socket for port {port}: {strerror(errno).decode()}")
        # SO_REUSEADDR only lets a TCP listener rebind past TIME_WAIT; never SO_REUSEPORT, which
        # would let a stale process share the port unnoticed.
        if r.proto == PROTO_TCP:
            set_int_opt(fd, SOL_SOCKET, SO_REUSEADDR, 1)
            set_int_opt(fd, IPPROTO_TCP, TCP_NODELAY, 1)    # accepted sockets inherit both
            # Urgent data (MSG_OOB) stays in the stream and is passed on in order; read out of
            # band it would be dropped (a telnet IAC DM would arrive as a lone IAC).
            set_int_opt(fd, SOL_SOCKET, SO_OOBINLINE, 1)
            # Peers' keepalive probes are answered by this host, never passed on: a peer that
            # vanished without a word is found only by probing each leg from here (with the
            # system's keepalive settings), else a connection without idle timeout is held for
            # ever and the other peer never told.
            set_int_opt(fd, SOL_SOCKET, SO_KEEPALIVE, 1)
        if family == AF_INET6:
            set_int_opt(fd, IPPROTO_IPV6, IPV6_V6ONLY, 1)
        if r.proto == PROTO_UDP:
            set_udp_receive(fd)
        if r.proto == PROTO_UDP and is_wildcard(&a):
            if family == AF_INET:
                set_int_opt(fd, IPPROTO_IP, IP_PKTINFO, 1)
            else:
                set_int_opt(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        if bind(fd, &a.sa, addr_len(&a)) < 0:
            err = errno
            close(fd)
            raise OSError(err, bind_error(err, "tcp" if r.proto == PROTO_TCP else "udp",
                                          format_addr(&a)[0], port))
        r.listeners[index].fd = fd
        r.listeners[index].index = index
        r.listeners[index].rule = r
        r.listeners[index].wildcard = r.proto == PROTO_UDP and is_wildcard(&a)
        return 0

    def add_rule(self, str proto, str listen_host, int listen_port, int count):
        """Bind ``count`` sockets (not yet accepting). Returns (rule id, first real port)."""
        cdef rule_t* r
        cdef addr_t local
        cdef socklen_t alen = sizeof(addr_t)
        cdef int i, bound = 0
        if self._w == NULL:
            raise RuntimeError("the engine is closed")
        if proto not in ("tcp", "udp"):
            raise ValueError(f"proto must be 'tcp' or 'udp', not {proto!r}")
        if count < 1 or listen_port < 0 or listen_port + count - 1 > 65535 or (listen_port == 0 and count != 1):
            raise ValueError(f"bad port range {listen_port}+{count}")
        parse_addr(listen_host, listen_port, &local)
        r = <rule_t*>calloc(1, sizeof(rule_t))
        if r == NULL:
            raise MemoryError()
        r.listeners = <listener_t*>calloc(count, sizeof(listener_t))
        r.per_worker = <rule_worker_t*>calloc(self._n, sizeof(rule_worker_t))
        conf = <rconf_t*>calloc(1, sizeof(rconf_t))
        if r.listeners == NULL or r.per_worker == NULL or conf == NULL:
            free(r.listeners)
            free(r.per_worker)
            free(conf)
            free(r)
            raise MemoryError()
        r.id = self._next_id
        r.proto = PROTO_TCP if proto == "tcp" else PROTO_UDP
        r.count = count
        r.local = local
        r.udp_owner = r.id % self._n
        r.conf = conf
        try:
            for i in range(count):
                self._bind(r, i)
                bound += 1
        except BaseException:
            for i in range(bound):
                close(r.listeners[i].fd)
            free(r.listeners)
            free(r.per_worker)
            free(conf)
            free(r)
            raise
        if listen_port == 0:
            getsockname(r.listeners[0].fd, &local.sa, &alen)
            r.local = local
            listen_port = format_addr(&local)[1]
        self._next_id += 1
        r.refs = 1 + self._n            # the control plane and each worker
        self._rules[r.id] = <size_t>r
        self._post(CMD_ADD_RULE, r, conf, 0)
        self._applied()
        return r.id, listen_port

    def configure(self, int rule_id, *, double connect_timeout, double idle_timeout,
                  double half_closed_timeout, int splice, unsigned long long splice_threshold,
                  double udp_idle_timeout, int udp_max_sessions, int max_connections,
                  tuple allow, tuple source):
        cdef rule_t* r = self._rule(rule_id)
        cdef rconf_t* conf
        cdef int i
        nets = [ipaddress.ip_network(c, strict=False) for c in allow]
        srcs = [str(ipaddress.ip_address(s)) for s in source]
        conf = self._copy_conf(r)
        free(conf.allow)
        free(conf.source)
        conf.allow = <cidr_t*>calloc(len(nets) or 1, sizeof(cidr_t))
        conf.source = <addr_t*>calloc(len(srcs) or 1, sizeof(addr_t))
        conf.nallow = len(nets)
        conf.nsource = len(srcs)
        for i, net in enumerate(nets):
            conf.allow[i].family = AF_INET if net.version == 4 else AF_INET6
            conf.allow[i].prefix = net.prefixlen
            packed = net.network_address.packed
            memcpy(conf.allow[i].addr, <const char*>packed, len(packed))
        for i, addr in enumerate(srcs):
            parse_addr(addr, 0, &conf.source[i])
        conf.connect_ms = <uint64_t>(connect_timeout * 1000)
        conf.idle_ms = <uint64_t>(idle_timeout * 1000)
        conf.half_ms = <uint64_t>(half_closed_timeout * 1000)
        conf.udp_idle_ms = <uint64_t>(udp_idle_timeout * 1000)
        conf.splice_mode = splice
        conf.splice_threshold = splice_threshold
        conf.udp_max_sessions = udp_max_sessions
        conf.max_connections = max_connections
        self._publish(r, conf, 0)

    def set_target(self, int rule_id, host, int port, bint close_live):
        """Point the rule at host:port (port + i for listener i); ``None`` makes it pending:
        a TCP rule stops listening (clients are refused), a UDP rule drops datagrams."""
        cdef rule_t* r = self._rule(rule_id)
        cdef rconf_t* conf
        cdef addr_t target
        cdef int i
        if host is None:
            memset(&target, 0, sizeof(addr_t))
        else:
            parse_addr(host, port, &target)
        conf = self._copy_conf(r)
        conf.target = target
        if r.proto == PROTO_TCP and host is None and r.listening:
            self._post(CMD_LISTEN_OFF, r, NULL, 0)
            self._settle()      # no worker may poll the listener closed next
            r.listening = 0
            self._hold_ports(r)
        self._publish(r, conf, close_live)
        if r.proto == PROTO_TCP and host is not None and not r.listening:
            first = format_addr(&r.local)
            try:
                for i in range(r.count):
                    if r.listeners[i].fd < 0:
                        self._bind(r, i)
                    if listen(r.listeners[i].fd, SOMAXCONN) < 0:
                        err = errno
                        raise OSError(err, bind_error(err, "tcp", first[0], first[1] + i))
            except OSError:
                # The ports that did listen would queue clients no worker accepts: a rule
                # that cannot listen on all its ports refuses on all of them.
                self._hold_ports(r)
                raise
            self._post(CMD_LISTEN_ON, r, NULL, 0)
            self._applied()
            r.listening = 1

    cdef int _hold_ports(self, rule_t* r) except -1:
        """Close a TCP rule's listeners (no worker polls them) and bind fresh sockets that
        hold its ports without listening: a closed listener frees the port."""
        cdef int i
        for i in range(r.count):
            if r.listeners[i].fd >= 0:
                close(r.listeners[i].fd)
                r.listeners[i].fd = -1
            try:
                self._bind(r, i)
            except OSError:
                pass            # taken meanwhile: reported when the rule becomes active
        return 0

    def remove_rule(self, int rule_id, bint close_live):
        cdef rule_t* r = self._rule(rule_id)
        r.removed = 1
        if r.proto == PROTO_TCP and r.listening:
            self._post(CMD_LISTEN_OFF, r, NULL, 0)
            r.listening = 0
        del self._rules[rule_id]
        self._post(CMD_REMOVE_RULE, r, NULL, close_live)
        self._unacked_removals.append(<size_t>r)    # its listeners close once workers let go
        self._applied()

    # -- observation -------------------------------------------------------------------------
    def counters(self, int rule_id):
        cdef rule_t* r = self._rule(rule_id)
        cdef counters_t total
        cdef uint64_t* sums = <uint64_t*>&total
        cdef uint64_t* block
        cdef int i, k
        memset(&total, 0, sizeof(counters_t))
        for i in range(self._n):
            block = <uint64_t*>&r.per_worker[i].c
            # Last field first: each close (closed, sessions_closed) is read before the open it
            # follows, so a connection opened and closed meanwhile never makes `active` < 0.
            for k in range(<int>(sizeof(counters_t) // sizeof(uint64_t)) - 1, -1, -1):
                sums[k] += ff_load_u64(&block[k])
        out = {name: sums[k] for k, name in enumerate(_COUNTERS)}
        # What is open now, rather than the closes it is derived from.
        out["active"] = out["accepted"] - out.pop("closed")
        out["sessions_active"] = out["sessions_created"] - out.pop("sessions_closed")
        return out

    def sessions(self, int rule_id):
        """Client addresses of the rule's UDP sessions, least recently active first."""
        cdef rule_t* r = self._rule(rule_id)
        cdef cmd_t cmd
        cdef int cap = 65536
        cdef int i
        if r.proto != PROTO_UDP:
            return []
        memset(&cmd, 0, sizeof(cmd_t))
        cmd.op = CMD_SESSIONS
        cmd.rule = r
        cmd.out_cap = cap
        cmd.out = <addr_t*>malloc(sizeof(addr_t) * cap)
        if cmd.out == NULL:
            raise MemoryError()
        expect_acks(&self._ctl, 1)
        post_command(&self._w[r.udp_owner], &cmd)
        self._settle()
        try:
            return [format_addr(&cmd.out[i]) for i in range(cmd.out_len)]
        finally:
            free(cmd.out)

    def sync(self):
        """Return once every worker has finished the events it was handling: counters read
        after this include every send that had returned when it was called."""
        if self._w == NULL:
            raise RuntimeError("the engine is closed")
        self._post(CMD_SYNC, NULL, NULL, 0)
        self._settle()

    def live_connections(self):
        """Open TCP connections over all rules, removed ones included (for draining)."""
        cdef int i
        cdef int total = 0
        for i in range(self._n):
            total += ff_load_int(&self._w[i].live)
        return total

    def resources(self):
        """What the workers hold now, summed: connections and UDP sessions allocated (closed
        ones until the end of their loop turn), pipes and copy buffers lent to connections or
        kept spare in the pools, and rules tracked (one entry per worker). For leak checks."""
        cdef worker_t* w
        cdef int i
        out = dict.fromkeys(("connections", "sessions", "pipes_lent", "pipes_spare",
                             "buffers_lent", "buffers_spare", "rules"), 0)
        for i in range(self._n):
            w = &self._w[i]
            out["connections"] += ff_load_int(&w.conns_held)
            out["sessions"] += ff_load_int(&w.sessions_held)
            out["pipes_lent"] += ff_load_int(&w.pool.pipes_lent)
            out["pipes_spare"] += ff_load_int(&w.pool.npipes)
            out["buffers_lent"] += ff_load_int(&w.pool.bufs_lent)
            out["buffers_spare"] += ff_load_int(&w.pool.nbufs)
            out["rules"] += ff_load_int(&w.nrules)
        return out

    def close(self):
        """Stop the workers, close every listener and reset every live connection. Idempotent."""
        cdef int i
        cdef rule_t* r
        if self._w == NULL:
            return
        if self._n:
            self._post(CMD_STOP, NULL, NULL, 0)
            self._settle()
            with nogil:
                for i in range(self._n):
                    pthread_join(self._w[i].thread, NULL)
                    pthread_mutex_destroy(&self._w[i].qlock)
        for address in self._rules.values():
            r = <rule_t*><size_t>address
            for i in range(r.count):
                if r.listeners[i].fd >= 0:
                    close(r.listeners[i].fd)
            rule_release(r)
        self._rules.clear()
        free(self._w)
        self._w = NULL
        self._n = 0


cdef class _Batch:
    cdef Engine engine

    def __cinit__(self, Engine engine):
        self.engine = engine

    def __enter__(self):
        self.engine._batch_depth += 1
        return self.engine

    def __exit__(self, *exc):
        self.engine._batch_depth -= 1
        if self.engine._batch_depth == 0 and self.engine._w != NULL:
            self.engine._settle()
        return False
