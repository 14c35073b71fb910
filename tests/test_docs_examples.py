"""The examples in README.md and docs/ run as written: config blocks load (or fail with the
output shown), the library example forwards real bytes, the option tables state the real
defaults, every documented ``fastfwd run`` flag exists, and the lease- and control-socket
messages get the replies shown from a running daemon."""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

import fastfwd
from fastfwd.cli import cli_rules, main
from fastfwd.config import ControlSettings, EngineSettings, SourceSettings
from fastfwd.leases import Lease, LeaseTable
from fastfwd.unixclient import call

from helpers_control import REPO, daemon, fastfwd as fastfwd_cmd, free_port, needs_engine, short_dir
from netutil import child_env, free_port_range

DOCS = ["README.md", "docs/config.md", "docs/leases.md", "docs/vm-hosts.md", "docs/metrics.md"]
#: Before a TOML block that shows a config error; the next block is ``$ fastfwd check FILE``
#: and the lines it prints.
INVALID_MARK = "<!-- invalid:"


@dataclasses.dataclass
class Block:
    doc: str
    lang: str
    text: str
    before: str  # the Markdown line just before the opening fence
    after: Block | None = None  # the next fenced block of the same document

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.text.splitlines()[0][:40] if self.text else ''}"


def blocks(doc: str) -> list[Block]:
    text = (REPO / doc).read_text()
    found = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.M | re.S):
        before = text[:m.start()].rstrip("\n").rpartition("\n")[2]
        found.append(Block(doc, m.group(1), m.group(2), before))
    for block, nxt in zip(found, found[1:]):
        block.after = nxt
    return found


def toml_examples() -> list[Block]:
    """Fenced TOML blocks, and TOML written by a shell here-document (``cat > X.toml <<'EOF'``)."""
    out = []
    for doc in DOCS:
        for block in blocks(doc):
            if block.lang == "toml":
                out.append(block)
            for heredoc in re.findall(r"^cat > \S+\.toml <<'EOF'\n(.*?)^EOF$", block.text, re.M | re.S):
                out.append(Block(doc, "toml", heredoc, block.before))
    return out


TOML = toml_examples()
VALID = [b for b in TOML if not b.before.startswith(INVALID_MARK)]
INVALID = [b for b in TOML if b.before.startswith(INVALID_MARK)]


def test_the_docs_have_config_examples_of_both_kinds() -> None:
    # Guards the extraction: a changed fence or mark would otherwise leave nothing to test.
    assert len(VALID) >= 2 and len(INVALID) >= 1


