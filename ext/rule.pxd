# A rule as the workers see it: its listeners, its configuration (target and options) and,
# per worker, its counters and the lists of its live connections and sessions.
from syscalls cimport *

ctypedef union addr_t:
    sockaddr sa
    sockaddr_in v4
    sockaddr_in6 v6

ctypedef struct cidr_t:
    int family
    unsigned char addr[16]
    int prefix

# Immutable once published: a change publishes a new one to every worker, and the old one is
# freed after all workers have switched.
ctypedef struct rconf_t:
    addr_t target               # sa_family AF_UNSPEC: pending (no known address)
    uint64_t connect_ms
    uint64_t idle_ms
    uint64_t half_ms
    uint64_t udp_idle_ms
    int splice_mode             # SPLICE_NEVER / SPLICE_AUTO / SPLICE_ALWAYS
    uint64_t splice_threshold
    int udp_max_sessions
    int max_connections
    int nallow
    cidr_t* allow
    int nsource
    addr_t* source

# Written only by the owning worker; read by the control plane with atomic loads, last field
# first: keep each close after the open it follows.
ctypedef struct counters_t:
    uint64_t accepted
    uint64_t closed
    uint64_t refused
    uint64_t connect_failed
    uint64_t bytes_up
    uint64_t bytes_down
    uint64_t bytes_spliced
    uint64_t bytes_copied
    uint64_t splice_fallbacks
    uint64_t pipe_shortages
    uint64_t accept_paused
    uint64_t datagrams_up
    uint64_t datagrams_down
    uint64_t sessions_created
    uint64_t sessions_closed
    uint64_t sessions_evicted
    uint64_t sessions_expired
    uint64_t drops
    uint64_t truncated
    uint64_t bytes_discarded

ctypedef struct rule_worker_t:
    counters_t c
    rconf_t* conf
    dlist_t connecting          # TCP connections waiting for the target, oldest first
    dlist_t open                # established, least recently active first
    dlist_t half                # one direction finished, least recently active first
    dlist_t flushing            # passing a reset on once a send queue is empty (CONN_FLUSHING)
    dlist_t sessions            # UDP sessions, least recently active first
    int nconns
    int nsessions
    uint32_t next_source
    char _pad[64]               # keeps workers' counter blocks on separate cache lines

cdef struct rule_s

ctypedef struct listener_t:
    int fd
    int index                   # port offset within the rule's range
    rule_s* rule
    int wildcard                # bound to 0.0.0.0 / :: (UDP replies need IP_PKTINFO)
    uint32_t kernel_drops       # UDP: the socket's overflow count already counted (all workers)

cdef enum:
    PROTO_TCP = 0
    PROTO_UDP = 1
    SPLICE_NEVER = 0
    SPLICE_AUTO = 1
    SPLICE_ALWAYS = 2

cdef struct rule_s:
    int id
    int proto
    int count
    int refs                    # the control plane plus each worker that still tracks it
    int active_conns            # TCP connections open across workers (max_connections)
    int udp_owner               # the worker serving all of a UDP rule's listeners
    int listening
    int removed
    addr_t local                # the listen address, port of the first listener
    rconf_t* conf               # the latest configuration published (workers may lag behind it)
    listener_t* listeners
    rule_worker_t* per_worker

ctypedef rule_s rule_t
