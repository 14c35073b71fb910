# The worker loop: one thread, one epoll set, no GIL. It runs commands from the control
# plane between batches of events and sweeps timeouts a few times a second.
from libc.stdlib cimport realloc, free

cdef enum:
    MAX_EVENTS = 256
    SWEEP_MS = 100              # timeout resolution; also how soon a paused listener is retried

cdef int LISTENER_EVENTS = EPOLLIN | EPOLLEXCLUSIVE   # one worker woken per new connection


cdef void ep_add(worker_t* w, int fd, uint32_t events, void* obj, int tag) noexcept nogil:
    cdef epoll_event ev
    ev.events = events
    ev.data.u64 = <uint64_t><size_t>obj | <uint64_t>tag
    epoll_ctl(w.epfd, EPOLL_CTL_ADD, fd, &ev)


cdef void ep_del(worker_t* w, int fd) noexcept nogil:
    cdef epoll_event ev
    epoll_ctl(w.epfd, EPOLL_CTL_DEL, fd, &ev)


cdef inline bint forked_since(int forks) noexcept nogil:
    return forks != ff_load_int(&ff_forks)


cdef inline void ep_forget(worker_t* w, int fd, int forks) noexcept nogil:
    # close() takes an fd out of the epoll set only with its last copy. A child forked since
    # it opened (multiprocessing, say) holds one: the item would stay, its events naming a freed
    # connection or session. A load, and a system call only after a fork.
    if forked_since(forks):
        ep_del(w, fd)


cdef bint grow(void** array, int* cap, int need, size_t item) noexcept nogil:
    cdef void* bigger
    cdef int size
    if need <= cap[0]:
        return True
    size = cap[0] * 2 if cap[0] else 16
    bigger = realloc(array[0], size * item)
    if bigger == NULL:
        return False
    array[0] = bigger
    cap[0] = size
    return True


# -- listeners -------------------------------------------------------------------------------

cdef void pause_listener(worker_t* w, listener_t* l, uint64_t until) noexcept nogil:
    if not grow(<void**>&w.paused, &w.cap_paused, w.npaused + 1, sizeof(paused_t)):
        return      # keep polling it: no memory to remember it by
    ep_del(w, l.fd)
    w.paused[w.npaused].listener = l
    w.paused[w.npaused].until = until
    w.npaused += 1


cdef void resume_listeners(worker_t* w, rule_t* only) noexcept nogil:
    """Put rested listeners back (all due ones, or every one of ``only``, dropped unpolled)."""
    cdef int i = 0
    cdef listener_t* l
    while i < w.npaused:
        l = w.paused[i].listener
        if only != NULL and <rule_t*>l.rule != only:
            i += 1
            continue
        if only == NULL and w.paused[i].until > w.now:
            i += 1
            continue
        if only == NULL:
            ep_add(w, l.fd, LISTENER_EVENTS, l, TAG_TCP_LISTENER)
        w.npaused -= 1
        w.paused[i] = w.paused[w.npaused]


cdef void poll_listeners(worker_t* w, rule_t* r, bint on) noexcept nogil:
    cdef int i
    cdef int tag = TAG_TCP_LISTENER if r.proto == PROTO_TCP else TAG_UDP_LISTENER
    cdef uint32_t events = LISTENER_EVENTS if r.proto == PROTO_TCP else EPOLLIN
    for i in range(r.count):
        if on:
            ep_add(w, r.listeners[i].fd, events, &r.listeners[i], tag)
        else:
            ep_del(w, r.listeners[i].fd)
    if not on:
        resume_listeners(w, r)


# -- rules -----------------------------------------------------------------------------------

cdef void track_rule(worker_t* w, rule_t* r, rconf_t* conf) noexcept nogil:
    cdef rule_worker_t* rw = &r.per_worker[w.id]
    rw.conf = conf
    dlist_init(&rw.connecting)
    dlist_init(&rw.open)
    dlist_init(&rw.half)
    dlist_init(&rw.flushing)
    dlist_init(&rw.sessions)
    if not grow(<void**>&w.rules, &w.cap_rules, w.nrules + 1, sizeof(rule_t*)):
        rule_release(r)     # not tracked: it serves no connection here
        return
    w.rules[w.nrules] = r
    w.nrules += 1
    if r.proto == PROTO_UDP and r.udp_owner == w.id and udp_batch_ready(w):
        poll_listeners(w, r, True)


cdef void untrack_rule(worker_t* w, int i) noexcept nogil:
    cdef rule_t* r = w.rules[i]
    w.nrules -= 1
    w.rules[i] = w.rules[w.nrules]
    rule_release(r)


