# A worker thread: its epoll loop, its command queue and what it owns.
from syscalls cimport *

cdef enum:
    TAG_CLIENT = 0          # epoll data is a pointer with the kind of object in its low bits
    TAG_TARGET = 1
    TAG_TCP_LISTENER = 2
    TAG_UDP_LISTENER = 3
    TAG_SESSION = 4
    TAG_WAKE = 5
    TAG_MASK = 7

    CMD_ADD_RULE = 1        # track the rule (and, on its owner, poll a UDP rule's sockets)
    CMD_LISTEN_ON = 2       # poll a TCP rule's listeners
    CMD_LISTEN_OFF = 3      # stop polling them
    CMD_SET_CONF = 4        # switch to a new configuration (target or options)
    CMD_REMOVE_RULE = 5     # the rule is gone: drop its sessions, optionally its connections
    CMD_SESSIONS = 6        # list a UDP rule's sessions
    CMD_STOP = 7
    CMD_SYNC = 8            # nothing: acknowledged between event batches, so after the current one

# Shared by the control plane and the workers: how many workers have yet to finish the
# current command. Commands are rare, so a mutex is fine here; the data path takes no lock.
ctypedef struct ctl_t:
    pthread_mutex_t lock
    pthread_cond_t cond
    int outstanding

cdef struct cmd_s:
    int op
    rule_t* rule
    rconf_t* conf
    int close_live
    cmd_s* next
    addr_t* out             # CMD_SESSIONS results
    int out_cap
    int out_len

ctypedef cmd_s cmd_t

ctypedef struct paused_t:
    listener_t* listener
    uint64_t until

cdef struct worker_s:
    int id
    int epfd
    int wakefd
    int reserve_fd          # spent to refuse a client when out of fds
    int running
    int live                # open TCP connections (read by the control plane for draining)
    int conns_held          # connections and sessions allocated and not yet freed (leak checks)
    int sessions_held
    uint64_t now
    int forks               # ff_forks when this loop turn began
    uint64_t next_sweep
    uint64_t spin_ns        # busy-poll this long after the last event before sleeping (0: never)
    uint64_t last_event_ns
    pthread_t thread
    pthread_mutex_t qlock
    cmd_t* qhead
    cmd_t* qtail
    ctl_t* ctl
    pool_t pool
    conn_t* ready           # connections with work left after their budget
    conn_t* dead            # closed this iteration, freed at its end
    session_t* dead_sessions
    rule_t** rules          # every rule this worker has connections or listeners of
    int nrules
    int cap_rules
    paused_t* paused        # listeners taken out of epoll after EMFILE, until a deadline
    int npaused
    int cap_paused
    session_table_t sessions
    udp_batch_t* udp

ctypedef worker_s worker_t


cdef inline void reserve_refill(worker_t* w) noexcept nogil:
    # The reserve is spent to refuse one client when out of fds; take it again when one is free.
    if w.reserve_fd < 0:
        w.reserve_fd = open(b"/dev/null", O_RDONLY | O_CLOEXEC)
