from libc.stdlib cimport free
from libc.string cimport memcmp


cdef socklen_t addr_len(addr_t* a) noexcept nogil:
    return sizeof(sockaddr_in) if a.sa.sa_family == AF_INET else sizeof(sockaddr_in6)


cdef inline void set_int_opt(int fd, int level, int name, int value) noexcept nogil:
    setsockopt(fd, level, name, &value, sizeof(int))


# Room for a burst while a worker is off the CPU: at the default (~200 KiB, a hundred or so
# datagrams of 1 KB) a burst overflows a UDP socket before the next batch reads it.
cdef int UDP_RCVBUF = 4 << 20


cdef void set_udp_receive(int fd) noexcept nogil:
    # Past net.core.rmem_max where allowed (CAP_NET_ADMIN), else as far as it lets us.
    if setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &UDP_RCVBUF, sizeof(int)) < 0:
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &UDP_RCVBUF, sizeof(int))
    # What overflows even so is lost in the kernel: have it say how much (counted in drops).
    set_int_opt(fd, SOL_SOCKET, SO_RXQ_OVFL, 1)


cdef void bind_source(rule_worker_t* rw, int fd, int family) noexcept nogil:
    """Bind an upstream socket to the rule's next source address, round robin. The port is
    chosen at connect() time, so each address gets its own full port range."""
    cdef addr_t* src
    if rw.conf.nsource == 0:
        return
    src = &rw.conf.source[rw.next_source % <uint32_t>rw.conf.nsource]
    rw.next_source += 1
    if src.sa.sa_family == family:  # the forwarder hands over only the target's family
        set_int_opt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        bind(fd, &src.sa, addr_len(src))


cdef void rule_target(rconf_t* conf, int index, addr_t* out, socklen_t* outlen) noexcept nogil:
    # Listener i of a range forwards to the target's port + i.
    out[0] = conf.target
    if out.sa.sa_family == AF_INET:
        out.v4.sin_port = htons(ntohs(conf.target.v4.sin_port) + index)
    else:
        out.v6.sin6_port = htons(ntohs(conf.target.v6.sin6_port) + index)
    outlen[0] = addr_len(out)


cdef bint _prefix_match(const unsigned char* a, const unsigned char* b, int bits) noexcept nogil:
    cdef int whole = bits >> 3
    cdef int rest = bits & 7
    if whole and memcmp(a, b, whole) != 0:
        return False
    if rest == 0:
        return True
    cdef unsigned char mask = <unsigned char>(0xff << (8 - rest))
    return (a[whole] & mask) == (b[whole] & mask)


cdef bint rule_allows(rconf_t* conf, addr_t* peer) noexcept nogil:
    cdef int i
    cdef const unsigned char* raw
    cdef int family = peer.sa.sa_family
    if conf.nallow == 0:
        return True
    if family == AF_INET:
        raw = <const unsigned char*>&peer.v4.sin_addr
    else:
        raw = peer.v6.sin6_addr.s6_addr
    for i in range(conf.nallow):
        if conf.allow[i].family == family and _prefix_match(raw, conf.allow[i].addr, conf.allow[i].prefix):
            return True
    return False


cdef void rule_release(rule_t* r) noexcept nogil:
    # The last holder frees the rule; its configuration goes with it.
    if ff_add_int(&r.refs, -1) != 0:
        return
    conf_free(r.conf)
    free(r.per_worker)
    free(r.listeners)
    free(r)


cdef void conf_free(rconf_t* conf) noexcept nogil:
    if conf == NULL:
        return
    free(conf.allow)
    free(conf.source)
    free(conf)
