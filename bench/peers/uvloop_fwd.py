"""A plain asyncio forwarder on uvloop, TCP and UDP: what a Python programmer writes in an hour.

Protocols (not streams) with flow control, half-close passed on, one upstream UDP socket per
client address. Run: ``python -m bench.peers.uvloop_fwd --forward tcp:611:601 ...``.
"""
from __future__ import annotations

import asyncio
import functools
from typing import cast

import uvloop

from . import LOOPBACK, Forwards, parser, until_terminated


class Relay(asyncio.Protocol):
    """One side of a TCP connection; ``peer`` is the other side."""

    # Set by connection_made (transport) and by the constructor or the dialer (peer).
    transport: asyncio.Transport
    peer: Relay

    def __init__(self, peer: Relay | None = None) -> None:
        if peer is not None:
            self.peer = peer
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's does not subclass it

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.pass_eof()
        return True  # keep the other direction open (half-close)

    def pass_eof(self) -> None:
        if not self.peer.transport.is_closing():
            self.peer.transport.write_eof()
        if self.peer.eof:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        peer = getattr(self, "peer", None)  # a client whose dial has not finished has none yet
        if peer is not None and hasattr(peer, "transport"):
            peer.transport.close()

    # The peer cannot take more: stop reading from our side until it drains.
    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()


class Client(Relay):
    """The accepted side: dials the target, holding what arrives until it is connected."""

    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.ensure_future(self.dial())

    def data_received(self, data: bytes) -> None:
        if hasattr(self, "peer"):
            super().data_received(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        if hasattr(self, "peer"):
            self.pass_eof()
        return True

    async def dial(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, peer = await loop.create_connection(lambda: Relay(self), LOOPBACK, self.target)
        except OSError:
            self.transport.close()
            return
        self.peer = peer
        for data in self.early:
            peer.transport.write(data)
        self.early.clear()
        if self.eof:
            self.pass_eof()


class UdpListener(asyncio.DatagramProtocol):
    """Datagrams from each client address go out through that client's own upstream socket."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sessions: dict[tuple, asyncio.Future] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's does not subclass it

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        session = self.sessions.get(addr)
        if session is None:
            loop = asyncio.get_running_loop()
            session = self.sessions[addr] = asyncio.ensure_future(loop.create_datagram_endpoint(
                lambda: Upstream(self.transport, addr), remote_addr=(LOOPBACK, self.target)))
        if session.done():
            session.result()[0].sendto(data)
        else:
            session.add_done_callback(lambda s: s.result()[0].sendto(data))


class Upstream(asyncio.DatagramProtocol):
    """A client's upstream socket: replies go back to the client through the listener."""

    def __init__(self, listener: asyncio.DatagramTransport, client: tuple) -> None:
        self.listener = listener
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.listener.sendto(data, self.client)


async def serve(forwards: Forwards) -> None:
    loop = asyncio.get_running_loop()
    for proto, listen, target in forwards:
        if proto == "tcp":
            await loop.create_server(functools.partial(Client, target), LOOPBACK, listen, backlog=4096)
        else:
            await loop.create_datagram_endpoint(functools.partial(UdpListener, target), local_addr=(LOOPBACK, listen))
    await until_terminated()


if __name__ == "__main__":
    uvloop.run(serve(parser(__doc__.splitlines()[0]).parse_args().forward))
