# Coarse monotonic time: the loop reads it once per wake-up, never per event.

cdef uint64_t clock_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return <uint64_t>ts.tv_sec * 1000 + <uint64_t>(ts.tv_nsec // 1000000)


cdef bint expired(uint64_t since, uint64_t timeout, uint64_t now) noexcept nogil:
    # A timeout of 0 means "never".
    return timeout != 0 and since + timeout <= now


cdef uint64_t clock_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec
