# Zero copy: socket -> pipe -> socket with splice(2). The pipe is borrowed from the worker's
# pool for as long as it holds data. EINVAL/ENOSYS (no splice for this pair) falls back to copy
# for good; no pipe to be had (out of fds) falls back for a while, then splice is tried again;
# a rule switched to "never" copies once the pipe is empty.

cdef int splice_move(worker_t* w, conn_t* c, int d, size_t* budget) noexcept nogil:
    cdef half_t* h = &c.half[d]
    cdef int src = c.fd[d]
    cdef int dst = c.fd[1 - d]
    cdef rule_worker_t* rw = &c.rule.per_worker[w.id]
    cdef ssize_t n
    cdef int rc
    while True:
        if h.pipe_bytes > 0:
            if not c.wr[1 - d]:
                return MOVE_BLOCKED
            n = splice(h.pipe.r, NULL, dst, NULL, h.pipe_bytes, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n > 0:
                h.pipe_bytes -= <uint32_t>n
            rc = wrote(c, d, n, budget, rw, &rw.c.bytes_spliced)
            if rc != MOVE_ON:
                return rc
            continue
        if h.pipe != NULL:
            pipe_give(&w.pool, h.pipe)
            h.pipe = NULL
        if h.eof or not c.rd[d]:
            return MOVE_BLOCKED
        if rw.conf.splice_mode == SPLICE_NEVER or h.urgent:
            # Turned off by a reload, or an urgent mark splice would stop at for good: copy from
            # here. The pipe is empty, so no byte is overtaken; copy_until stays, so a later
            # "auto" or "always" (or the copy, once past the mark) splices again.
            h.splicing = 0
            return MOVE_SWITCH
        h.pipe = pipe_take(&w.pool)
        if h.pipe == NULL:
            rw.c.pipe_shortages += 1
            return _copy_until(h, h.moved + PIPE_RETRY_BYTES)
        # The pipe is empty here, so its size bounds the length: no overflow, no short pipe.
        n = splice(src, NULL, h.pipe.w, NULL, <size_t>h.pipe.size, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        if n > 0:
            h.pipe_bytes = <uint32_t>n
            continue
        if n == 0:
            # The end, or an urgent mark the last event did not report (it came since): splice
            # stops at a mark and says 0 there once a FIN is queued behind it. The copy tells
            # them apart, reading on past a mark to what follows or to the real end.
            h.urgent = 1
        elif errno == EAGAIN:
            c.rd[d] = 0
        elif errno == EINVAL or errno == ENOSYS:
            pipe_give(&w.pool, h.pipe)
            h.pipe = NULL
            rw.c.splice_fallbacks += 1
            return _copy_until(h, UINT64_MAX)
        elif errno != EINTR:
            return MOVE_RESET


cdef inline int _copy_until(half_t* h, uint64_t moved) noexcept nogil:
    # Set before switching, or "auto" and "always" would promote the copy straight back.
    h.copy_until = moved
    h.splicing = 0
    return MOVE_SWITCH