@pytest.mark.parametrize("block", VALID, ids=[b.id for b in VALID])
def test_config_example_loads(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "fastfwd.toml"
    path.write_text(block.text)
    assert fastfwd.load_config(path).rules


@pytest.mark.parametrize("block", INVALID, ids=[b.id for b in INVALID])
def test_invalid_config_example_gives_the_errors_shown(block: Block, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert block.after is not None
    command, *shown = block.after.text.splitlines()
    assert command.startswith("$ fastfwd check ")
    name = command.split()[-1]
    (tmp_path / name).write_text(block.text)
    monkeypatch.chdir(tmp_path)  # so the messages name the file as the command line does
    assert main(["check", name]) == 2
    assert capsys.readouterr().err.splitlines() == shown


def test_check_prints_the_summary_shown_for_the_complete_example(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    config_md = (REPO / "docs/config.md").read_text()
    summary = re.search(r"`(fastfwd\.toml: ok, [^`]*)`", config_md.replace("\n", " "))
    assert summary is not None
    (tmp_path / "fastfwd.toml").write_text(blocks("docs/config.md")[0].text)
    monkeypatch.chdir(tmp_path)
    assert main(["check", "fastfwd.toml"]) == 0
    assert capsys.readouterr().out.strip() == summary.group(1)



def test_readme_daemon_line_runs_with_the_complete_example(tmp_path: Path) -> None:
    """README's ``fastfwd run -c /etc/fastfwd/fastfwd.toml -t ...`` with docs/config.md's
    example as that file: no quick forward may take a port of the file's rules."""
    line = next(l for b in blocks("README.md") for l in b.text.splitlines() if "fastfwd run -c " in l)
    args = shlex.split(line.partition("#")[0])[2:]
    quick = cli_rules([a for f, a in zip(args, args[1:]) if f == "-t"], [a for f, a in zip(args, args[1:]) if f == "-u"])
    assert quick
    (tmp_path / "fastfwd.toml").write_text(blocks("docs/config.md")[0].text)
    for rule in fastfwd.load_config(tmp_path / "fastfwd.toml").rules:
        for q in quick:
            assert not (q.proto == rule.proto and rule.listen_port <= q.listen_port < rule.listen_port + rule.count), (q, rule)

def test_every_run_line_in_the_docs_has_specs_that_parse() -> None:
    """Each ``fastfwd run`` line of a code block: its -t/-u specs are rules as written."""
    lines = [line.partition("#")[0] for doc in DOCS for b in blocks(doc) for line in b.text.splitlines()
             if line.startswith("fastfwd run ")]
    assert len(lines) >= 5
    for line in lines:
        args = shlex.split(line)[2:]
        specs = {flag: [a for f, a in itertools.pairwise(args) if f == flag] for flag in ("-t", "-u")}
        if specs["-t"] or specs["-u"]:
            assert cli_rules(specs["-t"], specs["-u"]), line


# -- the README's library example --------------------------------------------------------------
#: Stands in for the example's sleep: a server at the rule's target (127.0.0.1:8080) and one
#: connection through the forward; the far end's SHA-256 must be the sender's.
_THROUGH = '''
import hashlib, os

async def through(port):
    received, done = hashlib.sha256(), asyncio.Event()
    async def far_end(reader, writer):
        while data := await reader.read(1 << 16):
            received.update(data)
        writer.close()
        done.set()
    server = await asyncio.start_server(far_end, "127.0.0.1", 8080)
    payload = os.urandom(1 << 20)
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    await asyncio.wait_for(done.wait(), 15)
    writer.close()
    server.close()
    print("far-end", len(payload), hashlib.sha256(payload).hexdigest(), received.hexdigest())
'''


@pytest.mark.root
@needs_engine
def test_readme_library_example_forwards_real_bytes() -> None:
    python = [b.text for b in blocks("README.md") if b.lang == "python"]
    assert len(python) == 1
    assert python[0].count("await asyncio.sleep(60)") == 1
    code = _THROUGH + python[0].replace("await asyncio.sleep(60)", "await through(web.port)")
    # A network namespace of its own: the example's fixed ports (8080, 5353) cannot clash there.
    result = subprocess.run(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1"',
                             sys.executable, code], capture_output=True, text=True, timeout=60,
                            env=child_env(), stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    listening, far_end, counters = result.stdout.splitlines()
    assert re.fullmatch(r"listening on \d+", listening)
    _, size, sent, received = far_end.split()
    assert received == sent
    accepted, up, down, spliced, copied = map(int, counters.split())
    assert (accepted, up, down, spliced + copied) == (1, int(size), 0, int(size))


# -- option tables -----------------------------------------------------------------------------
def table_rows(doc: str, heading: str) -> dict[str, str]:
    """Key and default column of the first table after ``heading``."""
    text = (REPO / doc).read_text()
    section = text[text.index(f"\n{heading}\n"):]
    rows = {}
    for line in section.split("\n\n|", 1)[1].split("\n\n", 1)[0].splitlines():
        cells = [c.strip() for c in ("|" + line).strip("|").split("|")]
        key = re.fullmatch(r"`(\w+)`", cells[0])
        if key:
            rows[key.group(1)] = cells[1]
    return rows


def documented_default(cell: str) -> Any:
    """A default as the tables write it: `10.0`, 10 s, `"auto"`, `auto`, 0 (no cap), `[]`;
    the README's words for an empty list (all, none) too."""
    text = re.sub(r"\s+\(.*\)$", "", cell).strip("`").removesuffix(" s")
    if text in ("all", "none"):
        return ()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: `auto`
    return tuple(value) if isinstance(value, list) else value


@pytest.mark.parametrize("doc,heading", [("README.md", "## Rule options and defaults"),
                                         ("docs/config.md", "## Per-rule options and their defaults")])
def test_rule_option_tables_state_the_real_defaults(doc: str, heading: str) -> None:
    rows = table_rows(doc, heading)
    defaults = fastfwd.RuleOptions()
    assert set(rows) == {f.name for f in dataclasses.fields(defaults)}
    assert {k: documented_default(v) for k, v in rows.items()} == dataclasses.asdict(defaults) | {
        "allow": (), "source": ()}


@pytest.mark.parametrize("heading,settings", [("## `[engine]`", EngineSettings()),
                                              ("## `[control]`", ControlSettings()),
                                              ("## `[sources]`", SourceSettings())])
def test_config_setting_tables_state_the_real_defaults(heading: str, settings: Any) -> None:
    rows = table_rows("docs/config.md", heading)
    assert set(rows) == {f.name for f in dataclasses.fields(settings)}
    # Only the defaults written as one literal; the others (a path per user, one worker per
    # CPU) are prose.
    literal = {k: documented_default(v) for k, v in rows.items() if re.fullmatch(r"`[^`]+`( \(.*\))?", v)}
    assert literal
    assert literal == {k: v for k, v in dataclasses.asdict(settings).items() if k in literal}


# -- the commands' flags -----------------------------------------------------------------------
COMMANDS = ["run", "check", "status", "lease", "hook"]


def documented_flags(command: str) -> set[str]:
    """Every flag written after ``fastfwd COMMAND`` in a code line or an inline code span."""
    flags = set()
    for doc in DOCS:
        for line in (REPO / doc).read_text().splitlines():
            for rest in re.findall(rf"fastfwd {command}\b([^`#]*)", line):
                flags.update(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", rest))
    return flags


def test_the_metrics_table_lists_every_family_the_scrape_has() -> None:
    from fastfwd import metrics
    collectors = [metrics.RuleCollector([]), metrics.ReloadCollector(metrics.ReloadReading(True, 0.0, 0, 0))]
    kinds = {f.name: f.type for c in collectors for f in c.collect()}
    table = re.findall(r"^\| `(fastfwd_\w+)` \| (counter|gauge) \|", (REPO / "docs" / "metrics.md").read_text(), re.M)
    assert {name.removesuffix("_total"): kind for name, kind in table} == kinds
    assert all(name.endswith("_total") == (kind == "counter") for name, kind in table)


def test_the_docs_show_flags_of_the_commands() -> None:
    # Guards the extraction: a changed way of writing commands would leave nothing to check.
    assert {"-c", "-t", "-u", "--splice", "--busy-poll-us", "--workers"} <= documented_flags("run")
    assert "--json" in documented_flags("status")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_documented_flag_is_in_the_commands_help(command: str) -> None:
    flags = documented_flags(command)
    result = fastfwd_cmd(command, "--help")
    assert result.returncode == 0
    missing = [f for f in sorted(flags) if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", result.stdout)]
    assert missing == []


# -- the lease and control sockets -------------------------------------------------------------
def exchanges(block: Block) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """A block of JSON lines as (request, reply shown or None). A message starts at a line
    beginning with '{' and runs on over indented lines; ``{...}`` elides an object, and a line
    starting with ``...`` is a note, not JSON."""
    messages: list[str] = []
    for line in block.text.splitlines():
        if line.startswith("{"):
            messages.append(line)
        elif not line.lstrip().startswith("..."):
            messages[-1] += line
    docs = [json.loads(m.replace("{...}", "{}")) for m in messages]
    pairs = []
    for i, doc in enumerate(docs):
        if not {"cmd", "event", "snapshot"} & set(doc):
            continue
        reply = docs[i + 1] if i + 1 < len(docs) and "ok" in docs[i + 1] else None
        pairs.append((doc, reply))
    return pairs


def same_shape(shown: Any, real: Any) -> bool:
    """The same keys at every level; an elided object ({...}) matches any object, and each
    object shown in a list must match one of the real list's."""
    if isinstance(shown, dict):
        return isinstance(real, dict) and (not shown or shown.keys() == real.keys() and all(
            same_shape(v, real[k]) for k, v in shown.items()))
    if isinstance(shown, list):
        return isinstance(real, list) and all(any(same_shape(s, r) for r in real) for s in shown)
    return True


def socket_block(first: str) -> Block:
    found = [b for b in blocks("docs/leases.md") if b.text.startswith(first)]
    assert len(found) == 1, first
    return found[0]


@needs_engine
def test_lease_and_control_socket_examples_get_the_replies_shown() -> None:
    with short_dir() as tmp:
        # A lease the neighbour table found, as the status example shows one.
        LeaseTable([Lease("52:54:00:12:34:99", "192.168.122.50", seen=1.0, source="neighbours")],
                   state_file=tmp / "state" / "leases.json").save()
        with daemon(tmp, "-t", f"127.0.0.1:{free_port()}:vm1:22", "-u", f"127.0.0.1:{free_port()}:127.0.0.1:9") as d:
            for request, shown in exchanges(socket_block('{"event"')):
                assert call(d.lease_socket, request) == shown
            # The examples add and remove a rule on port 8080, which may be taken on a shared host.
            port = free_port()
            for request, shown in exchanges(socket_block('{"cmd"')):
                if "spec" in request:
                    request["spec"] = request["spec"].replace(":8080:", f":{port}:")
                reply = call(d.control_socket, request)
                assert reply["ok"] is True, (request, reply)
                if shown is not None:
                    assert same_shape(shown, reply), (shown, reply)
            # fastfwd lease, as docs/leases.md shows it by hand.
            commands = [b for b in blocks("docs/leases.md") if b.text.startswith("fastfwd lease ")]
            assert len(commands) == 1
            for line in commands[0].text.splitlines():
                result = fastfwd_cmd(*shlex.split(line)[1:], "--socket", str(d.lease_socket))
                assert (result.returncode, result.stderr) == (0, ""), line
                assert re.fullmatch(r"ok, \d+ lease\(s\) changed; rules follow\n", result.stdout)


# -- what running the README's daemon line with config.md's example showed ------------------------
def run_fails(*specs: str) -> str:
    """``fastfwd run`` with these -t specs, expected to refuse to start: its one stderr line."""
    with short_dir() as tmp:
        result = fastfwd_cmd("run", "--control-socket", str(tmp / "c.sock"), "--lease-socket", str(tmp / "l.sock"),
                             "--state-dir", str(tmp / "state"), *(a for s in specs for a in ("-t", s)))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


@needs_engine
def test_a_rule_inside_another_rules_range_is_named_as_the_overlap() -> None:
    first = free_port_range(10)
    error = run_fails(f"127.0.0.1:{first}-{first + 9}:127.0.0.1:9000-9009", f"127.0.0.1:{first + 5}:127.0.0.1:80")
    assert "overlaps" in error and f"{first}-{first + 9}" in error, error


@needs_engine
def test_a_second_rule_on_the_same_port_is_named_once() -> None:
    port = free_port()
    error = run_fails(f"127.0.0.1:{port}:127.0.0.1:80", f"127.0.0.1:{port}:127.0.0.1:81")
    assert error.count(f"tcp 127.0.0.1:{port} -> 127.0.0.1:81") == 1, error
