"""fastfwd as a bench subject, through its Python API (which sets the splice mode per rule).

Run: ``python -m bench.peers.fastfwd_fwd --workers 1 --splice auto [--sources 8] [--busy-poll-us 50] --forward tcp:611:601 ...``.
"""
from __future__ import annotations

import uvloop

import fastfwd

from . import LOOPBACK, Forwards, parser, until_terminated


async def serve(forwards: Forwards, workers: int, splice: str, sources: int, busy_poll_us: int) -> None:
    # A pool of upstream source addresses (127.0.0.2, ...) gives each target more local ports.
    pool = tuple(f"127.0.0.{2 + i}" for i in range(sources))
    options = fastfwd.RuleOptions(splice=splice, source=pool)  # type: ignore[arg-type]
    rules = [fastfwd.Rule(proto=proto, listen_host=LOOPBACK, listen_port=listen,  # type: ignore[arg-type]
                          target_host=LOOPBACK, target_port=target, options=options)
             for proto, listen, target in forwards]
    async with fastfwd.Forwarder(rules, workers=workers, busy_poll_us=busy_poll_us):
        await until_terminated()


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--splice", choices=("auto", "always", "never"), default="auto")
    p.add_argument("--sources", type=int, default=0, help="upstream source addresses to spread over")
    p.add_argument("--busy-poll-us", type=int, default=0, help="workers poll this long before sleeping")
    args = p.parse_args()
    uvloop.run(serve(args.forward, args.workers, args.splice, args.sources, args.busy_poll_us))
