"""The host firewall for a VM bridge: one nftables table of our own per bridge.

Keeping our rules in ``table inet fastfwd_<bridge>`` means setup and destroy never touch
anyone else's rules: the table is replaced as a whole (atomically, in one ``nft -f``
transaction) and deleted as a whole.

What the table does, for the bridge subnet S on bridge B:

- NAT: ``masquerade`` traffic from S leaving by any other interface, so VMs reach beyond the
  host (needs ``net.ipv4.ip_forward = 1``).
- forward: accept what VMs send out, accept replies coming back, and drop new connections
  routed *into* the bridge: VMs are reached from outside only through fastfwd's ports, which
  arrive as the host's own (local) traffic and never cross the forward hook.
- input: accept DHCP (udp 67) and DNS (53) from the bridge.

nftables runs every base chain on a hook: an ``accept`` here does not overrule a ``drop`` in
another table. :func:`foreign_drops` finds the chains that would, so ``check`` can warn.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import subprocess
from dataclasses import dataclass
from typing import Any


def table_name(bridge: str) -> str:
    name = _old_table_name(bridge)
    if re.fullmatch(r"[A-Za-z0-9-]+", bridge):
        return name
    # '-' becomes '_', so br-vms, br_vms and br.vms would share one table, and setting up or
    # destroying one bridge would replace or delete another's: a name with '_' or '.' gets
    # a digest of itself too.
    return f"{name}_{hashlib.sha256(bridge.encode()).hexdigest()[:8]}"


def _old_table_name(bridge: str) -> str:
    """The name every bridge's table had before :func:`table_name` told '-', '_' and '.' apart."""
    # nft identifiers take letters, digits and '_' (interface names may also have '-' and '.').
    return "fastfwd_" + re.sub(r"[^A-Za-z0-9_]", "_", bridge)


def _comment(bridge: str) -> str:
    """Our table's comment line, as ``nft list`` prints it too: what tells a table under the
    old name apart from the table another bridge has under that name now."""
    return f'comment "made by fastfwd-bridge for {bridge}"'


def ruleset(bridge: str, subnet: ipaddress.IPv4Network, *, nat: bool = True) -> str:
    """The nft script that (re)creates our table, replacing any earlier version of it."""
    table = f"inet {table_name(bridge)}"
    b = json.dumps(bridge)  # a quoted nft string
    masquerade = (f'ip saddr {subnet} oifname != {b} masquerade comment "VMs reach beyond the host"'
                  if nat else "")
    return f"""table {table}
delete table {table}
table {table} {{
  {_comment(bridge)}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    {masquerade}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname {b} ip saddr {subnet} accept comment "VMs out"
    oifname {b} ct state established,related accept comment "replies to VMs"
    oifname {b} drop comment "VMs are reached through fastfwd's ports only"
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname {b} udp dport 67 accept comment "DHCP"
    iifname {b} meta l4proto {{ tcp, udp }} th dport 53 accept comment "DNS"
  }}
}}
"""


def _nft(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True, check=False,
                          timeout=30)


def apply(bridge: str, subnet: ipaddress.IPv4Network, *, nat: bool = True) -> None:
    script = ruleset(bridge, subnet, nat=nat)
    old = _ours_under_old_name(bridge)
    if old is not None:  # in the same transaction: never both tables, never neither
        script += f"delete table inet {old}\n"
    done = _nft("-f", "-", stdin=script)
    if done.returncode != 0:
        raise RuntimeError(f"nft refused our table: {done.stderr.strip()}")


def remove(bridge: str) -> list[str]:
    """Delete our table, and the one an earlier version made under the old name if its
    comment says it is this bridge's; returns the names deleted."""
    names = [table_name(bridge), _ours_under_old_name(bridge)]
    return [name for name in names
            if name is not None and _nft("delete", "table", "inet", name).returncode == 0]


def _ours_under_old_name(bridge: str) -> str | None:
    """The table an earlier version made for this bridge under the old name, if there is one
    and its comment says it is this bridge's (another bridge's table may have that name now)."""
    old = _old_table_name(bridge)
    if old == table_name(bridge):
        return None
    listed = _nft("list", "table", "inet", old)
    ours = listed.returncode == 0 and _comment(bridge) in map(str.strip, listed.stdout.splitlines())
    return old if ours else None


@dataclass(frozen=True)
class TableState:
    hooks: frozenset[str]  # the hooks our table's chains sit on
    masquerade: bool


def table_state(bridge: str) -> TableState | None:
    done = _nft("-j", "list", "table", "inet", table_name(bridge))
    if done.returncode != 0:
        return None
    items = _objects(done.stdout)
    return TableState(
        hooks=frozenset(c["hook"] for c in _of(items, "chain") if "hook" in c),
        masquerade=any("masquerade" in e for r in _of(items, "rule") for e in r["expr"]))


def foreign_drops(bridge: str) -> list[str]:
    """Base chains of other tables on the input or forward hook whose policy is drop:
    traffic for the bridge must be accepted there too."""
    done = _nft("-j", "list", "chains")
    if done.returncode != 0:
        return []
    return [f"{c['family']} {c['table']} {c['name']} ({c['hook']})"
            for c in _of(_objects(done.stdout), "chain")
            if c.get("hook") in ("input", "forward") and c.get("policy") == "drop"
            and c["table"] != table_name(bridge)]


def _objects(text: str) -> list[dict[str, Any]]:
    return json.loads(text).get("nftables", [])


def _of(items: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [item[kind] for item in items if kind in item]
