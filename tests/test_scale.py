"""A VM host at scale: 2,000 rules that name 400 VMs, a storm of lease events from concurrent
hook processes and clients with snapshots and a reload between them, then every rule checked
against the final lease table (status, real connections, the state file, a restart); the
daemon's fds through 10 reloads of the 2,000-rule file; and the work one lease event costs."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fastfwd.config import parse_config
from fastfwd.daemon import Daemon, Overrides
from fastfwd.forwarder import Forwarder
from fastfwd.leases import STATE_FILE, Lease, LeaseTable, resolve_names
from fastfwd.rules import Rule

from helpers_control import REPO, DaemonProcess, EchoServer, daemon, fastfwd, needs_engine
from netutil import free_port_range, open_fds, recv_exact, run_async, turned_away, wait_for

pytestmark = [needs_engine, pytest.mark.timeout(120)]

VMS = 400
RULES = 2000
GROUPS = 12          # VMs are split into groups whose events never touch another group's
HOOK_GROUPS = 3      # of which these groups' events go through hook processes
SPARES = 4           # MACs per group that no rule names (restored VMs, new guests)


def mac(i: int) -> str:
    return f"52:54:00:00:{i >> 8:02x}:{i & 255:02x}"


def vm_ip(v: int, gen: int) -> str:
    """VM ``v``'s address in generation ``gen``: loopback, so real traffic is cheap."""
    return f"127.{2 + gen}.{v // 250}.{v % 250 + 1}"


class Model:
    """What the lease table must hold after the events, by the documented rules: an address
    handed to a new MAC leaves the old one; a ``del`` counts only for the address held; a name
    two leases claim goes to the later claim (an unchanged ``old`` claims nothing anew; the
    claims of one snapshot are equal, and the greater MAC wins among them)."""

    def __init__(self) -> None:
        self.leases: dict[str, tuple[str, str | None, int]] = {}   # mac -> (ip, hostname, claim)
        self.clock = 0

    def event(self, event: str, m: str, ip: str, host: str | None) -> None:
        held = self.leases.get(m)
        if event == "del":
            if held is not None and held[0] == ip:
                del self.leases[m]
            return
        if held is not None and held[:2] == (ip, host):
            return
        self._take(ip)
        self.clock += 1
        self.leases[m] = (ip, host, self.clock)

    def _take(self, ip: str) -> None:
        for other, (held_ip, _, _) in list(self.leases.items()):
            if held_ip == ip:
                del self.leases[other]

    def snapshot(self, entries: dict[str, tuple[str, str | None]]) -> None:
        self.clock += 1
        self.leases = {m: self.leases[m] if self.leases.get(m, (None, None))[:2] == e else (*e, self.clock)
                       for m, e in entries.items()}

    def names(self, hosts: dict[str, str]) -> dict[str, str]:
        best: dict[str, tuple[int, str, str]] = {}
        for m, (ip, host, claim) in self.leases.items():
            if host is not None and (claim, m) > best.get(host, (-1, "", ""))[:2]:
                best[host] = (claim, m, ip)
        names = {host: ip for host, (_, _, ip) in best.items()}
        for name, m in hosts.items():
            names.pop(name, None)
            if m in self.leases:
                names[name] = self.leases[m][0]
        return names


def storm_script(g: int, model: Model, rng: random.Random, count: int) -> list[tuple[str, str, str, str | None]]:
    """``count`` events for group ``g``, applied to ``model`` in order: new leases, refreshes,
    moves (a VM restored from a snapshot with a new address), stale and current ``del``s, a
    host name moving to another MAC or claimed by two, an address handed to a new MAC."""
    vms = [v for v in range(VMS) if v % GROUPS == g]
    macs = [mac(v) for v in vms] + [mac(VMS + g * SPARES + k) for k in range(SPARES)]
    events = []
    for _ in range(count):
        m = rng.choice(macs)
        held = model.leases.get(m)
        kind = rng.choice(["add", "add", "old", "move", "del", "stale-del", "name", "steal"])
        v = rng.choice(vms)
        if kind in ("old", "del") and held is not None:
            ev = (kind, m, held[0], held[1])
        elif kind == "stale-del":
            ev = ("del", m, vm_ip(v, rng.randrange(4)), None)
        elif kind == "name":  # another VM's host name, so two MACs may claim it
            ev = ("add", m, held[0] if held else vm_ip(v, 3), f"vm{rng.choice(vms)}")
        elif kind == "steal" and model.leases:  # an address some MAC of the group holds
            owner = rng.choice([o for o in macs if o in model.leases] or [m])
            ev = ("add", m, model.leases.get(owner, (vm_ip(v, 0),))[0], f"vm{v}")
        else:
            ev = ("add", m, vm_ip(v, rng.randrange(4)), f"vm{v}")
        model.event(*ev)
        events.append(ev)
    return events


