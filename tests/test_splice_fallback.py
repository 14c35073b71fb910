"""Where splice(2) fails (EINVAL: no splice for this pair; ENOSYS: no splice at all), each
connection falls back to copying, loses nothing, and the fallback is counted.

The forwarder runs under a seccomp filter that makes every splice call fail, the way a kernel
or socket type without splice support would.
"""
from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest

from netutil import ChildForwarder, Received, TcpServer, exchange, exchange_handler, payload, spec

NATIVE = Path(__file__).parent / "native"


@pytest.fixture(scope="module")
def nosplice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the seccomp launcher")
    binary = tmp_path_factory.mktemp("native") / "nosplice"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(NATIVE / "nosplice.c")], check=True,
                   capture_output=True, timeout=60)
    return binary


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOSYS])
@pytest.mark.parametrize("mode", ["always", "auto"])
def test_failed_splice_falls_back_to_copy(nosplice: Path, err: int, mode: str) -> None:
    up, down = payload(4 << 20, seed=1), payload(4 << 20, seed=2)
    with TcpServer(exchange_handler(down)) as server:
        with ChildForwarder.start([(spec(server.port), "tcp", {"splice": mode})],
                                  wrapper=(str(nosplice), str(err))) as child:
            assert exchange(child.ports[0], up) == Received.of(down)
            assert server.result() == Received.of(up)
            (counters,) = child.counters()
    assert counters["splice_fallbacks"] == 2, counters     # once per direction, then copy for good
    assert counters["bytes_spliced"] == 0, counters
    assert counters["bytes_copied"] == len(up) + len(down), counters
