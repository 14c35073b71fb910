# UDP sessions: one per client address on a listener, each with its own connected socket to
# the target, found through a per-worker hash table.
from syscalls cimport *

cdef enum:
    UDP_BATCH = 32          # datagrams per recvmmsg/sendmmsg call
    UDP_MAX = 65536         # room for the largest datagram, so nothing is cut

cdef struct session_s:
    dnode_t node            # first: the rule's activity list (oldest first: expiry, eviction)
    uint64_t last_active
    session_s* hnext        # hash chain
    session_s* dead_next
    listener_t* listener
    int fd                  # connected to the target
    int local_family        # AF_UNSPEC unless replies must leave from a chosen local address
    addr_t client
    unsigned char local[16] # the address the client sent to (wildcard listeners)

ctypedef session_s session_t

ctypedef struct session_table_t:
    session_t** buckets
    size_t mask
    size_t count

# Scratch space for one batch in either direction; allocated on a worker's first UDP rule.
ctypedef struct udp_batch_t:
    mmsghdr msgs[UDP_BATCH]
    iovec iov[UDP_BATCH]
    addr_t names[UDP_BATCH]
    char ctrl[UDP_BATCH][64]
    mmsghdr out[UDP_BATCH]
    iovec out_iov[UDP_BATCH]
    char reply_ctrl[64]
    char* data
