"""iperf3 as one of the bench's load generators:
``python bench/iperf_window.py HOST PORT STREAMS WARMUP SECONDS``.

Runs ``iperf3 -c HOST -p PORT -P STREAMS -O WARMUP -t SECONDS`` (the client sends, iperf3's
default direction; one client thread drives every stream) against an ``iperf3 -s -J`` server,
and speaks the harness's protocol: ``window`` when the measured window opens, one JSON line
(``bytes``, ``seconds``, ``gbit_s``) when it has closed.

What the window covers is iperf3's own measured period, the one after the omitted warm-up:

- It opens when the client's omit timer fires: with ``-V -i 0`` iperf3 prints "Finished omit
  period, starting real test" at that moment, and ``stdbuf -oL`` makes it write the line then
  rather than at exit. The server started its own omit timer as it sent TEST_START, which
  started the client's.
- ``bytes`` is what the server read from its omit timer's end until the client's TEST_END
  reached it: ``end.sum_received`` of the server's JSON, which ``--get-server-output`` hands
  to the client; ``seconds`` is the length of that period by the server's clock, and
  ``gbit_s`` the one divided by the other. Exact counts, not the rounded text summary.
- It closes for the harness when this wrapper prints its JSON line: once the client's timer
  has ended the test and the server's results are in. Measured on loopback, the harness's
  window (so its CPU samples) ran 1-4 ms longer than the server's counted period of 2 s.

iperf3 3.12 takes ``-O`` and ``-t`` in whole seconds, and prints no such line without a warm-up:
WARMUP is at least 1. iperf3 is killed if it runs 20 s past WARMUP + SECONDS.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from collections.abc import Iterable
from typing import TextIO

OPENED = "Finished omit period, starting real test"
SERVER_JSON = "Server JSON output:"
#: Beyond WARMUP + SECONDS: connecting (bounded by --connect-timeout) and the results exchange.
SLACK_S = 20


def command(host: str, port: int, streams: int, warmup: int, seconds: int) -> list[str]:
    # iperf3 flushes stdout only for interval reports (none with -i 0): stdbuf line-buffers it,
    # so the line that opens the window arrives when iperf3 writes it.
    return ["stdbuf", "-oL", "iperf3", "-c", host, "-p", str(port), "-P", str(streams),
            "-O", str(warmup), "-t", str(seconds), "-i", "0", "-V", "--get-server-output",
            "--connect-timeout", "5000"]


def follow(lines: Iterable[str], out: TextIO) -> dict:
    """Relays iperf3's output as the harness's protocol: writes ``window`` to ``out`` when the
    line that opens the window passes, and returns the server's count once the output ends."""
    opened, seen = False, []
    for line in lines:
        seen.append(line)
        if line.strip() == OPENED:
            print("window", file=out, flush=True)
            opened = True
    if not opened:
        raise ValueError(f"iperf3 never ended its warm-up: {' | '.join(s.strip() for s in seen[-3:])}")
    return received("".join(seen))


def received(output: str) -> dict:
    """The server's count for the measured period, from its JSON in the client's output."""
    at = output.find(SERVER_JSON)
    if at < 0:
        raise ValueError("no server JSON in iperf3's output: the server must run with -J")
    server, _ = json.JSONDecoder().raw_decode(output[at + len(SERVER_JSON):].lstrip())
    if "error" in server:
        raise ValueError(f"iperf3 server: {server['error']}")
    total = server["end"]["sum_received"]
    return {"bytes": total["bytes"], "seconds": total["seconds"],
            "gbit_s": total["bytes"] * 8 / total["seconds"] / 1e9}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("streams", type=int)
    p.add_argument("warmup", type=int, help="whole seconds, at least 1")
    p.add_argument("seconds", type=int, help="whole seconds")
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("iperf3 opens its measured period only after a warm-up: WARMUP must be at least 1")
    iperf3 = subprocess.Popen(command(args.host, args.port, args.streams, args.warmup, args.seconds),
                              stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(args.warmup + args.seconds + SLACK_S, iperf3.kill)
    watchdog.start()
    try:
        assert iperf3.stdout is not None
        result = follow(iperf3.stdout, sys.stdout)
        if iperf3.wait() != 0:
            raise ValueError("iperf3 failed")
    except ValueError as exc:
        print(f"iperf_window: {exc} (iperf3 exit status {iperf3.poll()})", file=sys.stderr)
        return 1
    finally:
        watchdog.cancel()
        iperf3.kill()
        iperf3.wait()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
