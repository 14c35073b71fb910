"""What the Prometheus exposition says, checked the way an operator meets it: parsed as
Prometheus parses it, and every number compared with the traffic the test really sent (bytes
compared at the far end), across reloads, and against ``fastfwd status``."""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import resource
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastfwd import metrics
from fastfwd.unixclient import call

from helpers_control import EchoServer, UdpEcho as TaggedUdpEcho, daemon, echo_roundtrip, fastfwd, free_port, udp_ask
from netutil import (Received, TcpServer, UdpEcho, closed_how, connect, datagram, exchange, exchange_handler,
                     free_port_range, payload, refusing_port, udp_roundtrip, udp_socket, wait_for)

pytest.importorskip("fastfwd._engine", reason="the data-plane engine is not built")
import fastfwd as ff  # noqa: E402

LABELS = {"rule", "proto", "listen", "target"}


Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def series(text: str) -> Series:
    """The exposition as {(sample name, labels): value}, checking on the way what every
    scraper relies on: HELP and TYPE for each family, ``_total`` on counters, one label set,
    no series twice."""
    out: Series = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith(("process_", "fastfwd_config_")):
            continue  # the process's own and the config file's, without rule labels (see the fd test
            # below, and test_ops_view for the reload outcome)
        assert family.type in ("counter", "gauge"), family
        assert family.documentation, f"{family.name} has no HELP"
        for sample in family.samples:
            assert set(sample.labels) == LABELS, sample
            if family.type == "counter":
                assert sample.name == family.name + "_total", sample
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in out, f"{sample.name} twice for {sample.labels}"
            out[key] = sample.value
    return out


def parse(text: str) -> dict[str, dict[str, float]]:
    """The exposition as {rule label: {sample name: value}}."""
    rules: dict[str, dict[str, float]] = {}
    for (name, labels), value in series(text).items():
        rules.setdefault(dict(labels)["rule"], {})[name] = value
    return rules


def scrape(fwd) -> dict[str, dict[str, float]]:
    return parse(metrics.render(fwd.fw).decode())


def settled(fwd, rule: str, want: dict[str, float]) -> dict[str, float]:
    """The rule's metrics once those in ``want`` have its values: a worker counts what it
    sent a moment after the peer may have read it. Fails, showing the difference, if they
    never do; the caller then checks the rest exactly."""
    m: dict[str, float] = {}

    def reached() -> bool:
        m.update(scrape(fwd)[rule])
        return all(m[k] == v for k, v in want.items())
    with contextlib.suppress(AssertionError):
        wait_for(reached, what=f"{rule}: {want}")
    assert {k: m[k] for k in want} == want
    return m


def reset_at_once(port: int) -> bool:
    """Is a connection to ``port`` reset before anything is sent (maybe while connecting)?"""
    try:
        with connect(port) as sock:
            return closed_how(sock) == "reset"
    except ConnectionResetError:
        return True


def test_the_exposition_parses_and_every_help_says_what_it_counts(fwd) -> None:
    """Rule names with a quote and a backslash, an IPv6 rule and a pending one: the labels
    come back exactly as given, and each HELP tells an operator more than the metric's name."""
    quoted = 'edge "a"\\b'
    with TcpServer(exchange_handler(b"")) as server:
        fwd.add(ff.Rule.parse(f"0:127.0.0.1:{server.port}", "tcp", name=quoted))
        v6 = fwd.add(ff.Rule.parse("[::1]:0:[::1]:9", "udp"))
        fwd.add(ff.Rule.parse("0:vm1:22", "tcp", name="later"))
        text = metrics.render(fwd.fw).decode()
    rules = parse(text)
    assert set(rules) == {quoted, f"udp [::1]:{v6.port} -> [::1]:9", "later"}
    assert rules["later"]["fastfwd_rule_pending"] == 1
    assert rules[quoted]["fastfwd_rule_pending"] == 0
    for family in text_string_to_metric_families(text):
        words = set(re.findall(r"[a-z]+", family.documentation.lower()))
        said = set(family.name.removeprefix("fastfwd_").split("_")) | {"per", "rule"}
        assert words - said, f"the HELP of {family.name} only repeats its name: {family.documentation!r}"


