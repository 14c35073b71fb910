# UDP forwarding: datagrams arrive in recvmmsg batches, go out through each client's session
# socket in sendmmsg runs, and replies go back to the client in batches from the address it
# sent to. Only what is already waiting is batched: nothing waits for a batch to fill.
from libc.stdlib cimport calloc, malloc, free
from libc.string cimport memcmp, memcpy, memset

cdef enum:
    UDP_ROUNDS = 4      # batches per wake-up per socket before letting others run
    UNREAD_ROUNDS = 512 # batches counted on a closing socket: more than its full buffer holds


cdef inline uint64_t _mix(uint64_t h) noexcept nogil:
    h ^= h >> 33
    h *= <uint64_t>0xff51afd7ed558ccdULL
    h ^= h >> 33
    return h


cdef uint64_t flow_hash(listener_t* l, flow_t* f) noexcept nogil:
    cdef uint64_t h = <uint64_t><size_t>l
    cdef uint64_t words[2]
    cdef addr_t* a = &f.client
    if a.sa.sa_family == AF_INET:
        h ^= (<uint64_t>a.v4.sin_addr.s_addr << 16) ^ a.v4.sin_port
    else:
        memcpy(words, a.v6.sin6_addr.s6_addr, 16)
        h ^= _mix(words[0]) ^ words[1] ^ a.v6.sin6_port
    if f.local_family != AF_UNSPEC:
        memcpy(words, f.local, 16)
        h ^= _mix(words[0] ^ words[1])
    return _mix(h)


cdef bint addr_same(addr_t* a, addr_t* b) noexcept nogil:
    if a.sa.sa_family != b.sa.sa_family:
        return False
    if a.sa.sa_family == AF_INET:
        return a.v4.sin_port == b.v4.sin_port and a.v4.sin_addr.s_addr == b.v4.sin_addr.s_addr
    return (a.v6.sin6_port == b.v6.sin6_port
            and memcmp(a.v6.sin6_addr.s6_addr, b.v6.sin6_addr.s6_addr, 16) == 0)


cdef bint flow_same(flow_t* a, flow_t* b) noexcept nogil:
    return (addr_same(&a.client, &b.client) and a.local_family == b.local_family
            and (a.local_family == AF_UNSPEC or memcmp(a.local, b.local, 16) == 0))


cdef void read_local_address(flow_t* f, msghdr* m) noexcept nogil:
    cdef cmsghdr* cm = CMSG_FIRSTHDR(m)
    f.local_family = AF_UNSPEC
    f.local_ifindex = 0
    memset(f.local, 0, 16)
    while cm != NULL:
        if cm.cmsg_level == IPPROTO_IP and cm.cmsg_type == IP_PKTINFO:
            # The address to answer from, which the kernel works out: the destination itself,
            # or for a broadcast query this host's address on that network.
            f.local_family = AF_INET
            memcpy(f.local, &(<in_pktinfo*>CMSG_DATA(cm)).ipi_spec_dst, 4)
        elif cm.cmsg_level == IPPROTO_IPV6 and cm.cmsg_type == IPV6_PKTINFO:
            f.local_family = AF_INET6
            memcpy(f.local, &(<in6_pktinfo*>CMSG_DATA(cm)).ipi6_addr, 16)
            # A link-local source means nothing without its link (fe80::/10): keep the one
            # asked on. Other addresses leave it to the routes.
            if f.local[0] == 0xfe and f.local[1] & 0xc0 == 0x80:
                f.local_ifindex = (<in6_pktinfo*>CMSG_DATA(cm)).ipi6_ifindex
        cm = CMSG_NXTHDR(m, cm)


