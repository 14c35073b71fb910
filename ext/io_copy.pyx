# Buffered copy: recv into a pooled buffer, send it on. Cheaper than splice for short
# exchanges; a direction in "auto" mode is promoted to splice once it has moved enough.

cdef inline uint64_t splice_from(rconf_t* conf, half_t* h) noexcept nogil:
    """How many bytes a direction copies before it splices (UINT64_MAX: it never does)."""
    if conf.splice_mode == SPLICE_NEVER:
        return UINT64_MAX
    if conf.splice_mode == SPLICE_AUTO:
        return max(conf.splice_threshold, h.copy_until)
    return h.copy_until


cdef int copy_move(worker_t* w, conn_t* c, int d, size_t* budget) noexcept nogil:
    cdef half_t* h = &c.half[d]
    cdef int src = c.fd[d]
    cdef int dst = c.fd[1 - d]
    cdef rule_worker_t* rw = &c.rule.per_worker[w.id]
    cdef ssize_t n
    cdef int rc
    cdef size_t want
    cdef uint64_t switch_at
    while True:
        if h.off < h.len:
            if not c.wr[1 - d]:
                return MOVE_BLOCKED
            n = send(dst, h.buf + h.off, h.len - h.off, MSG_NOSIGNAL | MSG_DONTWAIT)
            if n > 0:
                h.off += <uint32_t>n
            rc = wrote(c, d, n, budget, rw, &rw.c.bytes_copied)
            if rc != MOVE_ON:
                return rc
            continue
        if h.buf != NULL:
            buf_give(&w.pool, h.buf)
            h.buf = NULL
            h.off = h.len = 0
        if h.eof or not c.rd[d]:
            return MOVE_BLOCKED
        switch_at = splice_from(rw.conf, h)
        if h.moved >= switch_at and not h.urgent:
            h.splicing = 1
            return MOVE_SWITCH
        h.buf = buf_take(&w.pool)
        if h.buf == NULL:
            return MOVE_RESET
        # Copy exactly up to the switch, so the promotion point is the same for all.
        want = w.pool.buf_size
        if h.moved < switch_at:
            want = <size_t>min(<uint64_t>want, switch_at - h.moved)
        n = recv(src, h.buf, want, MSG_DONTWAIT)
        if n > 0:
            h.off = 0
            h.len = <uint32_t>n
            # A short read emptied the socket: skip the read that would only say EAGAIN.
            # Anything arriving later raises a new edge; a FIN already queued does not, so
            # keep reading to EOF once the peer's hang-up was reported. Nor does what waits
            # behind an urgent mark, where a read stops short: read on past it too.
            if <size_t>n < want and not c.hup[d] and not h.urgent:
                c.rd[d] = 0
            continue
        if n == 0:
            h.eof = 1
        elif errno == EAGAIN:
            c.rd[d] = 0
            h.urgent = 0        # everything read: the mark is behind
        elif errno != EINTR:
            return MOVE_RESET