def test_the_scrape_shows_the_fds_open_against_the_limit(fwd) -> None:
    """Fds are what a forwarder runs out of first (a listener then refuses and pauses): the
    scrape carries the process's open fds and their limit, so an alert can come before."""
    def process() -> dict[str, float]:
        return {f.name: f.samples[0].value for f in text_string_to_metric_families(metrics.render(fwd.fw).decode())
                if f.name.startswith("process_")}
    before = process()
    socks = [socket.socket() for _ in range(50)]
    try:
        after = process()
    finally:
        for sock in socks:
            sock.close()
    assert after["process_open_fds"] - before["process_open_fds"] == 50
    assert after["process_max_fds"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert after["process_start_time_seconds"] > 0


def test_tcp_counters_are_the_connections_and_bytes_sent(fwd) -> None:
    sizes = [(0, 10), (1000, 0), (70_000, 300_000), (3, 5)]  # both sides of the splice threshold
    with TcpServer(exchange_handler(b"")) as server:
        # One connection at a time, each answered with its own bytes.
        rule = fwd.add(ff.Rule.parse(f"0:127.0.0.1:{server.port}", "tcp", name="web"))
        for up, down in sizes:
            server.handler = exchange_handler(payload(down, seed=2))
            got = exchange(rule.port, payload(up, seed=1))
            assert got == Received.of(payload(down, seed=2))
            assert server.result().nbytes == up
    n, up, down = len(sizes), sum(u for u, _ in sizes), sum(d for _, d in sizes)
    # A close is counted after the bytes, so once every connection is closed all are in.
    m = settled(fwd, "web", {"fastfwd_accepted_total": n, "fastfwd_active": 0})
    assert (m["fastfwd_refused_total"], m["fastfwd_connect_failed_total"]) == (0, 0)
    assert (m["fastfwd_bytes_up_total"], m["fastfwd_bytes_down_total"]) == (up, down)
    assert m["fastfwd_bytes_spliced_total"] + m["fastfwd_bytes_copied_total"] == up + down
    assert m["fastfwd_bytes_spliced_total"] > 0  # 300 kB down went past the threshold


def test_refused_and_connect_failed_count_each_client_once(fwd) -> None:
    """A client the allow list turns away is refused (never accepted); one whose target
    refuses is accepted, then counted as a failed connect. Each sees a reset."""
    with TcpServer(exchange_handler(b"")) as server, refusing_port() as dead:
        fenced = fwd.add(ff.Rule.parse(f"0:127.0.0.1:{server.port}", "tcp", name="fenced",
                                       options=ff.RuleOptions(allow=("10.0.0.0/8",))))
        broken = fwd.add(ff.Rule.parse(f"0:127.0.0.1:{dead.getsockname()[1]}", "tcp", name="broken"))
        for rule in (fenced, broken):
            for _ in range(7):
                assert reset_at_once(rule.port)
        assert server.accepted == 0
    m = settled(fwd, "fenced", {"fastfwd_refused_total": 7})
    assert (m["fastfwd_accepted_total"], m["fastfwd_connect_failed_total"], m["fastfwd_bytes_up_total"]) == (0, 0, 0)
    m = settled(fwd, "broken", {"fastfwd_connect_failed_total": 7, "fastfwd_active": 0})
    assert (m["fastfwd_accepted_total"], m["fastfwd_refused_total"]) == (7, 0)


def test_udp_counters_are_the_sessions_and_datagrams_sent(fwd) -> None:
    sizes = [1, 100, 1400, 9000]
    with UdpEcho() as echo, udp_socket() as a, udp_socket() as b, udp_socket() as outsider:
        rule = fwd.add(ff.Rule.parse(f"0:127.0.0.1:{echo.port}", "udp", name="dns"))
        fenced = fwd.add(ff.Rule.parse(f"0:127.0.0.1:{echo.port}", "udp", name="fenced",
                                       options=ff.RuleOptions(allow=("10.0.0.0/8",))))
        for client in (a, b):
            for seq, size in enumerate(sizes):
                data = datagram(seq, size)
                assert udp_roundtrip(client, ("127.0.0.1", rule.port), data, tries=1, wait=5) == data
        for seq in range(3):
            outsider.sendto(datagram(seq, 50), ("127.0.0.1", fenced.port))
        assert echo.total == 2 * len(sizes)
        n, nbytes = 2 * len(sizes), 2 * sum(sizes)
        m = settled(fwd, "dns", {"fastfwd_datagrams_up_total": n, "fastfwd_datagrams_down_total": n,
                                 "fastfwd_bytes_up_total": nbytes, "fastfwd_bytes_down_total": nbytes})
        assert (m["fastfwd_sessions_created_total"], m["fastfwd_sessions_active"]) == (2, 2)
        assert (m["fastfwd_drops_total"], m["fastfwd_refused_total"], m["fastfwd_truncated_total"]) == (0, 0, 0)
        m = settled(fwd, "fenced", {"fastfwd_refused_total": 3})
        assert (m["fastfwd_sessions_created_total"], m["fastfwd_datagrams_up_total"]) == (0, 0)


def test_across_reloads_no_counter_goes_back_while_its_series_lasts(fwd) -> None:
    """A rule kept, one removed and later added again under the same name, one re-pointed:
    a counter seen in two scrapes in a row never shrinks (Prometheus would read that as a
    reset and count the whole value again). The re-added rule's series is gone from the
    scrape in between and starts again from 0; the re-pointed rule's counters go on under
    its new target label."""
    with TcpServer(exchange_handler(b"")) as one, TcpServer(exchange_handler(b"")) as two:
        ports = {name: free_port() for name in ("kept", "gone", "moved")}

        def rules(moved_to: int, gone: bool = True) -> list[ff.Rule]:
            targets = {"kept": one.port, "gone": one.port, "moved": moved_to}
            return [ff.Rule.parse(f"{ports[n]}:127.0.0.1:{targets[n]}", "tcp", name=n)
                    for n in ports if gone or n != "gone"]

        def traffic(names: tuple[str, ...]) -> None:
            for name in names:
                assert exchange(ports[name], payload(5000)) == Received.of(b"")
            wait_for(lambda: all(scrape(fwd)[n]["fastfwd_active"] == 0 for n in names), what="connections closed")

        fwd.apply(rules(one.port))
        traffic(("kept", "gone", "moved"))
        scrapes = [series(metrics.render(fwd.fw).decode())]
        fwd.apply(rules(two.port, gone=False))
        traffic(("kept", "moved"))
        scrapes.append(series(metrics.render(fwd.fw).decode()))
        fwd.apply(rules(two.port))
        traffic(("kept", "gone", "moved"))
        scrapes.append(series(metrics.render(fwd.fw).decode()))
        assert two.accepted == 2
    for before, after in itertools.pairwise(scrapes):
        for key in before.keys() & after.keys():
            if key[0].endswith("_total"):
                assert after[key] >= before[key], f"{key} went from {before[key]} to {after[key]}"
    last = parse(metrics.render(fwd.fw).decode())
    assert "gone" not in {dict(k[1])["rule"] for k in scrapes[1]}
    assert (last["kept"]["fastfwd_accepted_total"], last["gone"]["fastfwd_accepted_total"],
            last["moved"]["fastfwd_accepted_total"]) == (3, 1, 3)
    assert last["kept"]["fastfwd_bytes_up_total"] == 3 * 5000


def test_a_failed_reload_leaves_the_counters_of_the_rules_it_would_remove(fwd) -> None:
    with TcpServer(exchange_handler(b"")) as server:
        base = free_port_range(2)
        old = fwd.add(ff.Rule.parse(f"{base}:127.0.0.1:{server.port}", "tcp", name="old"))
        assert exchange(old.port, payload(1000)) == Received.of(b"")
        settled(fwd, "old", {"fastfwd_accepted_total": 1, "fastfwd_active": 0})
        wider = ff.Rule.parse(f"{base}-{base + 1}:127.0.0.1:{server.port}-{server.port + 1}", "tcp", name="wider")
        # The wider rule's second port is taken: the reload fails and must change nothing.
        with socket.create_server(("127.0.0.1", base + 1)), pytest.raises(OSError):
            fwd.apply([wider])
        assert scrape(fwd)["old"]["fastfwd_accepted_total"] == 1


def test_status_control_and_http_agree_and_a_failing_target_does_not_flood_the_log(tmp_path: Path) -> None:
    """Through the daemon as an operator runs it: 10,000 connections to a refusing target are
    each counted, ``fastfwd status``, the control socket and the HTTP endpoint give the same
    numbers, and the log does not grow a line per failure."""
    web, dns, broken, mport = free_port(), free_port(socket.SOCK_DGRAM), free_port(), free_port()
    failures = 10_000
    with contextlib.closing(EchoServer()) as echo, contextlib.closing(TaggedUdpEcho(b"re:")) as udp, \
            refusing_port() as dead:
        (tmp_path / "f.toml").write_text(
            f'[[forward]]\nname = "web"\nlisten = {web}\nto = "127.0.0.1:{echo.port}"\n'
            f'[[forward]]\nname = "dns"\nproto = "udp"\nlisten = {dns}\nto = "127.0.0.1:{udp.port}"\n'
            f'[[forward]]\nname = "broken"\nlisten = {broken}\nto = "127.0.0.1:{dead.getsockname()[1]}"\n'
            f'[control]\nmetrics_listen = "127.0.0.1:{mport}"\n')
        with daemon(tmp_path, "-c", "f.toml") as proc:
            lines = len(proc.log().splitlines())
            for size in (1, 70_000):
                assert echo_roundtrip(web, size)
            for n in range(3):
                assert udp_ask(dns, b"q%d" % n) == b"re:q%d" % n
            for _ in range(failures):
                assert reset_at_once(broken)

            def http() -> str:
                with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as response:
                    return response.read().decode()
            wait_for(lambda: (m := parse(http()))["broken"]["fastfwd_connect_failed_total"] == failures
                     and m["broken"]["fastfwd_active"] == 0 and m["web"]["fastfwd_active"] == 0
                     and m["dns"]["fastfwd_datagrams_down_total"] == 3,
                     what="every connection counted and closed")
            over_http = parse(http())
            over_control = parse(call(proc.control_socket, {"cmd": "metrics"})["text"])
            status = fastfwd("status", "--json", "--socket", str(proc.control_socket))
            assert status.returncode == 0, status.stderr
            grown = proc.log().splitlines()[lines:]
    assert over_http == over_control
    assert over_http["broken"]["fastfwd_accepted_total"] == failures
    assert over_http["web"]["fastfwd_bytes_up_total"] == over_http["web"]["fastfwd_bytes_down_total"] == 70_001
    assert over_http["dns"]["fastfwd_datagrams_down_total"] == 3
    for rule in json.loads(status.stdout)["rules"]:
        for name, value in rule["counters"].items():
            sample = f"fastfwd_{name}" + ("" if name in ("active", "sessions_active") else "_total")
            # The other protocol's counters have no series for this rule (and are 0 in status).
            assert over_http[rule["name"]].get(sample, 0) == value, (rule["name"], name)
        assert over_http[rule["name"]]["fastfwd_rule_pending"] == (rule["state"] == "pending")
    assert len(grown) < 10, "\n".join(grown[:20])


def test_log_lines_quote_the_rule_name(fwd, caplog: pytest.LogCaptureFixture) -> None:
    name = "db: primary"
    with caplog.at_level(logging.INFO, logger="fastfwd"):
        rule = fwd.add(ff.Rule.parse("0:127.0.0.1:9", "tcp", name=name))
        fwd.remove(rule)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all(f"'{name}'" in line or f'"{name}"' in line for line in lines), lines



def receive_buffer(local_port: int | None = None, peer_port: int | None = None) -> int:
    """The receive buffer of the one UDP socket on 127.0.0.1 with that local or peer port,
    as ``ss`` reports it (skmem's rb)."""
    out = subprocess.run(["ss", "-uanmH"], capture_output=True, text=True, check=True, timeout=10).stdout
    found = [int(m["rb"]) for m in re.finditer(
        r"127\.0\.0\.1:(?P<local>\d+)\s+\S+:(?P<peer>\d+|\*)\s+skmem:\(r\d+,rb(?P<rb>\d+)", out)
        if (local_port is None or m["local"] == str(local_port)) and (peer_port is None or m["peer"] == str(peer_port))]
    assert len(found) == 1, out
    return found[0]


def test_a_udp_sessions_socket_takes_a_burst_of_replies_as_the_listener_takes_requests(fwd) -> None:
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2)")
    with UdpEcho() as echo, udp_socket() as client:
        rule = fwd.add(ff.Rule.parse(f"0:127.0.0.1:{echo.port}", "udp", name="burst"))
        assert udp_roundtrip(client, ("127.0.0.1", rule.port), b"hello", tries=1, wait=5) == b"hello"
        assert receive_buffer(peer_port=echo.port) >= receive_buffer(local_port=rule.port)


