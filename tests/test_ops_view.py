"""What an operator sees of a running daemon: failures summed up in the log, the last reload's
outcome in the scrape, a control socket that keeps answering while metrics are formatted, and
a status table that says what its columns count."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastfwd import daemon as daemon_module, metrics
from fastfwd.config import Config
from fastfwd.daemon import Daemon, Overrides
from fastfwd.rules import Rule, RuleOptions
from fastfwd.unixclient import call

from helpers_control import (BAD_CONFIGS, EchoServer, UdpEcho, daemon, echo_roundtrip, fastfwd, free_port,
                             needs_engine, short_dir, udp_ask, wait_until)
from netutil import turned_away_how

pytestmark = [needs_engine, pytest.mark.timeout(60)]
_T = TypeVar("_T")


def run_in_process(rules: Iterable[Rule], scenario: Callable[[Daemon], _T]) -> _T:
    """A Daemon forwarding ``rules`` on this thread's event loop while ``scenario`` runs in a
    thread of its own (so it may block on the daemon's sockets); stopped afterwards."""
    async def main() -> _T:
        with short_dir() as sockets:
            d = Daemon(Config(), None, rules, Overrides(
                workers=1, state_dir=str(sockets / "state"), control_socket=str(sockets / "c.sock"),
                lease_socket=str(sockets / "l.sock")))
            run = asyncio.create_task(d.run())
            try:
                for _ in range(200):
                    if d._up or run.done():
                        break
                    await asyncio.sleep(0.05)
                assert d._up, "the daemon did not start"
                return await asyncio.to_thread(scenario, d)
            finally:
                d.stop()
                assert await run == 0
    return asyncio.run(asyncio.wait_for(main(), 50))


# -- 1. failures leave a trace in the log --------------------------------------------------------
SUMMARY = re.compile(r"^failures on rule '(?P<rule>.*)' in the last [\d.]+s: (?P<counts>.*)$")


def summaries(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, int]]]:
    """The failure summary lines logged so far, as (rule, {counter: rise})."""
    out = []
    for record in list(caplog.records):
        if (m := SUMMARY.match(record.getMessage())) is not None:
            assert record.levelno == logging.WARNING, record
            counts = dict(part.split(" +") for part in m["counts"].split(", "))
            out.append((m["rule"], {name: int(n) for name, n in counts.items()}))
    return out


def risen(caplog: pytest.LogCaptureFixture, rule: str) -> dict[str, int]:
    """What the summaries so far say ``rule``'s failure counters rose by, in all."""
    total: dict[str, int] = {}
    for name, counts in summaries(caplog):
        if name == rule:
            for counter, n in counts.items():
                total[counter] = total.get(counter, 0) + n
    return total


def turned_away(port: int) -> bool:
    """Accepted by the daemon, then closed on us without a byte."""
    return turned_away_how(port) in ("reset", "eof")


def test_failures_are_summed_up_in_the_log_per_rule_and_interval(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, echo: EchoServer) -> None:
    monkeypatch.setattr(daemon_module, "FAILURE_LOG_INTERVAL", 0.2, raising=False)
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))  # bound, not listening: every connect to it is refused
    rules = [Rule.parse(f"0:127.0.0.1:{refusing.getsockname()[1]}"),
             Rule.parse(f"0:127.0.0.1:{echo.port}", name="locked", options=RuleOptions(allow=("10.0.0.0/8",))),
             Rule.parse(f"0:127.0.0.1:{echo.port}", name="ok"),
             Rule.parse("0:vm9:53", "udp", name="dns")]  # a name nothing resolves: datagrams are dropped

    def scenario(d: Daemon) -> None:
        down, locked, ok, dns = (a.port for a in d.rules)
        label = f"tcp 127.0.0.1:{down} -> 127.0.0.1:{refusing.getsockname()[1]}"
        assert echo_roundtrip(ok, 100_000)
        assert all(turned_away(down) for _ in range(20))
        assert all(turned_away(locked) for _ in range(4))
        for _ in range(3):
            assert udp_ask(dns, b"lost", timeout=0.1) is None
        wanted = {label: {"connect_failed": 20}, "locked": {"refused": 4}, "dns": {"drops": 3}}
        wait_until(lambda: all(risen(caplog, rule) == counts for rule, counts in wanted.items()),
                   what=f"summaries of {wanted}")
        seen = len(summaries(caplog))
        time.sleep(1.0)  # five intervals without a failure: nothing more to say
        assert len(summaries(caplog)) == seen
        assert all(turned_away(down) for _ in range(5))
        wait_until(lambda: risen(caplog, label) == {"connect_failed": 25}, what="the next summary")
        assert summaries(caplog)[seen:] == [(label, {"connect_failed": 5})]
        assert {rule for rule, _ in summaries(caplog)} == set(wanted)  # never the rule without failures

    try:
        run_in_process(rules, scenario)
    finally:
        refusing.close()