def config_text(base: int, port: int, hosts: dict[str, str], retarget: int = 0) -> str:
    """RULES rules on ports base..: four in five on a VM's DHCP host name, one on a [hosts]
    entry by MAC; ``retarget`` rules move to the next VM's name."""
    rules = [f'[[forward]]\nlisten = {base + r}\nto = "{name}:{port}"\n' for r, name in enumerate(rule_names(retarget))]
    return "".join([*rules, *(f'[hosts.{name}]\nmac = "{m}"\n' for name, m in hosts.items())])


def rule_names(retarget: int = 0) -> list[str]:
    """Each rule's target name."""
    return [f"h{(r + (r < retarget)) % VMS}" if r % 5 == 0 else f"vm{(r + (r < retarget)) % VMS}"
            for r in range(RULES)]


def write_atomically(path: Path, text: str) -> None:
    """As editors save: the watcher never sees a file half written."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class LeaseClient:
    """One connection to the lease socket; each message waits for its reply."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.replies = self.sock.makefile("rb")

    def send(self, message: dict) -> dict:
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        return json.loads(self.replies.readline())

    def close(self) -> None:
        self.replies.close()
        self.sock.close()


def run_group(proc: DaemonProcess, events: list, by_hook: bool, failures: list[str]) -> None:
    """Send one group's events in order: through hook processes, or one client connection."""
    if by_hook:
        env = {**os.environ, "FASTFWD_LEASE_SOCKET": str(proc.lease_socket),
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        for event, m, ip, host in events:
            result = subprocess.run([sys.executable, "-m", "fastfwd.hook", event, m, ip, *([host] if host else [])],
                                    env=env, capture_output=True, text=True, timeout=30)
            if result.returncode != 0:
                failures.append(result.stderr)
        return
    client = LeaseClient(proc.lease_socket)
    try:
        for event, m, ip, host in events:
            reply = client.send({"event": event, "mac": m, "ip": ip, "hostname": host})
            if not reply.get("ok"):
                failures.append(str(reply))
    finally:
        client.close()


def storm(proc: DaemonProcess, model: Model, rng: random.Random, per_group: int, during=None) -> None:
    scripts = [storm_script(g, model, rng, per_group // 4 if g < HOOK_GROUPS else per_group) for g in range(GROUPS)]
    failures: list[str] = []
    threads = [threading.Thread(target=run_group, args=(proc, script, g < HOOK_GROUPS, failures))
               for g, script in enumerate(scripts)]
    for t in threads:
        t.start()
    if during is not None:
        during()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads) and not failures, failures[:3]


def status(proc: DaemonProcess) -> dict:
    result = fastfwd("status", "--json", "--socket", str(proc.control_socket))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def check_rules(proc: DaemonProcess, base: int, names: dict[str, str], targets: list[str]) -> None:
    """Every rule's target address, as status reports it, is its name's in ``names``."""
    rules = {int(r["listen"].rsplit(":", 1)[1]) - base: r for r in status(proc)["rules"]}
    assert len(rules) == RULES
    wrong = [(r, targets[r], rules[r]["target_ip"], names.get(targets[r])) for r in range(RULES)
             if rules[r]["target_ip"] != names.get(targets[r])
             or rules[r]["state"] != ("pending" if targets[r] not in names else "active")]
    assert not wrong, f"{len(wrong)} rule(s) wrong, e.g. (rule, name, status, expected): {wrong[:5]}"


def check_traffic(base: int, port: int, names: dict[str, str], targets: list[str], rng: random.Random) -> None:
    """Through a sample of rules: the bytes reach the VM the name resolves to (its echo server
    says which) and come back whole; a sample of pending rules turns connections away."""
    live = [r for r in range(RULES) if targets[r] in names]
    sample = rng.sample(live, 24)
    servers = {ip: EchoServer(ip, greeting=ip.encode().ljust(16), port=port)
               for ip in {names[targets[r]] for r in sample}}
    try:
        for r in sample:
            data = os.urandom(rng.randrange(1, 200_000))
            with socket.create_connection(("127.0.0.1", base + r), timeout=10) as s:
                assert recv_exact(s, 16).rstrip() == names[targets[r]].encode(), f"rule {r} ({targets[r]})"
                sender = threading.Thread(target=s.sendall, args=(data,))
                sender.start()
                assert recv_exact(s, len(data)) == data
                sender.join(10)
    finally:
        for server in servers.values():
            server.close()
    pending = [r for r in range(RULES) if targets[r] not in names]
    for r in rng.sample(pending, min(4, len(pending))):
        assert turned_away(base + r), f"pending rule {r} ({targets[r]}) accepted a connection"


def saved(tmp: Path) -> dict[str, tuple[str, str | None]]:
    return {lease.mac: (lease.ip, lease.hostname) for lease in LeaseTable.restore(tmp / "state" / STATE_FILE)}


def write_lease_file(path: Path, entries: dict[str, tuple[str, str | None]]) -> None:
    path.write_text("".join(f"{2_000_000_000} {m} {ip} {host or '*'} *\n" for m, (ip, host) in entries.items()))


def test_a_lease_storm_over_2000_named_rules_ends_where_the_table_says(tmp_path: Path) -> None:
    rng = random.Random(20261123)
    base, port = free_port_range(RULES), free_port_range(1)
    hosts = {f"h{v}": mac(v) for v in range(VMS)}
    cfg = tmp_path / "fastfwd.toml"
    cfg.write_text(config_text(base, port, hosts))
    model = Model()
    with daemon(tmp_path, "-c", str(cfg), "--workers", "1") as proc:
        storm(proc, model, rng, per_group=60)
        # A snapshot after the first wave: some leases gone, some moved, two new guests
        # claiming one name in the same snapshot (equal claims: the greater MAC wins).
        entries = {m: (ip, host) for m, (ip, host, _) in model.leases.items() if rng.random() > 0.1}
        for m in rng.sample(sorted(entries), 20):
            entries[m] = (vm_ip(int(m[-5:].replace(":", ""), 16), 4), entries[m][1])
        entries[mac(VMS + GROUPS * SPARES)] = (vm_ip(VMS, 0), "twin")
        entries[mac(VMS + GROUPS * SPARES + 1)] = (vm_ip(VMS + 1, 0), "twin")
        write_lease_file(tmp_path / "dnsmasq.leases", entries)
        hook = subprocess.run([sys.executable, "-m", "fastfwd.hook", "--socket", str(proc.lease_socket), "snapshot",
                               str(tmp_path / "dnsmasq.leases")], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert hook.returncode == 0, hook.stderr
        model.snapshot(entries)

        # The second wave runs through a reload that re-points 40 rules and a [hosts] entry.
        hosts["h0"] = mac(1)

        def reload() -> None:
            write_atomically(cfg, config_text(base, port, hosts, retarget=40))
            proc.signal(signal.SIGHUP)
        storm(proc, model, rng, per_group=60, during=reload)
        proc.wait_log(f"{cfg} applied")
        targets, names = rule_names(retarget=40), model.names(hosts)
        assert names["twin"] == vm_ip(VMS + 1, 0)
        check_rules(proc, base, names, targets)
        check_traffic(base, port, names, targets, rng)
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
    assert saved(tmp_path) == {m: (ip, host) for m, (ip, host, _) in model.leases.items()}
    (tmp_path / "lease.sock").unlink(missing_ok=True)
    with daemon(tmp_path, "-c", str(cfg), "--workers", "1") as proc:
        check_rules(proc, base, names, targets)


def test_reloads_of_a_2000_rule_file_leave_no_fds_behind(tmp_path: Path) -> None:
    base, port = free_port_range(RULES + 100), free_port_range(1)
    hosts = {f"h{v}": mac(v) for v in range(VMS)}
    cfg = tmp_path / "fastfwd.toml"
    # Two versions: the second re-points 300 rules and moves 100 to other ports.
    versions = [config_text(base, port, hosts), config_text(base + 100, port, hosts, retarget=300)]
    cfg.write_text(versions[0])
    with daemon(tmp_path, "-c", str(cfg), "--workers", "1") as proc:
        client = LeaseClient(proc.lease_socket)
        try:
            assert client.send({"snapshot": [{"mac": mac(v), "ip": vm_ip(v, 0), "hostname": f"vm{v}"}
                                             for v in range(VMS)]}) == {"ok": True, "changed": VMS}
        finally:
            client.close()
        fds = []
        for i in range(1, 11):  # each reload moves 100 listeners to other ports
            write_atomically(cfg, versions[i % 2])
            proc.wait_log(f"config changed: {cfg} applied", count=i)
            fds.append(open_fds(proc.proc.pid))
        # A count can catch an fd open for a moment (the watcher reads the file again once a
        # reload is done); fds left behind stay, so the count must come back to the lowest seen.
        wait_for(lambda: open_fds(proc.proc.pid) == min(fds), timeout=10,
                 what=f"the fds to come back to {min(fds)} (after each reload: {fds})")
        first = next(r for r in status(proc)["rules"] if r["listen"] == f"127.0.0.1:{base}")
        assert (first["target"], first["target_ip"]) == (f"h0:{port}", vm_ip(0, 0))


def test_a_refreshed_lease_does_not_take_a_name_back(tmp_path: Path) -> None:
    """Two MACs claim "web": the later claim holds it. dnsmasq's ``old`` for the earlier one
    (its restart, a SIGHUP) repeats that lease and claims nothing anew: the name stays, and
    stays through an unrelated event, a snapshot and a restart of the table."""
    table = LeaseTable(state_file=tmp_path / STATE_FILE)
    table.apply_event("add", Lease(mac(1), "10.0.0.1", "web", seen=100.0))
    table.apply_event("add", Lease(mac(2), "10.0.0.2", "web", seen=200.0))
    assert resolve_names({}, table)["web"] == "10.0.0.2"
    assert table.apply_event("old", Lease(mac(1), "10.0.0.1", "web", seen=300.0)) == []
    assert resolve_names({}, table)["web"] == "10.0.0.2"
    table.apply_event("add", Lease(mac(3), "10.0.0.3", "other", seen=400.0))
    assert resolve_names({}, table)["web"] == "10.0.0.2"
    # A snapshot that repeats both leases claims nothing anew either.
    table.apply_snapshot([Lease(mac(1), "10.0.0.1", "web", seen=500.0), Lease(mac(2), "10.0.0.2", "web", seen=500.0)])
    assert resolve_names({}, table)["web"] == "10.0.0.2"
    assert resolve_names({}, LeaseTable.restore(tmp_path / STATE_FILE))["web"] == "10.0.0.2"


def test_one_lease_event_costs_the_same_however_many_leases_and_rules(tmp_path: Path) -> None:
    """One event against 1,000 leases: the daemon re-resolves the names that event touches,
    not every lease's (counted as leases the table hands out)."""
    base = free_port_range(200)
    cfg = parse_config("".join(f'[[forward]]\nlisten = {base + r}\nto = "vm{r}:9"\n' for r in range(200)))

    async def main() -> int:
        dm = Daemon(cfg, None, (), Overrides(state_dir=str(tmp_path), workers=1))
        fw = await dm.start()
        try:
            await dm.leases_changed(dm.leases.apply_snapshot([Lease(mac(v), vm_ip(v, 0), f"vm{v}")
                                                              for v in range(1000)]))
            handed = 0
            iterate = LeaseTable.__iter__

            def counting(self: LeaseTable):
                nonlocal handed
                for lease in iterate(self):
                    handed += 1
                    yield lease
            LeaseTable.__iter__ = counting  # type: ignore[method-assign]
            try:
                changes = dm.leases.apply_event("add", Lease(mac(7), vm_ip(7, 1), "vm7"))
                await dm.leases_changed(changes)
            finally:
                LeaseTable.__iter__ = iterate  # type: ignore[method-assign]
            assert next(a for a in fw.rules if a.rule.target_host == "vm7").target_ip == vm_ip(7, 1)
            return handed
        finally:
            dm.leases.flush()
            await fw.close()
    assert run_async(main()) < 10


def test_resolving_one_name_looks_only_at_its_own_rules() -> None:
    base = free_port_range(300)

    async def main() -> int:
        async with Forwarder(workers=1) as fw:
            for r in range(300):
                await fw.add(Rule.parse(f"{base + r}:vm{r}:9"))
            looked = 0

            class Counting(dict):
                def values(self):
                    nonlocal looked
                    for value in super().values():
                        looked += 1
                        yield value
            fw._table = Counting(fw._table)
            await fw.resolve("vm7", "127.0.0.7")
            return looked
    assert run_async(main()) <= 1