def test_a_renamed_rule_goes_on_counting_under_its_new_name_only(fwd) -> None:
    with TcpServer(exchange_handler(b"")) as server:
        port = free_port()
        fwd.apply([ff.Rule.parse(f"{port}:127.0.0.1:{server.port}", "tcp", name="old")])
        assert exchange(port, payload(1000)) == Received.of(b"")
        settled(fwd, "old", {"fastfwd_accepted_total": 1, "fastfwd_active": 0})
        fwd.apply([ff.Rule.parse(f"{port}:127.0.0.1:{server.port}", "tcp", name="new")])
        assert exchange(port, payload(1000)) == Received.of(b"")
        settled(fwd, "new", {"fastfwd_accepted_total": 2, "fastfwd_bytes_up_total": 2000, "fastfwd_active": 0})
        assert set(parse(metrics.render(fwd.fw).decode())) == {"new"}


def test_a_lease_moving_a_vm_keeps_the_rules_series(fwd) -> None:
    """docs/metrics.md: the ``target`` label of a lease-driven rule is the name as written, so
    the lease moving its VM to another address ends no series: the counters go on under the
    same labels. (Only an edited ``to`` starts a series under a new target.)"""
    with TcpServer(exchange_handler(b""), host="127.0.0.1") as one, \
            TcpServer(exchange_handler(b""), host="127.0.0.2", port=one.port) as two:
        rule = fwd.add(ff.Rule.parse(f"0:vm1:{one.port}", "tcp", name="web"))
        fwd.resolve("vm1", "127.0.0.1")
        assert exchange(rule.port, payload(1000)) == Received.of(b"")
        settled(fwd, "web", {"fastfwd_accepted_total": 1, "fastfwd_active": 0})
        before = {key for key in series(metrics.render(fwd.fw).decode()) if dict(key[1])["rule"] == "web"}
        fwd.resolve("vm1", "127.0.0.2")
        assert exchange(rule.port, payload(2000)) == Received.of(b"")
        m = settled(fwd, "web", {"fastfwd_accepted_total": 2, "fastfwd_active": 0})
        after = {key for key in series(metrics.render(fwd.fw).decode()) if dict(key[1])["rule"] == "web"}
        assert (one.accepted, two.accepted) == (1, 1)
    assert after == before
    assert {dict(labels)["target"] for _, labels in after} == {f"vm1:{one.port}"}
    assert m["fastfwd_bytes_up_total"] == 3000
