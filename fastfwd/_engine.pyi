"""Types of the compiled data plane (built from ext/engine.pyx)."""
from contextlib import AbstractContextManager

class Engine:
    """Worker threads forwarding TCP and UDP without the GIL.

    Every method that changes forwarding returns once all workers have applied it; inside
    ``with engine.batch():``, once the batch ends.
    """

    @property
    def workers(self) -> int: ...
    @property
    def pipe_size(self) -> int: ...
    @property
    def copy_buffer(self) -> int: ...

    def __init__(self, workers: int = 0, pipe_size: int = 1 << 20, copy_buffer: int = 256 * 1024,
                 busy_poll_us: int = 0) -> None:
        """``busy_poll_us``: after traffic, poll again this long before sleeping (0: never)."""
    def add_rule(self, proto: str, listen_host: str, listen_port: int, count: int) -> tuple[int, int]:
        """Bind ``count`` sockets (not yet accepting). Returns (rule id, first real port)."""
    def configure(self, rule_id: int, *, connect_timeout: float, idle_timeout: float,
                  half_closed_timeout: float, splice: int, splice_threshold: int,
                  udp_idle_timeout: float, udp_max_sessions: int, max_connections: int,
                  allow: tuple[str, ...], source: tuple[str, ...]) -> None: ...
    def set_target(self, rule_id: int, host: str | None, port: int, close_live: bool) -> None:
        """Point the rule at host:port (port + i for listener i); ``None`` makes it pending."""
    def remove_rule(self, rule_id: int, close_live: bool) -> None: ...
    def batch(self) -> AbstractContextManager[Engine]:
        """Add, configure, point and remove rules without waiting for each command; leaving
        the batch waits once for all of them."""
    def counters(self, rule_id: int) -> dict[str, int]: ...
    def sessions(self, rule_id: int) -> list[tuple[str, int]]: ...
    def sync(self) -> None:
        """Return once every worker has finished the events it was handling (counters then
        include every send that had returned when it was called)."""
    def live_connections(self) -> int: ...
    def resources(self) -> dict[str, int]:
        """What the workers hold now (connections, sessions, pipes and buffers lent and spare,
        tracked rules), summed over workers. For leak checks."""
    def close(self) -> None:
        """Stop the workers; close every listener and reset every live connection."""

def bind_error(err: int, proto: str, host: str, port: int) -> str:
    """The one-line message for a listener that could not bind (``err`` an errno value)."""
