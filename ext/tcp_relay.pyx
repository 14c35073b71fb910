# TCP relay: accept, connect to the target, move bytes both ways with half-close, propagate
# resets, enforce the connect / idle / half-closed timeouts.
from libc.stdlib cimport calloc, free

cdef enum:
    ACCEPT_BATCH = 64               # accepts per wake-up per listener, then let others run
    PUMP_BUDGET = 4 * 1024 * 1024   # bytes per direction per turn, for fairness
    PAUSE_MS = 250                  # how long a listener rests after running out of fds

# EPOLLPRI: urgent data arrived (see half_t.urgent).
cdef int CONN_EVENTS = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI | EPOLLET


cdef inline void count_bytes(rule_worker_t* rw, int d, uint64_t n) noexcept nogil:
    if d == 0:
        rw.c.bytes_up += n
    else:
        rw.c.bytes_down += n


cdef inline int wrote(conn_t* c, int d, ssize_t n, size_t* budget, rule_worker_t* rw,
                      uint64_t* by_strategy) noexcept nogil:
    """Account a write of ``n`` bytes of direction ``d`` by either copy strategy (n < 0: the
    write failed, errno says why). Returns what the strategy does next."""
    if n < 0:
        if errno == EAGAIN:
            c.wr[1 - d] = 0
            return MOVE_BLOCKED
        if errno == EINTR:
            return MOVE_ON
        if errno == ENOMEM or errno == ENOBUFS:
            return MOVE_RESET
        # The destination leg is gone: its peer reset (EPIPE, ECONNRESET), or it timed out or
        # was aborted. Blamed on the source leg, the dead one would be flushed, and its send
        # queue never empties.
        return MOVE_LOST
    c.half[d].moved += <uint64_t>n
    count_bytes(rw, d, <uint64_t>n)
    by_strategy[0] += <uint64_t>n
    if budget[0] <= <size_t>n:
        budget[0] = 0
        return MOVE_MORE
    budget[0] -= <size_t>n
    return MOVE_ON


cdef void reset_close(int fd) noexcept nogil:
    # SO_LINGER 0 turns close() into a RST, so the peer learns the other leg failed.
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(linger))
    close(fd)


cdef void tcp_accept(worker_t* w, listener_t* l) noexcept nogil:
    cdef rule_t* r = <rule_t*>l.rule
    cdef rule_worker_t* rw = &r.per_worker[w.id]
    cdef addr_t peer
    cdef socklen_t plen
    cdef int fd, i
    for i in range(ACCEPT_BATCH):
        plen = sizeof(addr_t)
        fd = accept4(l.fd, &peer.sa, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd < 0:
            if errno == EINTR:
                continue
            if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                out_of_fds(w, l)
            return
        if rw.conf.target.sa.sa_family == AF_UNSPEC or not rule_allows(rw.conf, &peer) or not take_place(
                r, rw.conf.max_connections):
            rw.c.refused += 1
            reset_close(fd)
            continue
        if not conn_start(w, l, fd):
            return


cdef bint take_place(rule_t* r, int cap) noexcept nogil:
    # Add first, then compare: workers accepting at the same instant cannot all take the last place.
    if ff_add_int(&r.active_conns, 1) <= cap or not cap:
        return True
    ff_add_int(&r.active_conns, -1)
    return False


cdef void out_of_fds(worker_t* w, listener_t* l) noexcept nogil:
    # Refuse the clients already queued (the reserve fd makes one accept possible), then rest
    # the listener for a while instead of spinning on EMFILE; the sweep puts it back.
    cdef rule_worker_t* rw = &(<rule_t*>l.rule).per_worker[w.id]
    cdef int fd, i
    for i in range(ACCEPT_BATCH):
        if w.reserve_fd < 0:
            break
        close(w.reserve_fd)
        w.reserve_fd = -1
        fd = accept4(l.fd, NULL, NULL, SOCK_CLOEXEC)
        if fd >= 0:
            reset_close(fd)
            rw.c.refused += 1
        reserve_refill(w)
        if fd < 0:
            break
    rw.c.accept_paused += 1
    pause_listener(w, l, w.now + PAUSE_MS)


cdef bint conn_start(worker_t* w, listener_t* l, int cfd) noexcept nogil:
    """Open the target leg for an accepted client, whose place in active_conns is taken.
    False when out of fds or memory."""
    cdef rule_t* r = <rule_t*>l.rule
    cdef rule_worker_t* rw = &r.per_worker[w.id]
    cdef rconf_t* conf = rw.conf
    cdef addr_t target
    cdef socklen_t tlen
    cdef conn_t* c
    cdef int tfd, rc
    rule_target(conf, l.index, &target, &tlen)
    tfd = socket(target.sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    c = <conn_t*>calloc(1, sizeof(conn_t)) if tfd >= 0 else NULL
    if c == NULL:
        ff_add_int(&r.active_conns, -1)
        rw.c.refused += 1
        reset_close(cfd)
        if tfd >= 0:
            close(tfd)
        else:
            rw.c.accept_paused += 1
            pause_listener(w, l, w.now + PAUSE_MS)
        return False
    w.conns_held += 1
    set_int_opt(tfd, IPPROTO_TCP, TCP_NODELAY, 1)      # the client leg has all three from the listener
    set_int_opt(tfd, SOL_SOCKET, SO_OOBINLINE, 1)
    set_int_opt(tfd, SOL_SOCKET, SO_KEEPALIVE, 1)
    bind_source(rw, tfd, target.sa.sa_family)
    c.rule = r
    c.fd[0] = cfd
    c.fd[1] = tfd
    c.last_active = w.now
    c.forks = w.forks
    c.half[0].splicing = c.half[1].splicing = conf.splice_mode == SPLICE_ALWAYS
    rw.c.accepted += 1
    rw.nconns += 1
    w.live += 1
    rc = connect(tfd, &target.sa, tlen)
    if rc < 0 and errno != EINPROGRESS:
        c.state = CONN_CONNECTING
        dlist_append(&rw.connecting, &c.node)
        conn_close(w, c, True)
        rw.c.connect_failed += 1
        return True
    ep_add(w, cfd, CONN_EVENTS, c, TAG_CLIENT)
    ep_add(w, tfd, CONN_EVENTS, c, TAG_TARGET)
    if rc == 0:
        c.state = CONN_OPEN
        dlist_append(&rw.open, &c.node)
    else:
        c.state = CONN_CONNECTING
        dlist_append(&rw.connecting, &c.node)
    return True


cdef void conn_event(worker_t* w, conn_t* c, int side, uint32_t events) noexcept nogil:
    cdef rule_worker_t* rw
    cdef int err = 0
    cdef socklen_t elen = sizeof(int)
    if c.state == CONN_CLOSED:
        return
    if events & (EPOLLIN | EPOLLPRI | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        c.rd[side] = 1
    if events & EPOLLPRI:
        c.half[side].urgent = 1
    if events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        c.hup[side] = 1
    if events & (EPOLLOUT | EPOLLHUP | EPOLLERR):
        c.wr[side] = 1
    rw = &c.rule.per_worker[w.id]
    if c.state == CONN_FLUSHING:
        # The peer still being sent to reset too: nothing left to wait for. (An event of the
        # leg already reset may still be in this batch.)
        if events & EPOLLERR and c.fd[side] >= 0:
            conn_close(w, c, True)
        return
    if events & EPOLLERR and c.half[side].done:
        # A reset on a leg already read to its FIN: no read will report it, and a write there
        # may never come (the other peer is idle), so pass it on now.
        conn_reset(w, c, side)
        return
    if c.state == CONN_CONNECTING:
        if side == 0:
            if events & EPOLLERR and unread(c.fd[0]) == 0:
                # The client reset before the target answered, having sent nothing (it gave up
                # on a slow target): its place and fds are freed now, not at the connect
                # timeout. Bytes it did send still go to the target first, then the reset.
                conn_close(w, c, True)
            return
        if not c.wr[1]:
            return
        # Writable without an error means connected; only a failure needs SO_ERROR's reason.
        if events & (EPOLLERR | EPOLLHUP):
            getsockopt(c.fd[1], SOL_SOCKET, SO_ERROR, &err, &elen)
        if err == ECONNRESET or err == EPIPE:
            # It connected, then reset before this was seen (a refusal says ECONNREFUSED): what
            # it sent goes to the client, then the reset, as after a write found it gone.
            c.half[0].done = DONE_LOST
            c.rd[1] = c.hup[1] = 1
        elif err != 0 or events & EPOLLHUP:
            rw.c.connect_failed += 1
            conn_close(w, c, True)
            return
        c.state = CONN_OPEN
        c.last_active = w.now
        dlist_move_to_end(&rw.open, &c.node)
    if events & EPOLLERR and c.state == CONN_OPEN and rw.conf.half_ms:
        # This leg's peer is gone (reset, timed out), but the reset is read only after what it
        # sent before, which may wait in a buffer or pipe for a peer that does not take it:
        # that wait is bounded like a reset's flush, not by the idle timeout.
        conn_half(w, c, rw)
    else:
        conn_touch(w, c, rw)
    conn_pump(w, c)


cdef inline void conn_touch(worker_t* w, conn_t* c, rule_worker_t* rw) noexcept nogil:
    if c.last_active != w.now:
        c.last_active = w.now
        dlist_move_to_end(&rw.half if c.state == CONN_HALF else &rw.open, &c.node)


cdef inline void conn_half(worker_t* w, conn_t* c, rule_worker_t* rw) noexcept nogil:
    # Under the half-closed timeout from now on.
    c.state = CONN_HALF
    c.last_active = w.now
    dlist_move_to_end(&rw.half, &c.node)


cdef void conn_pump(worker_t* w, conn_t* c) noexcept nogil:
    cdef rule_worker_t* rw = &c.rule.per_worker[w.id]
    cdef half_t* h
    cdef int d, rc
    cdef bint more = False
    cdef size_t budget
    for d in range(2):
        h = &c.half[d]
        if h.done:
            continue
        budget = PUMP_BUDGET
        while True:
            rc = splice_move(w, c, d, &budget) if h.splicing else copy_move(w, c, d, &budget)
            if rc != MOVE_SWITCH:
                break
        if rc == MOVE_RESET:
            conn_reset(w, c, d)
            return
        if rc == MOVE_LOST:
            # The peer this direction writes to reset, but what it sent before may still be
            # unread: the other direction passes that on (to its EOF: the failed write took
            # the error), then both legs are reset. Its readiness edge may be long gone.
            h.done = DONE_LOST
            c.rd[1 - d] = c.hup[1 - d] = 1
            more = True
        elif rc == MOVE_MORE:
            more = True
        elif h.eof and h.pipe_bytes == 0 and h.off == h.len:
            # Everything read from this side has been written: pass the FIN on. When the other
            # direction is done too, the close() just below sends that FIN: one syscall less
            # per connection. Not if a child forked since holds a copy of the socket.
            if not c.half[1 - d].done or forked_since(c.forks):
                shutdown(c.fd[1 - d], SHUT_WR)
            h.done = DONE_FIN
    if c.half[0].done and c.half[1].done:
        if c.half[0].done == DONE_LOST or c.half[1].done == DONE_LOST:
            conn_reset(w, c, 1 if c.half[0].done == DONE_LOST else 0)
        else:
            conn_close(w, c, False)
        return
    if (c.half[0].done or c.half[1].done) and c.state == CONN_OPEN:
        conn_half(w, c, rw)
    if more and not c.in_ready:
        c.in_ready = 1
        c.next = w.ready
        w.ready = c


cdef int unacked(int fd) noexcept nogil:
    cdef int n = 0
    return n if ioctl(fd, SIOCOUTQ, &n) == 0 else 0


cdef int unread(int fd) noexcept nogil:
    cdef int n = 0
    return n if ioctl(fd, SIOCINQ, &n) == 0 else 0


cdef void discard_leg(conn_t* c, int d, rule_worker_t* rw) noexcept nogil:
    """Reset leg ``d``, counting the bytes that loses which a peer counts as delivered: unread
    in the leg's receive queue, or written towards its peer and not yet acknowledged."""
    cdef int queued
    rw.c.bytes_discarded += <uint64_t>unread(c.fd[d])
    if d == 0 or c.state != CONN_CONNECTING:    # a target that never answered has only a SYN
        queued = unacked(c.fd[d])
        if queued > 0 and c.half[1 - d].done == DONE_FIN:
            queued -= 1                         # a FIN not yet acknowledged counts one too
        rw.c.bytes_discarded += <uint64_t>queued
    reset_close(c.fd[d])
    c.fd[d] = -1


cdef void conn_reset(worker_t* w, conn_t* c, int dead) noexcept nogil:
    """Pass on the reset of leg ``dead``'s peer (or the failure of that direction). A RST
    discards the other leg's send queue: bytes the forwarder took, so the resetting peer counts
    them as delivered, would never reach the other peer. The reset waits for them instead
    (checked by the sweep; the half-closed timeout gives up on a peer that does not read)."""
    cdef rule_worker_t* rw = &c.rule.per_worker[w.id]
    if unacked(c.fd[1 - dead]) == 0:
        conn_close(w, c, True)
        return
    ep_forget(w, c.fd[dead], c.forks)
    discard_leg(c, dead, rw)
    c.state = CONN_FLUSHING
    c.last_active = w.now
    dlist_move_to_end(&rw.flushing, &c.node)


cdef void conn_close(worker_t* w, conn_t* c, bint reset) noexcept nogil:
    cdef rule_t* r = c.rule
    cdef rule_worker_t* rw = &r.per_worker[w.id]
    cdef int d
    cdef half_t* h
    if c.state == CONN_CLOSED:
        return
    for d in range(2):
        if c.fd[d] >= 0:    # (not the reset leg of a flushing connection)
            ep_forget(w, c.fd[d], c.forks)
            if reset:
                discard_leg(c, d, rw)
            else:
                close(c.fd[d])
                c.fd[d] = -1
        h = &c.half[d]
        # Taken from one peer and never written to the other: lost as well.
        rw.c.bytes_discarded += h.pipe_bytes + (h.len - h.off if h.buf != NULL else 0)
        if h.pipe != NULL:
            if h.pipe_bytes:
                pipe_drop(&w.pool, h.pipe)
            else:
                pipe_give(&w.pool, h.pipe)
            h.pipe = NULL
        if h.buf != NULL:
            buf_give(&w.pool, h.buf)
            h.buf = NULL
    dlist_unlink(&c.node)
    c.state = CONN_CLOSED
    rw.nconns -= 1
    rw.c.closed += 1
    ff_add_int(&r.active_conns, -1)
    w.live -= 1
    if not c.in_ready:
        c.next = w.dead
        w.dead = c


cdef void tcp_run_ready(worker_t* w) noexcept nogil:
    # Connections that spent their budget go again, after everyone else had a turn.
    cdef conn_t* c = w.ready
    cdef conn_t* nxt
    w.ready = NULL
    while c != NULL:
        nxt = c.next
        c.in_ready = 0
        if c.state == CONN_CLOSED:
            c.next = w.dead
            w.dead = c
        elif c.state != CONN_FLUSHING:
            conn_pump(w, c)
        c = nxt


cdef void tcp_free_dead(worker_t* w) noexcept nogil:
    cdef conn_t* c = w.dead
    cdef conn_t* nxt
    w.dead = NULL
    while c != NULL:
        nxt = c.next
        free(c)
        w.conns_held -= 1
        c = nxt


cdef void close_list(worker_t* w, dlist_t* l, bint reset) noexcept nogil:
    cdef dnode_t* n = dlist_first(l)
    while n != NULL:
        conn_close(w, <conn_t*>n, reset)
        n = dlist_first(l)


cdef void tcp_close_all(worker_t* w, rule_worker_t* rw, bint reset) noexcept nogil:
    close_list(w, &rw.connecting, reset)
    close_list(w, &rw.open, reset)
    close_list(w, &rw.half, reset)
    close_list(w, &rw.flushing, True)      # passing a reset on: never a FIN


cdef void expire_list(worker_t* w, dlist_t* l, uint64_t timeout, uint64_t* failed) noexcept nogil:
    cdef dnode_t* n = dlist_first(l)
    while n != NULL and expired((<conn_t*>n).last_active, timeout, w.now):
        if failed != NULL:
            failed[0] += 1
        conn_close(w, <conn_t*>n, True)
        n = dlist_first(l)


cdef void tcp_sweep(worker_t* w, rule_worker_t* rw) noexcept nogil:
    expire_list(w, &rw.connecting, rw.conf.connect_ms, &rw.c.connect_failed)
    expire_list(w, &rw.open, rw.conf.idle_ms, NULL)
    expire_list(w, &rw.half, rw.conf.half_ms, NULL)
    flush_resets(w, rw)


cdef void flush_resets(worker_t* w, rule_worker_t* rw) noexcept nogil:
    # Few and short-lived: each is looked at, not just the oldest. Half-closed connections
    # kept for ever (0) do not keep a reset from a peer that never reads for ever: the idle
    # timeout bounds the wait then.
    cdef dnode_t* n = dlist_first(&rw.flushing)
    cdef dnode_t* nxt
    cdef conn_t* c
    cdef int live
    cdef uint64_t limit = rw.conf.half_ms if rw.conf.half_ms else rw.conf.idle_ms
    while n != NULL:
        nxt = n.next if n.next != &rw.flushing.head else NULL
        c = <conn_t*>n
        live = c.fd[0] if c.fd[0] >= 0 else c.fd[1]
        if unacked(live) == 0 or expired(c.last_active, limit, w.now):
            conn_close(w, c, True)
        n = nxt
