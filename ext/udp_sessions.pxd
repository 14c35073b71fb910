# UDP sessions: one per client address on a listener, each with its own connected socket to
# the target, found through a per-worker hash table.
from syscalls cimport *

cdef enum:
    UDP_BATCH = 32          # datagrams per recvmmsg/sendmmsg call
    UDP_MAX = 65536         # room for the largest datagram, so nothing is cut
    GSO_MAX = 60000         # bytes in one segmented send (one IP datagram before segmenting)
    UDP_CTRL = 96           # control bytes per received datagram: pktinfo and the drop count

# What tells sessions apart: the client's address and, on a wildcard listener, the local
# address it sent to (replies must leave from it, or the client drops them).
ctypedef struct flow_t:
    addr_t client
    int local_family        # AF_UNSPEC on a listener bound to one address
    unsigned char local[16]
    int local_ifindex       # where a link-local address was asked (replies must leave there)

cdef struct session_s:
    dnode_t node            # first: the rule's activity list (oldest first: expiry, eviction)
    uint64_t last_active
    session_s* hnext        # hash chain
    session_s* dead_next
    listener_t* listener
    int fd                  # connected to the target
    int no_gso              # segmentation offload failed on this socket: plain batches only
    int forks               # the worker's fork count when the socket was opened (see ep_forget)
    uint32_t kernel_drops   # the socket's overflow count already counted
    flow_t flow

ctypedef session_s session_t

ctypedef struct session_table_t:
    session_t** buckets
    size_t mask
    size_t count

# Scratch space for one batch in either direction; allocated on a worker's first UDP rule.
ctypedef struct udp_batch_t:
    mmsghdr msgs[UDP_BATCH]
    iovec iov[UDP_BATCH]
    flow_t flows[UDP_BATCH]  # recvmmsg writes each sender's address into flows[i].client
    char ctrl[UDP_BATCH][UDP_CTRL]
    mmsghdr out[UDP_BATCH]
    iovec out_iov[UDP_BATCH]
    char send_ctrl[64]      # control message of the send under way (pktinfo, segment size)
    char* data
    char gso[GSO_MAX]       # a run of equal-sized datagrams, end to end, for one segmented send