# -- 2. the last reload's outcome in the scrape ---------------------------------------------------
def config_series(text: str) -> dict[str, float]:
    """The fastfwd_config_* samples of a scrape, by name (with the result label, if any)."""
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("fastfwd_config_"):
            assert family.documentation, family.name
            for sample in family.samples:
                name = sample.name + "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items()))
                out[name] = sample.value
    return out


def test_the_scrape_tells_how_the_last_reload_ended(tmp_path: Path, echo: EchoServer) -> None:
    port, new_port, mport = free_port(), free_port(), free_port()
    config = tmp_path / "f.toml"
    head = f'[control]\nmetrics_listen = "127.0.0.1:{mport}"\n'
    rule = f'[[forward]]\nlisten = {port}\nto = "127.0.0.1:{echo.port}"\n'
    config.write_text(head + rule)

    def replace(text: str) -> None:
        (tmp_path / "new.toml").write_text(text)
        os.replace(tmp_path / "new.toml", config)

    def scrapes(proc) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as response:
            http = config_series(response.read().decode())
        assert config_series(call(proc.control_socket, {"cmd": "metrics"})["text"]) == http
        return http

    started = time.time()
    with daemon(tmp_path, "-c", "f.toml") as proc:
        up = time.time()
        first = scrapes(proc)
        at = first.pop("fastfwd_config_last_reload_timestamp_seconds")
        assert started - 1 <= at <= up  # the file the daemon started with counts as loaded then
        assert first == {"fastfwd_config_last_reload_successful": 1.0,
                         "fastfwd_config_reloads_total{result=applied}": 0.0,
                         "fastfwd_config_reloads_total{result=rejected}": 0.0}

        rejected_after = time.time()
        replace(BAD_CONFIGS[0][0])
        proc.wait_log("rejected, rules unchanged")
        second = scrapes(proc)
        rejected_at = second.pop("fastfwd_config_last_reload_timestamp_seconds")
        assert rejected_at >= rejected_after - 1
        assert second == {"fastfwd_config_last_reload_successful": 0.0,
                          "fastfwd_config_reloads_total{result=applied}": 0.0,
                          "fastfwd_config_reloads_total{result=rejected}": 1.0}
        assert echo_roundtrip(port)  # the rules from before run

        replace(head + rule + f'[[forward]]\nlisten = {new_port}\nto = "127.0.0.1:{echo.port}"\n')
        proc.wait_log("applied: 1 added")
        assert echo_roundtrip(new_port)
        third = scrapes(proc)
        assert third.pop("fastfwd_config_last_reload_timestamp_seconds") >= rejected_at
        assert third == {"fastfwd_config_last_reload_successful": 1.0,
                         "fastfwd_config_reloads_total{result=applied}": 1.0,
                         "fastfwd_config_reloads_total{result=rejected}": 1.0}


def test_without_a_config_file_the_scrape_has_no_reload_metrics(tmp_path: Path, echo: EchoServer) -> None:
    with daemon(tmp_path, "-t", f"{free_port()}:127.0.0.1:{echo.port}") as proc:
        text = call(proc.control_socket, {"cmd": "metrics"})["text"]
    assert "fastfwd_accepted_total" in text and config_series(text) == {}