cdef inline void count_kernel_drops(msghdr* last, uint32_t* seen, uint64_t* drops) noexcept nogil:
    # Once a socket has overflowed, each datagram carries the count of those it lost before
    # this one was queued (SO_RXQ_OVFL): the last of a batch has the newest.
    cdef cmsghdr* cm
    if last.msg_controllen == 0:
        return
    cm = CMSG_FIRSTHDR(last)
    while cm != NULL:
        if cm.cmsg_level == SOL_SOCKET and cm.cmsg_type == SO_RXQ_OVFL:
            drops[0] += ff_claim_u32(seen, (<uint32_t*>CMSG_DATA(cm))[0])
            return
        cm = CMSG_NXTHDR(last, cm)


# -- the session table -----------------------------------------------------------------------

cdef bint table_init(session_table_t* t, size_t buckets) noexcept nogil:
    t.buckets = <session_t**>calloc(buckets, sizeof(session_t*))
    t.mask = buckets - 1
    t.count = 0
    return t.buckets != NULL


cdef session_t* table_find(session_table_t* t, listener_t* l, flow_t* f) noexcept nogil:
    cdef session_t* s = t.buckets[flow_hash(l, f) & t.mask]
    while s != NULL and not (s.listener == l and flow_same(&s.flow, f)):
        s = s.hnext
    return s


cdef void table_insert(session_table_t* t, session_t* s) noexcept nogil:
    cdef session_table_t bigger
    cdef session_t* it
    cdef size_t i
    cdef size_t slot
    if t.count >= t.mask + 1 and table_init(&bigger, (t.mask + 1) * 2):
        for i in range(t.mask + 1):
            while t.buckets[i] != NULL:
                it = t.buckets[i]
                t.buckets[i] = it.hnext
                slot = flow_hash(it.listener, &it.flow) & bigger.mask
                it.hnext = bigger.buckets[slot]
                bigger.buckets[slot] = it
        bigger.count = t.count
        free(t.buckets)
        t[0] = bigger
    slot = flow_hash(s.listener, &s.flow) & t.mask
    s.hnext = t.buckets[slot]
    t.buckets[slot] = s
    t.count += 1


cdef void table_remove(session_table_t* t, session_t* s) noexcept nogil:
    cdef session_t** link = &t.buckets[flow_hash(s.listener, &s.flow) & t.mask]
    while link[0] != NULL and link[0] != s:
        link = &link[0].hnext
    if link[0] == s:
        link[0] = s.hnext
        t.count -= 1


# -- sessions --------------------------------------------------------------------------------

cdef bint udp_batch_ready(worker_t* w) noexcept nogil:
    if w.udp != NULL:
        return True
    w.udp = <udp_batch_t*>calloc(1, sizeof(udp_batch_t))
    if w.udp == NULL:
        return False
    w.udp.data = <char*>malloc(UDP_BATCH * UDP_MAX)
    if w.udp.data == NULL:
        free(w.udp)
        w.udp = NULL
        return False
    return True


cdef void udp_batch_free(worker_t* w) noexcept nogil:
    if w.udp != NULL:
        free(w.udp.data)
        free(w.udp)
        w.udp = NULL


cdef int connect_target(int fd, addr_t* target, socklen_t tlen) noexcept nogil:
    # A broadcast target (Wake-on-LAN onto a LAN) needs SO_BROADCAST; it is asked for only
    # when connect says so, so other sessions pay nothing for it.
    if connect(fd, &target.sa, tlen) == 0:
        return 0
    if errno != EACCES:
        return -1
    set_int_opt(fd, SOL_SOCKET, SO_BROADCAST, 1)
    return connect(fd, &target.sa, tlen)


