# System-call and libc declarations used by the data plane. Python.h defines _GNU_SOURCE,
# so splice, accept4, recvmmsg and sendmmsg are visible.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, UINT64_MAX


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EINTR
        EINPROGRESS
        EINVAL
        ENOSYS
        EMFILE
        ENFILE
        ENOBUFS
        ENOMEM
        ECONNREFUSED
        ECONNRESET
        EPIPE
        EIO             # a segmented UDP send the device cannot checksum
        EACCES          # connect() of a UDP socket to a broadcast address without SO_BROADCAST


cdef extern from "<string.h>" nogil:
    char* strerror(int errnum)


cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void* buf, size_t count)
    ssize_t write(int fd, const void* buf, size_t count)
    int close(int fd)


cdef extern from "<fcntl.h>" nogil:
    enum:
        O_NONBLOCK
        O_CLOEXEC
        O_RDONLY
        F_SETPIPE_SZ
        F_GETPIPE_SZ
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
    int open(const char* path, int flags)
    int fcntl(int fd, int cmd, ...)
    int pipe2(int* fds, int flags)
    ssize_t splice(int fd_in, void* off_in, int fd_out, void* off_out, size_t length,
                   unsigned int flags)


cdef extern from "<sys/epoll.h>" nogil:
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLPRI
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLET
        EPOLLEXCLUSIVE
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "<linux/sockios.h>" nogil:
    enum:
        SIOCOUTQ            # bytes in a TCP socket's send queue not yet acknowledged
        SIOCINQ             # bytes in a TCP socket's receive queue not yet read


cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)


cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void* iov_base
        size_t iov_len


cdef extern from "<sys/socket.h>" nogil:
    ctypedef uint32_t socklen_t
    ctypedef uint16_t sa_family_t
    enum:
        AF_UNSPEC
        AF_INET
        AF_INET6
        SOCK_STREAM
        SOCK_DGRAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SOL_SOCKET
        SO_REUSEADDR
        SO_ERROR
        SO_LINGER
        SO_RCVBUF
        SO_RCVBUFFORCE
        SO_OOBINLINE
        SO_KEEPALIVE
        SO_RXQ_OVFL
        SO_BROADCAST
        SHUT_WR
        MSG_DONTWAIT
        MSG_NOSIGNAL
        MSG_TRUNC
        SOMAXCONN
    cdef struct sockaddr:
        sa_family_t sa_family
    cdef struct sockaddr_storage:
        sa_family_t ss_family
    cdef struct linger:
        int l_onoff
        int l_linger
    cdef struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    cdef struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    cmsghdr* CMSG_FIRSTHDR(msghdr* msg)
    cmsghdr* CMSG_NXTHDR(msghdr* msg, cmsghdr* cmsg)
    unsigned char* CMSG_DATA(cmsghdr* cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)
    int socket(int domain, int type, int protocol)
    int bind(int fd, const sockaddr* addr, socklen_t len)
    int listen(int fd, int backlog)
    int accept4(int fd, sockaddr* addr, socklen_t* len, int flags)
    int connect(int fd, const sockaddr* addr, socklen_t len)
    int shutdown(int fd, int how)
    int setsockopt(int fd, int level, int name, const void* val, socklen_t len)
    int getsockopt(int fd, int level, int name, void* val, socklen_t* len)
    int getsockname(int fd, sockaddr* addr, socklen_t* len)
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    ssize_t sendmsg(int fd, const msghdr* msg, int flags)
    int recvmmsg(int fd, mmsghdr* msgs, unsigned int vlen, int flags, void* timeout)
    int sendmmsg(int fd, mmsghdr* msgs, unsigned int vlen, int flags)


cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_IP
        IPPROTO_IPV6
        IPPROTO_TCP
        IP_PKTINFO
        IP_BIND_ADDRESS_NO_PORT
        IPV6_V6ONLY
        IPV6_RECVPKTINFO
        IPV6_PKTINFO
    cdef struct in_addr:
        uint32_t s_addr
    cdef struct in6_addr:
        unsigned char s6_addr[16]
    cdef struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr
    cdef struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id
    cdef struct in_pktinfo:
        int ipi_ifindex
        in_addr ipi_spec_dst
        in_addr ipi_addr
    cdef struct in6_pktinfo:
        in6_addr ipi6_addr
        unsigned int ipi6_ifindex
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)


cdef extern from "<netinet/udp.h>" nogil:
    enum:
        SOL_UDP
        UDP_SEGMENT


cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY


cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char* src, void* dst)
    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    enum:
        CLOCK_MONOTONIC_COARSE
        CLOCK_MONOTONIC
        CLOCK_REALTIME
    int clock_gettime(int clk, timespec* ts)


cdef extern from "<sys/resource.h>" nogil:
    enum:
        RLIMIT_NOFILE
    ctypedef unsigned long rlim_t
    cdef struct rlimit:
        rlim_t rlim_cur
        rlim_t rlim_max
    int getrlimit(int resource, rlimit* rlim)
    int setrlimit(int resource, const rlimit* rlim)


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_t:
        pass
    ctypedef struct pthread_attr_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_create(pthread_t* thread, const pthread_attr_t* attr,
                       void* (*start)(void*) noexcept nogil, void* arg)
    int pthread_join(pthread_t thread, void** ret)
    int pthread_setname_np(pthread_t thread, const char* name)
    int pthread_mutex_init(pthread_mutex_t* m, void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* m)
    int pthread_mutex_lock(pthread_mutex_t* m)
    int pthread_mutex_unlock(pthread_mutex_t* m)
    int pthread_cond_init(pthread_cond_t* c, void* attr)
    int pthread_cond_destroy(pthread_cond_t* c)
    int pthread_cond_broadcast(pthread_cond_t* c)
    int pthread_cond_timedwait(pthread_cond_t* c, pthread_mutex_t* m, const timespec* t)


cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    enum:
        SIG_BLOCK
        SIGSEGV
        SIGBUS
        SIGFPE
        SIGILL
    int sigfillset(sigset_t* set)
    int sigdelset(sigset_t* set, int signum)
    int pthread_sigmask(int how, const sigset_t* set, sigset_t* old)


# Counters are written by one worker and read by the control plane; atomic loads keep those
# reads untorn without costing the writer anything on x86-64, and acquire ones let a reader
# that loads a close before its open never see more closes than opens.
cdef extern from *:
    """
    #define ff_load_u64(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    #define ff_add_int(p, v) __atomic_add_fetch((p), (v), __ATOMIC_ACQ_REL)
    #define ff_load_int(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
    /* How far v is past *p, raising *p to v: of callers racing with rising values, each
       claims only its own part (a socket's running count read by several workers). */
    static inline uint32_t ff_claim_u32(uint32_t* p, uint32_t v) {
        uint32_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
        while ((int32_t)(v - old) > 0)
            if (__atomic_compare_exchange_n(p, &old, v, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                return v - old;
        return 0;
    }
    /* Changes at each fork of this process: a child holds copies of the fds open at its fork,
       and closing ours then neither ends a socket nor takes it out of an epoll set. Raised
       both before the fork (an fd closed from then on may be in the child) and after it (an
       fd opened up to then may be). */
    static int ff_forks;
    static void ff_count_fork(void) { __atomic_add_fetch(&ff_forks, 1, __ATOMIC_ACQ_REL); }
    static int ff_watch_forks(void) { return pthread_atfork(ff_count_fork, ff_count_fork, NULL); }
    """
    uint64_t ff_load_u64(uint64_t* p) nogil
    int ff_add_int(int* p, int v) nogil
    int ff_load_int(int* p) nogil
    uint32_t ff_claim_u32(uint32_t* p, uint32_t v) nogil
    int ff_forks
    int ff_watch_forks() nogil

