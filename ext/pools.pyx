from libc.stdlib cimport malloc, free


cdef void pool_init(pool_t* p, int pipe_size, int buf_size) noexcept nogil:
    p.pipes = NULL
    p.npipes = 0
    p.pipe_size = pipe_size
    p.bufs = NULL
    p.nbufs = 0
    p.buf_size = buf_size
    p.max_free = 64
    p.pipes_lent = 0
    p.bufs_lent = 0


cdef void pool_clear(pool_t* p) noexcept nogil:
    cdef pipe_t* pp
    cdef void* b
    while p.pipes != NULL:
        pp = p.pipes
        p.pipes = pp.next
        pipe_discard(pp)
    while p.bufs != NULL:
        b = p.bufs
        p.bufs = (<void**>b)[0]
        free(b)
    p.npipes = 0
    p.nbufs = 0


cdef pipe_t* pipe_take(pool_t* p) noexcept nogil:
    cdef pipe_t* pp = p.pipes
    cdef int fds[2]
    cdef int granted
    if pp != NULL:
        p.pipes = pp.next
        p.npipes -= 1
        p.pipes_lent += 1
        return pp
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        return NULL
    pp = <pipe_t*>malloc(sizeof(pipe_t))
    if pp == NULL:
        close(fds[0])
        close(fds[1])
        return NULL
    pp.r = fds[0]
    pp.w = fds[1]
    # Large pipes move more per splice call; take whatever the kernel grants.
    granted = fcntl(fds[1], F_SETPIPE_SZ, p.pipe_size)
    if granted < 0:
        granted = fcntl(fds[1], F_GETPIPE_SZ)
    pp.size = granted if granted > 0 else 65536
    p.pipes_lent += 1
    return pp


cdef void pipe_give(pool_t* p, pipe_t* pp) noexcept nogil:
    p.pipes_lent -= 1
    if p.npipes >= p.max_free:
        pipe_discard(pp)
        return
    pp.next = p.pipes
    p.pipes = pp
    p.npipes += 1


cdef void pipe_drop(pool_t* p, pipe_t* pp) noexcept nogil:
    # A lent pipe that still holds bytes nobody will read: not fit for reuse.
    p.pipes_lent -= 1
    pipe_discard(pp)


cdef void pipe_discard(pipe_t* pp) noexcept nogil:
    close(pp.r)
    close(pp.w)
    free(pp)


cdef char* buf_take(pool_t* p) noexcept nogil:
    cdef void* b = p.bufs
    if b != NULL:
        p.bufs = (<void**>b)[0]
        p.nbufs -= 1
    else:
        b = malloc(p.buf_size)
    if b != NULL:
        p.bufs_lent += 1
    return <char*>b


cdef void buf_give(pool_t* p, char* buf) noexcept nogil:
    p.bufs_lent -= 1
    if p.nbufs >= p.max_free:
        free(buf)
        return
    (<void**>buf)[0] = p.bufs
    p.bufs = buf
    p.nbufs += 1