cdef session_t* session_open(worker_t* w, listener_t* l, flow_t* flow) noexcept nogil:
    cdef rule_worker_t* rw = &(<rule_t*>l.rule).per_worker[w.id]
    cdef rconf_t* conf = rw.conf
    cdef addr_t target
    cdef socklen_t tlen
    cdef session_t* s
    cdef int fd
    if conf.udp_max_sessions and rw.nsessions >= conf.udp_max_sessions:
        evict_oldest(w, rw)
    rule_target(conf, l.index, &target, &tlen)
    fd = socket(target.sa.sa_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        return NULL
    set_udp_receive(fd)    # a burst of replies gets the room a burst of requests gets
    bind_source(rw, fd, target.sa.sa_family)
    if connect_target(fd, &target, tlen) < 0:
        close(fd)
        return NULL
    s = <session_t*>calloc(1, sizeof(session_t))
    if s == NULL:
        close(fd)
        return NULL
    w.sessions_held += 1
    s.fd = fd
    s.forks = w.forks
    s.listener = l
    s.flow = flow[0]
    s.last_active = w.now
    ep_add(w, fd, EPOLLIN, s, TAG_SESSION)
    table_insert(&w.sessions, s)
    dlist_append(&rw.sessions, &s.node)
    rw.nsessions += 1
    rw.c.sessions_created += 1
    return s


cdef void evict_oldest(worker_t* w, rule_worker_t* rw) noexcept nogil:
    session_close(w, <session_t*>dlist_first(&rw.sessions))
    rw.c.sessions_evicted += 1


cdef void count_unread(int fd, rule_worker_t* rw) noexcept nogil:
    # Replies still queued on a session's socket are lost when it closes (evicted mid-batch,
    # say): count them. Read without buffers, each cut to nothing: the batch's may be in use.
    cdef mmsghdr msgs[UDP_BATCH]
    cdef int n, rounds
    cdef bint cleared = False
    memset(msgs, 0, sizeof(msgs))
    for rounds in range(UNREAD_ROUNDS):     # a target still sending cannot hold the worker
        n = recvmmsg(fd, msgs, UDP_BATCH, MSG_DONTWAIT, NULL)
        if n > 0:
            rw.c.drops += n
        elif n < 0 and errno != EAGAIN and not cleared:
            # An ICMP error left for an earlier datagram, cleared by this read (as when read).
            rw.c.connect_failed += 1
            cleared = True
            continue
        if n < UDP_BATCH:
            return


cdef void session_close(worker_t* w, session_t* s) noexcept nogil:
    cdef rule_worker_t* rw = &(<rule_t*>s.listener.rule).per_worker[w.id]
    count_unread(s.fd, rw)
    ep_forget(w, s.fd, s.forks)
    close(s.fd)
    s.fd = -1
    table_remove(&w.sessions, s)
    dlist_unlink(&s.node)
    rw.nsessions -= 1
    rw.c.sessions_closed += 1
    # Freed at the end of the iteration: the same epoll batch may still name it.
    s.dead_next = w.dead_sessions
    w.dead_sessions = s


cdef inline void session_touch(worker_t* w, session_t* s, rule_worker_t* rw) noexcept nogil:
    if s.last_active != w.now:
        s.last_active = w.now
        dlist_move_to_end(&rw.sessions, &s.node)


cdef int send_all(int fd, mmsghdr* out, int k, uint64_t* refused, uint64_t* nbytes) noexcept nogil:
    """sendmmsg until everything went or the socket is full; returns how many went and adds
    their bytes to nbytes. A send that fails is tried once more: on a connected socket it may
    have met the error an ICMP message (port unreachable, prohibited, fragmentation needed)
    left for an earlier datagram, which it cleared while sending nothing. If the retry goes
    or fails otherwise, that was such an error: counted in refused. Failing the same way, the
    datagram itself cannot go (too big, no route): it alone is dropped, the rest still goes."""
    cdef int done = 0
    cdef int sent = 0
    cdef int failed = 0         # errno of the try before, if it failed
    cdef uint64_t total = 0
    cdef int rc, i
    while done < k:
        rc = sendmmsg(fd, out + done, k - done, MSG_DONTWAIT)
        if rc > 0:
            for i in range(done, done + rc):
                total += out[i].msg_len
            if failed:
                refused[0] += 1
                failed = 0
            done += rc
            sent += rc
        elif rc < 0 and (errno == EAGAIN or errno == ENOBUFS):
            break       # the socket is full: the rest is dropped
        elif rc < 0 and errno == EINTR:
            continue
        elif not failed:
            failed = errno
        else:
            if errno != failed:
                refused[0] += 1
            failed = 0
            done += 1
    nbytes[0] += total
    return sent


cdef int send_segmented(session_t* s, udp_batch_t* b, int k, uint64_t* refused,
                        uint64_t* nbytes) noexcept nogil:
    """Send the k prepared datagrams as one segmented write (UDP_SEGMENT): one trip through
    the stack instead of k. Needs equal sizes (the last may be shorter). Returns how many went
    (their bytes added to nbytes), or -1 if this run cannot go that way."""
    cdef size_t size = b.out_iov[0].iov_len
    cdef size_t total = 0
    cdef int i
    cdef msghdr m
    cdef iovec iov
    cdef uint16_t segment
    cdef ssize_t n
    cdef int failed
    if s.no_gso or k < 2 or size == 0 or <size_t>k * size > GSO_MAX:
        return -1
    if b.out_iov[k - 1].iov_len == 0:
        return -1       # an empty datagram makes no segment: folded in, it would be lost
    for i in range(k):
        if b.out_iov[i].iov_len > size or (b.out_iov[i].iov_len < size and i != k - 1):
            return -1
    for i in range(k):
        memcpy(b.gso + total, b.out_iov[i].iov_base, b.out_iov[i].iov_len)
        total += b.out_iov[i].iov_len
    iov.iov_base = b.gso
    iov.iov_len = total
    segment = <uint16_t>size
    memset(&m, 0, sizeof(msghdr))
    m.msg_iov = &iov
    m.msg_iovlen = 1
    m.msg_control = b.send_ctrl
    m.msg_controllen = one_cmsg(b.send_ctrl, SOL_UDP, UDP_SEGMENT, &segment, sizeof(uint16_t))
    n = sendmsg(s.fd, &m, MSG_DONTWAIT)
    if n < 0 and errno != EAGAIN and errno != EINVAL and errno != EIO:
        failed = errno
        n = sendmsg(s.fd, &m, MSG_DONTWAIT)     # once more after an ICMP error (see send_all)
        if n >= 0 or errno != failed:
            refused[0] += 1
    if n == <ssize_t>total:
        nbytes[0] += total
        return k
    if n < 0 and errno == EAGAIN:
        return 0
    # Not offered here (old kernel, device), or not for segments this size on this path
    # (EMSGSIZE once the path's size is known): batches from now on.
    s.no_gso = 1
    return -1


cdef inline void prepare_recv(udp_batch_t* b, bint names) noexcept nogil:
    cdef int i
    cdef msghdr* m
    for i in range(UDP_BATCH):
        b.iov[i].iov_base = b.data + i * UDP_MAX
        b.iov[i].iov_len = UDP_MAX
        m = &b.msgs[i].msg_hdr
        m.msg_name = &b.flows[i].client if names else NULL
        m.msg_namelen = sizeof(addr_t) if names else 0
        m.msg_iov = &b.iov[i]
        m.msg_iovlen = 1
        m.msg_control = b.ctrl[i]
        m.msg_controllen = UDP_CTRL
        m.msg_flags = 0


cdef inline void prepare_send(udp_batch_t* b, int k, int i, addr_t* to, socklen_t tolen,
                              void* ctrl, size_t ctrllen) noexcept nogil:
    cdef msghdr* m = &b.out[k].msg_hdr
    b.out_iov[k].iov_base = b.iov[i].iov_base
    b.out_iov[k].iov_len = b.msgs[i].msg_len
    m.msg_name = to
    m.msg_namelen = tolen
    m.msg_iov = &b.out_iov[k]
    m.msg_iovlen = 1
    m.msg_control = ctrl
    m.msg_controllen = ctrllen
    m.msg_flags = 0


cdef void udp_listener_readable(worker_t* w, listener_t* l) noexcept nogil:
    cdef rule_worker_t* rw = &(<rule_t*>l.rule).per_worker[w.id]
    cdef udp_batch_t* b = w.udp
    cdef session_t* s
    cdef int n, i, k, sent, rounds
    for rounds in range(UDP_ROUNDS):
        prepare_recv(b, True)
        n = recvmmsg(l.fd, b.msgs, UDP_BATCH, MSG_DONTWAIT, NULL)
        if n <= 0:
            return
        count_kernel_drops(&b.msgs[n - 1].msg_hdr, &l.kernel_drops, &rw.c.drops)
        for i in range(n):
            if l.wildcard:
                read_local_address(&b.flows[i], &b.msgs[i].msg_hdr)
            else:
                b.flows[i].local_family = AF_UNSPEC
        i = 0
        while i < n:
            if b.msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                rw.c.truncated += 1
                i += 1
                continue
            if not rule_allows(rw.conf, &b.flows[i].client):
                # Checked per datagram, not per session: after a reload that narrows the
                # list, a client it no longer admits gets nothing more through.
                rw.c.refused += 1
                i += 1
                continue
            s = NULL
            if rw.conf.target.sa.sa_family != AF_UNSPEC:
                s = table_find(&w.sessions, l, &b.flows[i])
                if s == NULL:
                    s = session_open(w, l, &b.flows[i])
            if s == NULL:
                rw.c.drops += 1
                i += 1
                continue
            session_touch(w, s, rw)
            # One sendmmsg for the run of datagrams from this client.
            k = 0
            while i < n and (k == 0 or (flow_same(&b.flows[i], &s.flow)
                                        and not b.msgs[i].msg_hdr.msg_flags & MSG_TRUNC)):
                prepare_send(b, k, i, NULL, 0, NULL, 0)
                k += 1
                i += 1
            sent = send_segmented(s, b, k, &rw.c.connect_failed, &rw.c.bytes_up)
            if sent < 0:
                sent = send_all(s.fd, b.out, k, &rw.c.connect_failed, &rw.c.bytes_up)
            rw.c.datagrams_up += sent
            rw.c.drops += k - sent
        if n < UDP_BATCH:
            return


cdef size_t one_cmsg(char* buf, int level, int kind, const void* data, size_t size) noexcept nogil:
    """Write a control buffer holding one message; returns its length for msg_controllen."""
    cdef msghdr m
    cdef cmsghdr* cm
    memset(buf, 0, CMSG_SPACE(size))
    m.msg_control = buf
    m.msg_controllen = CMSG_SPACE(size)
    cm = CMSG_FIRSTHDR(&m)
    cm.cmsg_level = level
    cm.cmsg_type = kind
    cm.cmsg_len = CMSG_LEN(size)
    memcpy(CMSG_DATA(cm), data, size)
    return m.msg_controllen


cdef size_t reply_control(udp_batch_t* b, session_t* s) noexcept nogil:
    # Replies leave from the local address the client sent to (wildcard listeners only).
    cdef in_pktinfo p4
    cdef in6_pktinfo p6
    if s.flow.local_family == AF_INET:
        memset(&p4, 0, sizeof(p4))
        memcpy(&p4.ipi_spec_dst, s.flow.local, 4)
        return one_cmsg(b.send_ctrl, IPPROTO_IP, IP_PKTINFO, &p4, sizeof(p4))
    if s.flow.local_family == AF_INET6:
        memset(&p6, 0, sizeof(p6))
        memcpy(&p6.ipi6_addr, s.flow.local, 16)
        p6.ipi6_ifindex = s.flow.local_ifindex
        return one_cmsg(b.send_ctrl, IPPROTO_IPV6, IPV6_PKTINFO, &p6, sizeof(p6))
    return 0


cdef void udp_session_readable(worker_t* w, session_t* s) noexcept nogil:
    cdef listener_t* l = s.listener
    cdef rule_worker_t* rw = &(<rule_t*>l.rule).per_worker[w.id]
    cdef udp_batch_t* b = w.udp
    cdef size_t ctrllen
    cdef int n, i, k, sent, rounds
    if s.fd < 0:
        return
    for rounds in range(UDP_ROUNDS):
        prepare_recv(b, False)
        n = recvmmsg(s.fd, b.msgs, UDP_BATCH, MSG_DONTWAIT, NULL)
        if n <= 0:
            # An error here is one an ICMP message for an earlier datagram left on the socket
            # (port unreachable, prohibited, fragmentation needed); reading cleared it.
            if n < 0 and errno != EAGAIN:
                rw.c.connect_failed += 1
                continue
            return
        count_kernel_drops(&b.msgs[n - 1].msg_hdr, &s.kernel_drops, &rw.c.drops)
        ctrllen = reply_control(b, s)
        k = 0
        for i in range(n):
            if b.msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                rw.c.truncated += 1
                continue
            prepare_send(b, k, i, &s.flow.client, addr_len(&s.flow.client),
                         b.send_ctrl if ctrllen else NULL, ctrllen)
            k += 1
        sent = send_all(l.fd, b.out, k, &rw.c.connect_failed, &rw.c.bytes_down)
        rw.c.datagrams_down += sent
        rw.c.drops += k - sent
        session_touch(w, s, rw)
        if n < UDP_BATCH:
            return


cdef void udp_retarget(worker_t* w, rule_worker_t* rw) noexcept nogil:
    # Sessions follow the rule at once: none keeps sending to an address that is gone.
    cdef dnode_t* n = dlist_first(&rw.sessions)
    cdef dnode_t* nxt
    cdef session_t* s
    cdef addr_t target
    cdef socklen_t tlen
    cdef sockaddr unspec
    unspec.sa_family = AF_UNSPEC
    while n != NULL:
        nxt = n.next if n.next != &rw.sessions.head else NULL
        s = <session_t*>n
        if rw.conf.target.sa.sa_family == AF_UNSPEC:
            session_close(w, s)
        else:
            # A connected UDP socket can connect again (a new address family cannot). Dissolve
            # the old association first: it drops the source address picked for the old
            # target, which may not be the one that reaches the new target.
            rule_target(rw.conf, s.listener.index, &target, &tlen)
            connect(s.fd, &unspec, sizeof(sockaddr))
            if connect_target(s.fd, &target, tlen) < 0:
                session_close(w, s)
        n = nxt


cdef void udp_close_all(worker_t* w, rule_worker_t* rw) noexcept nogil:
    cdef dnode_t* n = dlist_first(&rw.sessions)
    while n != NULL:
        session_close(w, <session_t*>n)
        n = dlist_first(&rw.sessions)


cdef void udp_sweep(worker_t* w, rule_worker_t* rw) noexcept nogil:
    cdef dnode_t* n = dlist_first(&rw.sessions)
    while n != NULL and expired((<session_t*>n).last_active, rw.conf.udp_idle_ms, w.now):
        session_close(w, <session_t*>n)
        rw.c.sessions_expired += 1
        n = dlist_first(&rw.sessions)
    # A reload may have lowered the cap below the sessions open: the least recently active go.
    while rw.conf.udp_max_sessions and rw.nsessions > rw.conf.udp_max_sessions:
        evict_oldest(w, rw)


cdef void udp_free_dead(worker_t* w) noexcept nogil:
    cdef session_t* s = w.dead_sessions
    cdef session_t* nxt
    w.dead_sessions = NULL
    while s != NULL:
        nxt = s.dead_next
        free(s)
        w.sessions_held -= 1
        s = nxt
