# Clocks and the intrusive lists that order connections and sessions by last activity.
# Every list holds items with one timeout (per rule, per state), so the head is always the
# next to expire and the sweep stops at the first live item.
from syscalls cimport *

ctypedef struct dnode_t:
    dnode_t* prev
    dnode_t* next

ctypedef struct dlist_t:
    dnode_t head          # sentinel: head.next is the oldest item, head.prev the newest

cdef inline void dlist_init(dlist_t* l) noexcept nogil:
    l.head.prev = &l.head
    l.head.next = &l.head

cdef inline bint dlist_empty(dlist_t* l) noexcept nogil:
    return l.head.next == &l.head

cdef inline dnode_t* dlist_first(dlist_t* l) noexcept nogil:
    return NULL if l.head.next == &l.head else l.head.next

cdef inline void dlist_unlink(dnode_t* n) noexcept nogil:
    n.prev.next = n.next
    n.next.prev = n.prev
    n.prev = n
    n.next = n

cdef inline void dlist_append(dlist_t* l, dnode_t* n) noexcept nogil:
    n.prev = l.head.prev
    n.next = &l.head
    l.head.prev.next = n
    l.head.prev = n

cdef inline void dlist_move_to_end(dlist_t* l, dnode_t* n) noexcept nogil:
    dlist_unlink(n)
    dlist_append(l, n)
