"""The public API held to what a program embedding it may expect: misuse answered with an
exception of the documented type, another forwarder's rules never taken for one's own, a
forwarder left running neither forgotten nor cutting transfers so they look complete, and
the engine's type stub matching the compiled module."""
from __future__ import annotations

import ast
import asyncio
import gc
import inspect
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

import fastfwd
from fastfwd import _engine
from netutil import (TIMEOUT, TcpServer, child_env, closed_how, connect, echo_handler, echo_once, free_port_range,
                     make_rule, process_threads, read_line, run_async)
from test_api import echo_through


async def each_raises(calls: Iterable[Callable[[Any], object]], arg: object, error: type[Exception],
                      match: str) -> None:
    """Every call of ``calls`` (a coroutine function or not) with ``arg`` raises ``error``."""
    for call in calls:
        with pytest.raises(error, match=match):
            result = call(arg)
            if inspect.isawaitable(result):
                await result


def test_a_rule_of_another_forwarder_is_not_taken_for_one_of_its_own() -> None:
    """Each forwarder numbers its rules from 1: handed the other's rule, a forwarder read the
    counters of its own rule with that number, and ``remove`` took its own rule out of the
    engine while leaving it in the table."""
    async def main(server_port: int) -> None:
        async with fastfwd.Forwarder(workers=1) as a, fastfwd.Forwarder(workers=1) as b:
            ra, rb = await a.add(make_rule(server_port)), await b.add(make_rule(server_port))
            assert b.find(ra) is None
            await each_raises((b.counters, b.sessions, b.remove), ra, KeyError, "no such rule")
            for fw, rule, tag in ((a, ra, b"via a"), (b, rb, b"via b")):
                assert await asyncio.to_thread(echo_through, rule.port, tag) == tag
                await fw.settle()
                assert fw.counters(rule).bytes_up == len(tag)
            assert a.rules == [ra] and b.rules == [rb]

    with TcpServer(echo_handler) as server:
        run_async(main(server.port))


def test_something_other_than_a_rule_is_a_type_error() -> None:
    """A spec string where a Rule belongs raised AttributeError from deep inside (and ``apply``
    of a string read it character by character)."""
    spec = "0:127.0.0.1:9"
    with pytest.raises(TypeError, match="expected a fastfwd.Rule, got '0:127.0.0.1:9'"):
        fastfwd.Forwarder([spec])   # type: ignore[list-item]
    for hosts in ({5: "127.0.0.1"}, {"vm": 2130706433}):
        with pytest.raises(TypeError, match="hosts: expected a name and an address as strings"):
            fastfwd.Forwarder(hosts=hosts)   # type: ignore[dict-item]

    async def main() -> None:
        async with fastfwd.Forwarder(workers=1) as fw:
            await each_raises((fw.add, fw.remove, fw.apply, fw.counters, fw.sessions, fw.find), spec, TypeError,
                              "expected a fastfwd.Rule")
            with pytest.raises(TypeError, match="expected a fastfwd.Rule, got None"):
                await fw.apply([make_rule(9), None])     # type: ignore[list-item]
            with pytest.raises(TypeError, match="name: expected a string, got None"):
                await fw.resolve(None, "127.0.0.1")     # type: ignore[arg-type]
            with pytest.raises(TypeError, match="ip: expected a string or None, got 2130706433"):
                await fw.resolve("vm", 2130706433)      # type: ignore[arg-type]
            assert fw.rules == [] and fw.names == {}
    run_async(main())


def test_a_forwarder_that_is_not_running_says_so() -> None:
    """As documented: RuntimeError for any call on a forwarder not running, before it starts
    and after it closed, not KeyError as if only the rule were unknown."""
    rule = make_rule(9, listen_port=free_port_range(1))

    async def main() -> None:
        fw = fastfwd.Forwarder(workers=1)
        for _ in ("before start", "after close"):
            await each_raises((fw.counters, fw.sessions, fw.remove), rule, RuntimeError, "not running")
            assert fw.find(rule) is None
            async with fw:
                await fw.add(rule)
    run_async(main())


def test_async_with_on_a_running_forwarder_is_refused() -> None:
    """A nested ``async with`` of the same forwarder closed it when the inner block ended,
    under the outer one still using it."""
    async def main() -> None:
        async with fastfwd.Forwarder(workers=1) as fw:
            active = await fw.add(make_rule(9))
            with pytest.raises(RuntimeError, match="already running"):
                async with fw:
                    pass
            assert fw.find(active) is active
    run_async(main())


def test_repr_says_whether_it_runs() -> None:
    async def main() -> None:
        fw = fastfwd.Forwarder(workers=1)
        assert repr(fw) == "<fastfwd.Forwarder closed, workers=1>"
        async with fw:
            await fw.add(make_rule(9))
            assert repr(fw) == "<fastfwd.Forwarder running, workers=1, 1 rule>"
    run_async(main())


def test_the_lazily_imported_names_are_listed() -> None:
    """``dir(fastfwd)`` (and so completion in an interactive shell) missed Forwarder and the
    other names imported on first use."""
    assert set(fastfwd.__all__) <= set(dir(fastfwd))
    for name in fastfwd.__all__:
        getattr(fastfwd, name)


def test_a_forwarder_never_closed_warns_and_stops_when_collected() -> None:
    async def main() -> int:
        fw = fastfwd.Forwarder(workers=2)
        await fw.start()
        return (await fw.add(make_rule(9))).port

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        run_async(main())
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == [
        "unclosed <fastfwd.Forwarder running, workers=2, 1 rule>"]
    assert [name for name in process_threads() if name.startswith("fastfwd-w")] == []


# A forwarder run by an event loop in a daemon thread, as a program embedding it may do; it
# prints its port and exits when stdin closes, without closing the forwarder.
_LEFT_RUNNING = r"""
import asyncio, sys, threading
import fastfwd
fw, ready = fastfwd.Forwarder(workers=2), threading.Event()
async def start():
    await fw.start()
    print((await fw.add(fastfwd.Rule.parse(f"0:127.0.0.1:{sys.argv[1]}"))).port, flush=True)
def run():
    loop = asyncio.new_event_loop()
    loop.run_until_complete(start())
    ready.set()
    loop.run_forever()
threading.Thread(target=run, daemon=True).start()
ready.wait()
sys.stdin.read()
"""


@pytest.mark.parametrize("warnings_are", ["default", "error"])
def test_a_program_exiting_with_a_forwarder_running_resets_its_connections(warnings_are: str) -> None:
    """The kernel closing the sockets at exit sent both ends a FIN, which a cut transfer
    must not look like (as ``close`` has it). The forwarder's ResourceWarning turned into an
    error must not keep it from closing."""
    with TcpServer(echo_handler) as server:
        proc = subprocess.Popen([sys.executable, "-W", warnings_are, "-c", _LEFT_RUNNING, str(server.port)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=child_env())
        try:
            with connect(int(read_line(proc))) as client:
                assert echo_once(client, b"before exit") == b"before exit"
                proc.stdin.close()      # type: ignore[union-attr]
                assert proc.wait(TIMEOUT) == 0, proc.stderr.read()   # type: ignore[union-attr]
                assert closed_how(client) == "reset"
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()     # type: ignore[union-attr]
            proc.stderr.close()     # type: ignore[union-attr]


def _stub() -> dict[str, ast.FunctionDef | ast.AnnAssign]:
    tree = ast.parse(Path(_engine.__file__).with_name("_engine.pyi").read_text())
    (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Engine"]
    members: dict[str, ast.FunctionDef | ast.AnnAssign] = {}
    for node in [*cls.body, *tree.body]:
        if isinstance(node, ast.FunctionDef):
            members.setdefault(node.name, node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            members[node.target.id] = node
    return members


def _value(node: ast.expr) -> object:
    """A default as the stub writes it (``1 << 20``)."""
    return eval(compile(ast.Expression(node), "_engine.pyi", "eval"), {})


def test_the_engine_stub_matches_the_compiled_module() -> None:
    """Parameter names, kinds and defaults of every method, and which attributes are read-only."""
    stub = _stub()
    init = stub.pop("__init__")    # not introspectable: its keywords and defaults are given to it
    assert isinstance(init, ast.FunctionDef)
    given: dict[str, Any] = {a.arg: _value(d) for a, d in zip(init.args.args[1:], init.args.defaults, strict=True)}
    engine = _engine.Engine(**{**given, "workers": 1})
    try:
        assert (engine.pipe_size, engine.copy_buffer) == (given["pipe_size"], given["copy_buffer"])
        for name, node in stub.items():
            if isinstance(node, ast.AnnAssign) or any(
                    isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list):
                try:
                    setattr(engine, name, getattr(engine, name))
                    writable = True
                except AttributeError:
                    writable = False
                # A plain annotation tells a type checker the attribute may be assigned.
                assert writable == isinstance(node, ast.AnnAssign), name
                continue
            runtime = getattr(_engine.Engine, name, None) or getattr(_engine, name)
            params = [(p.name, p.kind.name, None if p.default is p.empty else p.default)
                      for p in inspect.signature(runtime).parameters.values()]
            args = node.args
            defaults = [None] * (len(args.args) - len(args.defaults)) + [_value(d) for d in args.defaults]
            kw_defaults = [None if d is None else _value(d) for d in args.kw_defaults]
            expected = ([(a.arg, "POSITIONAL_OR_KEYWORD", d) for a, d in zip(args.args, defaults, strict=True)]
                        + [(a.arg, "KEYWORD_ONLY", d) for a, d in zip(args.kwonlyargs, kw_defaults, strict=True)])
            assert params == expected, name
    finally:
        engine.close()


# The parent's side of the fork scripts below: it reaps the child within the timeout, or
# kills it, and prints which.
_REAP = r"""
import os, time

def reap(pid, timeout):
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            print("child hung", flush=True)
            return
        time.sleep(0.02)
    print("child exited", flush=True)
"""

# A forked child that drops its copy of a running forwarder, tries to use it and exits as a
# program normally does (sys.exit, atexit handlers run); the parent reaps it within TIMEOUT.
_FORKED = _REAP + r"""
import asyncio, sys
import fastfwd
fw = fastfwd.Forwarder(workers=2)
asyncio.run(fw.start())
pid = os.fork()
if pid == 0:
    try:
        asyncio.run(fw.add(fastfwd.Rule.parse("0:127.0.0.1:9")))
    except RuntimeError as exc:
        print("child:", exc, flush=True)
    del fw
    sys.exit(0)
reap(pid, float(sys.argv[1]))
asyncio.run(fw.close())
"""


def test_a_forked_child_sees_the_forwarder_closed_and_exits() -> None:
    """The workers do not follow a fork: the child's copy of the engine waited on them for
    ever, when used and when freed at its exit."""
    result = subprocess.run([sys.executable, "-c", _FORKED, str(TIMEOUT)], capture_output=True, text=True,
                            timeout=3 * TIMEOUT, env=child_env(), check=False)
    assert (result.returncode, result.stdout) == (
        0, "child: the forwarder is not running (use 'async with' or await start())\nchild exited\n"), result.stderr


# A child forked while a drain runs exits as a program normally does: asyncio.run cancels the
# drain, whose engine (the parent's: its workers did not follow) must not be closed in the child.
_FORKED_DURING_DRAIN = _REAP + r"""
import asyncio, socket, sys
import fastfwd

async def main(timeout, server_port):
    fw = fastfwd.Forwarder(workers=2)
    await fw.start()
    rule = await fw.add(fastfwd.Rule.parse(f"0:127.0.0.1:{server_port}"))
    live = socket.create_connection(("127.0.0.1", rule.port), timeout=timeout)
    live.sendall(b"ping")
    assert live.recv(4) == b"ping"
    draining = asyncio.ensure_future(fw.close(drain=60))
    await asyncio.sleep(0.1)
    pid = os.fork()
    if pid == 0:
        sys.exit(0)
    reap(pid, timeout)
    live.close()    # the parent's drain goes on: it ends once the connection has
    await asyncio.wait_for(draining, timeout)
    print("drained", flush=True)

asyncio.run(main(float(sys.argv[1]), int(sys.argv[2])))
"""


def test_a_child_forked_during_a_drain_exits() -> None:
    with TcpServer(echo_handler) as server:
        result = subprocess.run([sys.executable, "-c", _FORKED_DURING_DRAIN, str(TIMEOUT), str(server.port)],
                                capture_output=True, text=True, timeout=3 * TIMEOUT, env=child_env(), check=False)
    assert (result.returncode, result.stdout) == (0, "child exited\ndrained\n"), result.stderr


def test_close_during_a_drain_ends_it() -> None:
    """``close()`` while another task drains: it returned at once, the workers and the
    connections it promises to have ended still there until the drain's deadline."""
    async def main(server_port: int) -> None:
        fw = fastfwd.Forwarder(workers=2)
        await fw.start()
        rule = await fw.add(make_rule(server_port))
        with await asyncio.to_thread(connect, rule.port) as live:
            assert await asyncio.to_thread(echo_once, live, b"before") == b"before"
            draining = asyncio.ensure_future(fw.close(drain=3 * TIMEOUT))
            await asyncio.sleep(0)      # the drain has begun: the forwarder is detached
            assert repr(fw) == "<fastfwd.Forwarder closed, workers=2>"
            await fw.close()
            assert [name for name in process_threads() if name.startswith("fastfwd-w")] == []
            assert await asyncio.to_thread(closed_how, live) == "reset"
            await asyncio.wait_for(draining, TIMEOUT)

    with TcpServer(echo_handler) as server:
        run_async(main(server.port))


def test_an_active_rule_is_read_only() -> None:
    """ActiveRule's fields were plain attributes: a program that set one (``rule``, to the
    rule it meant next) made the forwarder lose track of it: ``apply`` then failed half done
    on its own table, with a bare KeyError."""
    async def main() -> None:
        async with fastfwd.Forwarder(workers=1) as fw:
            active = await fw.add(make_rule(9))
            for name in ("rule", "id", "port", "target_ip", "installed"):
                with pytest.raises(AttributeError):
                    setattr(active, name, getattr(active, name))
            with pytest.raises(AttributeError):
                active.rule = make_rule(10, listen_port=free_port_range(1))     # type: ignore[misc]
            assert (await fw.apply([])).removed == [active]
            assert fw.rules == [] and not active.installed
    run_async(main())



def test_resolve_takes_an_address_however_it_is_spelled() -> None:
    """A name given the address it has, spelled another way ([0:0::1] for [::1]), was a new
    address: its rules re-pointed, resetting their live connections under on_retarget = close."""
    async def main() -> None:
        async with fastfwd.Forwarder(workers=1) as fw:
            active = await fw.add(make_rule(9).with_target("svc"))
            assert await fw.resolve("svc", "::1") == [active]
            assert await fw.resolve("svc", "0:0::1") == []
            assert (active.target_ip, fw.names) == ("::1", {"svc": "::1"})

    run_async(main())
