# A relayed TCP connection: the client leg, the target leg, and one half per direction.
from syscalls cimport *

cdef enum:
    CONN_CONNECTING = 0     # waiting for the target's handshake
    CONN_OPEN = 1           # both directions flowing
    CONN_HALF = 2           # one direction finished (FIN passed on) or its source reset, the other
                            # still flowing: under the half-closed timeout
    CONN_CLOSED = 3         # closed; freed at the end of the loop iteration
    CONN_FLUSHING = 4       # a peer reset: the other leg passes it on once its send queue is empty

    MOVE_BLOCKED = 0        # waiting for readiness (or the source is at EOF)
    MOVE_MORE = 1           # budget spent with work left: run again before sleeping
    MOVE_SWITCH = 2         # changed copy strategy: call the other one
    MOVE_RESET = 3          # reading failed (the source's peer reset) or cannot go on: reset both
    MOVE_ON = 4             # (within a strategy) carry on moving
    MOVE_LOST = 5           # the destination leg is gone: drain its last bytes, then reset

    DONE_FIN = 1            # half_t.done: the FIN was passed on with shutdown(SHUT_WR)
    DONE_LOST = 2           # given up: the leg it writes to is gone (that peer reset)

    PIPE_RETRY_BYTES = 1024 * 1024  # copied after a pipe shortage before splice is tried again

# One direction: bytes read from leg d and written to leg 1-d. Data in flight sits either in a
# pipe (splice) or in a buffer (copy), both borrowed from the worker's pool.
ctypedef struct half_t:
    pipe_t* pipe
    char* buf
    uint64_t moved          # bytes delivered so far (promotion to splice)
    uint64_t copy_until     # copy at least until `moved` reaches this; UINT64_MAX: for good
    uint32_t pipe_bytes
    uint32_t off
    uint32_t len
    uint8_t splicing
    uint8_t eof             # the source sent FIN and everything was read
    uint8_t done            # finished: DONE_FIN or DONE_LOST
    uint8_t urgent          # an urgent mark may be queued (EPOLLPRI, or splice said 0): copy,
                            # reading to EAGAIN or EOF (splice and a short read stop at the
                            # mark, with the bytes after it unread)

cdef struct conn_s:
    dnode_t node            # first: the rule's per-state activity list
    uint64_t last_active
    rule_t* rule
    conn_s* next            # ready list, then the free-later list
    int fd[2]               # 0: client, 1: target
    uint8_t rd[2]           # edge-triggered readiness we have not used up yet
    uint8_t wr[2]
    uint8_t hup[2]          # the peer's FIN (or an error) is queued behind the data
    uint8_t state
    uint8_t in_ready
    int forks               # the worker's fork count when the legs were opened (see ep_forget)
    half_t half[2]          # 0: client -> target ("up"), 1: target -> client ("down")

ctypedef conn_s conn_t