# -- 3. the control socket's metrics are formatted off the event loop -----------------------------
def test_the_control_socket_answers_while_its_metrics_are_being_formatted(
        monkeypatch: pytest.MonkeyPatch, echo: EchoServer) -> None:
    """Formatting many rules takes a while; meanwhile the event loop must serve the lease and
    control sockets. The formatter here waits for a status reply that only a free loop can give."""
    formatting, answered = threading.Event(), threading.Event()
    saw: list[bool] = []

    def slow_exposition(*args: object) -> bytes:
        formatting.set()
        saw.append(answered.wait(5))
        return b"fastfwd_formatted 1\n"
    monkeypatch.setattr(metrics, "exposition", slow_exposition)

    def scenario(d: Daemon) -> dict:
        path = d.control.control_socket
        replies: list[dict] = []
        asking = threading.Thread(target=lambda: replies.append(call(path, {"cmd": "metrics"}, timeout=20)))
        asking.start()
        try:
            assert formatting.wait(10), "the metrics were never formatted"
            status = call(path, {"cmd": "status"}, timeout=20)
            assert [r["state"] for r in status["rules"]] == ["active"]
            answered.set()
        finally:
            asking.join(20)
        return replies[0]

    reply = run_in_process([Rule.parse(f"0:127.0.0.1:{echo.port}")], scenario)
    assert reply == {"ok": True, "text": "fastfwd_formatted 1\n"}
    assert saw == [True], "the status reply waited for the metrics to be formatted"


# -- 4. fastfwd status says what its columns count ------------------------------------------------
def test_status_shows_bytes_for_both_protocols_and_datagrams_apart(tmp_path: Path, echo: EchoServer) -> None:
    udp_echo = UdpEcho(b"re:")
    tport, uport = free_port(), free_port(socket.SOCK_DGRAM)
    try:
        with daemon(tmp_path, "-t", f"{tport}:127.0.0.1:{echo.port}",
                    "-u", f"{uport}:127.0.0.1:{udp_echo.port}") as proc:
            assert echo_roundtrip(tport, 3000)
            for i in range(5):
                assert udp_ask(uport, b"x" * (100 + i)) == b"re:" + b"x" * (100 + i)
            sock = ["--socket", str(proc.control_socket)]

            def settled() -> bool:
                counters = [r["counters"] for r in json.loads(fastfwd("status", "--json", *sock).stdout)["rules"]]
                return counters[0]["active"] == 0 and counters[1]["datagrams_down"] == 5
            wait_until(settled, what="the counters to settle")
            table = fastfwd("status", *sock)
            as_json = json.loads(fastfwd("status", "--json", *sock).stdout)
    finally:
        udp_echo.close()
    assert table.returncode == 0, table.stderr
    header, tcp, udp = table.stdout.splitlines()[:3]
    columns = header.split()
    assert columns == ["NAME", "PROTO", "LISTEN", "TARGET", "ADDRESS", "STATE", "CONNS", "ACCEPTED",
                       "UP", "DOWN", "DGRAMS-UP", "DGRAMS-DOWN", "SESSIONS"]

    def cells(row: str) -> dict[str, str]:
        # Each column starts where its header does: a size ("2.9 KiB") holds a space.
        starts = [header.index(c) if i == 0 else header.index(" " + c) + 1 for i, c in enumerate(columns)]
        ends = [*starts[1:], None]
        return {c: row[s:e].strip() for c, s, e in zip(columns, starts, ends, strict=True)}
    up_bytes = sum(100 + i for i in range(5))
    assert {k: cells(tcp)[k] for k in columns[6:]} == {
        "CONNS": "0", "ACCEPTED": "1", "UP": "2.9 KiB", "DOWN": "2.9 KiB", "DGRAMS-UP": "-", "DGRAMS-DOWN": "-",
        "SESSIONS": "-"}
    assert {k: cells(udp)[k] for k in columns[6:]} == {
        "CONNS": "-", "ACCEPTED": "-", "UP": f"{up_bytes} B", "DOWN": f"{up_bytes + 5 * 3} B", "DGRAMS-UP": "5",
        "DGRAMS-DOWN": "5", "SESSIONS": "5"}  # udp_ask: a client socket each
    # --json is as it was: every counter, by its engine name
    tcp_json, udp_json = as_json["rules"]
    assert (udp_json["counters"]["bytes_up"], udp_json["counters"]["datagrams_up"]) == (up_bytes, 5)
    assert set(tcp_json["counters"]) == set(metrics.COUNTER_NAMES)