cdef void drop_rule_if_idle(worker_t* w, int i) noexcept nogil:
    cdef rule_worker_t* rw = &w.rules[i].per_worker[w.id]
    if w.rules[i].removed and rw.nconns == 0 and rw.nsessions == 0:
        untrack_rule(w, i)


cdef int find_rule(worker_t* w, rule_t* r) noexcept nogil:
    cdef int i
    for i in range(w.nrules):
        if w.rules[i] == r:
            return i
    return -1


# -- commands --------------------------------------------------------------------------------

cdef void run_command(worker_t* w, cmd_t* cmd) noexcept nogil:
    cdef rule_t* r = cmd.rule
    cdef rule_worker_t* rw = &r.per_worker[w.id] if r != NULL else NULL
    cdef bint owner = r != NULL and r.proto == PROTO_UDP and r.udp_owner == w.id
    cdef bint moved
    cdef dnode_t* n
    cdef int i
    if cmd.op == CMD_ADD_RULE:
        track_rule(w, r, cmd.conf)
    elif cmd.op == CMD_LISTEN_ON:
        poll_listeners(w, r, True)
    elif cmd.op == CMD_LISTEN_OFF:
        poll_listeners(w, r, False)
    elif cmd.op == CMD_SET_CONF:
        moved = not addr_same(&rw.conf.target, &cmd.conf.target)
        rw.conf = cmd.conf
        if cmd.close_live:
            tcp_close_all(w, rw, True)
        if owner and moved:     # an option change leaves the sessions' sockets alone
            udp_retarget(w, rw)
    elif cmd.op == CMD_REMOVE_RULE:
        if owner:
            poll_listeners(w, r, False)
        # UDP replies leave through the listener, so its sessions cannot outlive it.
        udp_close_all(w, rw)
        if cmd.close_live:
            tcp_close_all(w, rw, True)
        i = find_rule(w, r)
        if i >= 0:
            drop_rule_if_idle(w, i)
    elif cmd.op == CMD_SESSIONS:
        n = dlist_first(&rw.sessions)
        while n != NULL and n != &rw.sessions.head and cmd.out_len < cmd.out_cap:
            cmd.out[cmd.out_len] = (<session_t*>n).flow.client
            cmd.out_len += 1
            n = n.next
    elif cmd.op == CMD_STOP:
        w.running = 0
    # CMD_SYNC: nothing to do; its acknowledgement is the point.


cdef void run_commands(worker_t* w) noexcept nogil:
    cdef uint64_t value
    cdef cmd_t* cmd
    cdef cmd_t* nxt
    read(w.wakefd, &value, sizeof(value))
    pthread_mutex_lock(&w.qlock)
    cmd = w.qhead
    w.qhead = w.qtail = NULL
    pthread_mutex_unlock(&w.qlock)
    while cmd != NULL:
        nxt = cmd.next       # the control plane may free cmd once it is acknowledged
        run_command(w, cmd)
        pthread_mutex_lock(&w.ctl.lock)
        w.ctl.outstanding -= 1
        pthread_cond_broadcast(&w.ctl.cond)
        pthread_mutex_unlock(&w.ctl.lock)
        cmd = nxt


cdef void expect_acks(ctl_t* ctl, int n) noexcept nogil:
    pthread_mutex_lock(&ctl.lock)
    ctl.outstanding += n
    pthread_mutex_unlock(&ctl.lock)


cdef void wait_acks(ctl_t* ctl) noexcept nogil:
    cdef timespec deadline
    pthread_mutex_lock(&ctl.lock)
    while ctl.outstanding > 0:
        clock_gettime(CLOCK_REALTIME, &deadline)
        deadline.tv_sec += 1
        pthread_cond_timedwait(&ctl.cond, &ctl.lock, &deadline)
    pthread_mutex_unlock(&ctl.lock)


cdef void post_command(worker_t* w, cmd_t* cmd) noexcept nogil:
    cdef uint64_t one = 1
    cdef bint was_empty
    cmd.next = NULL
    pthread_mutex_lock(&w.qlock)
    was_empty = w.qhead == NULL
    if w.qtail != NULL:
        w.qtail.next = cmd
    else:
        w.qhead = cmd
    w.qtail = cmd
    pthread_mutex_unlock(&w.qlock)
    # The worker reads its wake-up before taking the whole queue, so one wake-up per
    # queue is enough: a batch of commands does not cost a write and a wake-up apiece.
    if was_empty:
        write(w.wakefd, &one, sizeof(one))


# -- the loop --------------------------------------------------------------------------------

