"""Runs the comparison: ``python -m bench.run [--quick] [--only S,..] [--figures F,..]``.

Starts the backends and every subject itself on loopback, interleaves subjects within each
figure (A B C, A B C, ...), stops only what it started, and writes bench/results/
results.json, results.md and chart.png. Figures run in an earlier invocation and not in
this one are kept in results.json, each with the time it was measured.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from . import backends, report
from .build import build
from .figures import BY_NAME as FIGURES_BY_NAME
from .figures import FULL, QUICK, Figure, Settings
from .subjects import BY_NAME as SUBJECTS_BY_NAME
from .subjects import REPO, SUBJECTS, Subject, engine_build
from .system import BoxCpu, machine, restore_left_changed

RESULTS = Path(__file__).resolve().parent / "results"
CONTROL = "control"


def _names(text: str | None, known: dict, what: str) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def background_load(seconds: float = 0.2) -> float:
    """Cores kept busy by other work on the box just before a measurement."""
    before = BoxCpu.now()
    time.sleep(seconds)
    return BoxCpu.now().cores_busy_since(before)


def round_order(takers: list, round_: int) -> list:
    """The order of the subjects in one round: backwards every other round, and rotated by one
    each round. Rotation alone kept every subject behind the same one (A B C D, B C D A,
    C D A B: D always follows C), so whatever a subject leaves behind (the TIME_WAIT of a
    connection-rate run, say) always weighed on the same next subject."""
    if not takers:
        return []
    base = takers[::-1] if round_ % 2 else takers
    shift = round_ % len(base)
    return base[shift:] + base[:shift]


def run_figure(figure: Figure, subjects: list[Subject], settings: Settings, repeats: int,
               scratch: Path) -> dict:
    """All repeats of one figure, subjects interleaved; failures are recorded, not raised."""
    takers = [s for s in subjects if s.takes(figure.name, figure.proto)
              and not (figure.needs_forwarder and s.kind == "direct")]
    runs: dict[str, list] = {s.name: [] for s in takers}
    failed = {s.name: reason for s in subjects if (reason := s.broken_for(figure.proto))}
    engine = engine_build() if any(s.kind == "fastfwd" for s in takers) else None
    with figure.context() as in_force:
        for round_ in range(repeats):
            for subject in round_order(takers, round_):
                if subject.name in failed:
                    continue
                log(f"{figure.name} {round_ + 1}/{repeats} {subject.name}")
                background = background_load()
                try:
                    running = subject.start(scratch)
                except Exception as exc:  # noqa: BLE001 - any failure becomes the table's reason
                    failed[subject.name] = f"did not start: {exc}"
                    continue
                try:
                    runs[subject.name].append({**figure.measure(settings, subject, running),
                                               "background": background})
                except Exception as exc:  # noqa: BLE001 - any failure becomes the table's reason
                    failed[subject.name] = f"failed: {exc}"
                finally:
                    running.stop()
    setting = figure.setting if in_force is not False else f"NOT in force: {figure.setting}"
    notes = {s.name: s.idle_cap[1] for s in takers if figure.name == "idle" and s.idle_cap}
    return {"title": figure.title, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "repeats": repeats, "settings": asdict(settings), "setting": setting, "engine": engine, "runs": {k: v for k, v in runs.items() if v},
            "failed": failed, "notes": notes}


def run_control(repeats: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.control", "--repeats", str(repeats)],
                         cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        return {"failed": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "exit " + str(out.returncode)}
    return {**json.loads(out.stdout), "engine": engine_build()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short windows, one round (about two minutes)")
    p.add_argument("--repeats", type=int,
                   help="rounds per figure (default 3; 5 for one stream, connections/s and round trips, whose rounds spread most; 1 with --quick)")
    p.add_argument("--only", metavar="SUBJECT,...", help=f"subjects ({', '.join(SUBJECTS_BY_NAME)})")
    p.add_argument("--figures", metavar="FIGURE,...",
                   help=f"figures ({', '.join([*FIGURES_BY_NAME, CONTROL])})")
    p.add_argument("--fresh", action="store_true", help="drop figures kept from earlier runs")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"where results go (default {RESULTS})")
    args = p.parse_args(argv)
    # Stopped from outside: unwind, so every started process is stopped and the port range restored.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        raise SystemExit("run as root: the bench changes net.ipv4.ip_local_port_range and binds ports below 1024")
    for line in restore_left_changed():
        log(f"restored a setting an interrupted run left changed: {line}")
    settings = QUICK if args.quick else FULL
    chosen = _names(args.only, SUBJECTS_BY_NAME, "subjects")
    subjects = [s for s in SUBJECTS if chosen is None or s.name in chosen]
    figure_names = _names(args.figures, {**FIGURES_BY_NAME, CONTROL: None}, "figures") or \
        [*FIGURES_BY_NAME, CONTROL]
    needed = {(tool, name) for name in figure_names if name != CONTROL for tool in FIGURES_BY_NAME[name].needs}
    missing = sorted((tool, name) for tool, name in needed if shutil.which(tool) is None)
    if missing:
        raise SystemExit("not installed: " + ", ".join(f"{tool} (figure {name} runs it)" for tool, name in missing)
                         + "; install it, or leave the figure out with --figures")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    results["machine"] = machine()
    results.setdefault("figures", {})
    results["subjects"] = {s.name: {"label": s.label, "kind": s.kind, "unavailable": s.unavailable()}
                           for s in SUBJECTS}
    available = [s for s in subjects if results["subjects"][s.name]["unavailable"] is None]
    for s in subjects:
        if s not in available:
            log(f"skipping {s.name}: {results['subjects'][s.name]['unavailable']}")

    build()
    with tempfile.TemporaryDirectory(prefix="fastfwd-bench-") as tmp:
        scratch = Path(tmp)
        servers = backends.start(scratch, iperf3=any(tool == "iperf3" for tool, _ in needed))
        try:
            for name in figure_names:
                if name == CONTROL:
                    if any(s.kind == "fastfwd" for s in available):
                        log("control plane: 8,000-port load and one-rule reload")
                        results["control"] = run_control(5 if args.quick else 10)
                    continue
                figure = FIGURES_BY_NAME[name]
                repeats = args.repeats or (1 if args.quick else figure.rounds)
                results["figures"][name] = run_figure(figure, available, settings, repeats, scratch)
                path.write_text(json.dumps(results, indent=1) + "\n")
        finally:
            for proc in servers:
                proc.stop()
    path.write_text(json.dumps(results, indent=1) + "\n")
    report.write(results, args.out)
    log(f"wrote {args.out}/results.json, results.md, chart.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
