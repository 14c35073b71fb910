# Pipes (for splice) and copy buffers, lent to a connection direction only while it holds
# data in flight and returned when empty, so an idle connection owns neither.
from syscalls cimport *

ctypedef struct pipe_t:
    int r
    int w
    int size              # what the kernel granted
    pipe_t* next

ctypedef struct pool_t:
    pipe_t* pipes         # free pipes, all empty
    int npipes
    int pipe_size         # asked for with F_SETPIPE_SZ
    void* bufs            # free buffers, chained through their first word
    int nbufs
    int buf_size
    int max_free          # pipes and buffers kept for reuse beyond this are released
    int pipes_lent        # taken and not yet given back (leak checks read these)
    int bufs_lent