cdef void sweep(worker_t* w) noexcept nogil:
    cdef int i = w.nrules - 1
    cdef rule_worker_t* rw
    while i >= 0:
        rw = &w.rules[i].per_worker[w.id]
        tcp_sweep(w, rw)
        udp_sweep(w, rw)
        drop_rule_if_idle(w, i)
        i -= 1
    reserve_refill(w)      # another thread may have taken the fd the last refusal freed
    resume_listeners(w, NULL)


cdef bint dispatch(worker_t* w, epoll_event* ev) noexcept nogil:
    """Handle one event. True for the command queue's wake-up: the loop runs the commands
    after the whole batch."""
    cdef int tag = <int>(ev.data.u64 & TAG_MASK)
    cdef void* obj = <void*><size_t>(ev.data.u64 & ~(<uint64_t>TAG_MASK))
    if tag == TAG_CLIENT or tag == TAG_TARGET:
        conn_event(w, <conn_t*>obj, tag, ev.events)
    elif tag == TAG_TCP_LISTENER:
        tcp_accept(w, <listener_t*>obj)
    elif tag == TAG_UDP_LISTENER:
        udp_listener_readable(w, <listener_t*>obj)
    elif tag == TAG_SESSION:
        udp_session_readable(w, <session_t*>obj)
    elif tag == TAG_WAKE:
        return True
    return False


cdef int wait_events(worker_t* w, epoll_event* events) noexcept nogil:
    cdef int timeout = 0 if w.ready != NULL else SWEEP_MS
    cdef int n
    if w.spin_ns == 0:
        return epoll_wait(w.epfd, events, MAX_EVENTS, timeout)
    # Busy polling: right after traffic, look again instead of sleeping, so the next packet
    # of an exchange does not pay for waking the thread. Costs CPU; off by default.
    n = epoll_wait(w.epfd, events, MAX_EVENTS, 0)
    while n == 0 and timeout != 0 and clock_ns() - w.last_event_ns < w.spin_ns:
        n = epoll_wait(w.epfd, events, MAX_EVENTS, 0)
    if n == 0 and timeout != 0:
        n = epoll_wait(w.epfd, events, MAX_EVENTS, timeout)
    if n > 0:
        w.last_event_ns = clock_ns()
    return n


cdef void block_signals() noexcept nogil:
    # Signals are the host program's business, handled by its own threads. Above all SIGPIPE:
    # splice has no MSG_NOSIGNAL, and a program that restored SIGPIPE's default action would
    # otherwise die when a peer resets mid-write. Faults stay deliverable.
    cdef sigset_t mask
    sigfillset(&mask)
    sigdelset(&mask, SIGSEGV)
    sigdelset(&mask, SIGBUS)
    sigdelset(&mask, SIGFPE)
    sigdelset(&mask, SIGILL)
    pthread_sigmask(SIG_BLOCK, &mask, NULL)


cdef void* worker_main(void* arg) noexcept nogil:
    cdef worker_t* w = <worker_t*>arg
    cdef epoll_event events[MAX_EVENTS]
    cdef int n, i
    cdef bint commands
    block_signals()
    while w.running:
        n = wait_events(w, events)
        w.now = clock_ms()
        w.forks = ff_load_int(&ff_forks)    # before this turn opens any fd
        commands = False
        for i in range(n):
            if dispatch(w, &events[i]):
                commands = True
        # Not in the middle of the batch: an event collected before a command (for a listener
        # it stops polling, of a rule it removes) would be handled after it, when the control
        # plane may already have closed the socket and freed the rule.
        if commands:
            run_commands(w)
        tcp_run_ready(w)
        if w.now >= w.next_sweep:
            sweep(w)
            w.next_sweep = w.now + SWEEP_MS
        tcp_free_dead(w)
        udp_free_dead(w)
    worker_teardown(w)
    return NULL


cdef void worker_teardown(worker_t* w) noexcept nogil:
    cdef rule_worker_t* rw
    while w.nrules:
        rw = &w.rules[0].per_worker[w.id]
        # Reset, not FIN: a transfer cut by the stop must not look complete to either peer.
        tcp_close_all(w, rw, True)
        udp_close_all(w, rw)
        untrack_rule(w, 0)
    tcp_run_ready(w)
    tcp_free_dead(w)
    udp_free_dead(w)
    pool_clear(&w.pool)
    udp_batch_free(w)
    free(w.sessions.buckets)
    free(w.rules)
    free(w.paused)
    close(w.epfd)
    close(w.wakefd)
    if w.reserve_fd >= 0:
        close(w.reserve_fd)
