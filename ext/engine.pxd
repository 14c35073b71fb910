# The data plane's declarations, part by part; engine.pyx includes this, then the parts.
from syscalls cimport *

include "timers.pxd"
include "pools.pxd"
include "rule.pxd"
include "tcp_relay.pxd"
include "udp_sessions.pxd"
include "worker.pxd"

