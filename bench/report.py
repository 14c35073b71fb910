"""Turns results.json into results.md (tables) and chart.png.

Each cell is the median over the repeats with the min-max spread; ratios compare medians
with the direct path and with the best peer measured in the same figure.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from .figures import BY_NAME as FIGURES, Column, Figure
from .subjects import SUBJECTS

Stat = tuple[float, float, float]  # median, min, max

#: The bar from issue 3, for the control-plane figures (milliseconds).
CONTROL_BAR_MS = {"load_range_8000_ms": 1000.0, "load_rules_800x10_ms": 1000.0,
                  "reload_add_one_ms": 50.0, "reload_retarget_one_ms": 50.0}
CONTROL_LABELS = {"load_range_8000_ms": "8,000 ports as one range rule: load",
                  "load_rules_800x10_ms": "8,000 ports as 800 rules of 10: load",
                  "reload_add_one_ms": "one-rule reload (add a rule to the 800-rule table)",
                  "reload_retarget_one_ms": "one-rule reload (retarget one of the 800 rules)"}


def stat(runs: list[dict], key: str) -> Stat | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return (statistics.median(values), min(values), max(values)) if values else None


def fmt(x: float) -> str:
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.3f}"


def cell(s: Stat | None) -> str:
    if s is None:
        return "—"
    med, lo, hi = s
    return fmt(med) if lo == hi else f"{fmt(med)} ({fmt(lo)}–{fmt(hi)})"


def best_peer(fig: dict, col: Column, kinds: dict[str, str]) -> tuple[str, float] | None:
    medians = [(name, s[0]) for name, runs in fig["runs"].items()
               if kinds[name] == "peer" and (s := stat(runs, col.key))]
    if not medians:
        return None
    pick = max if col.higher_better else min
    return pick(medians, key=lambda m: m[1])


def ratio(value: Stat | None, reference: float | None) -> str:
    return f"{value[0] / reference:.2f}×" if value and reference else "—"


def figure_table(figure: Figure, fig: dict, results: dict) -> list[str]:
    subjects = results["subjects"]
    kinds = {name: s["kind"] for name, s in subjects.items()}
    direct = fig["runs"].get("direct")
    bests = {c.key: best_peer(fig, c, kinds) for c in figure.ratio_columns}
    head = ["subject", *(c.label for c in figure.columns)]
    for c in figure.ratio_columns:
        if direct:
            head.append(f"{c.label} ×direct")
        head.append(f"{c.label} ×best peer")
    lines = [f"### {fig['title']}", ""]
    facts = [f"median of {fig['repeats']} (min–max)", f"measured {fig['measured_at']}"]
    background = [r["background"] for runs in fig["runs"].values() for r in runs if "background" in r]
    if background:
        facts.append(f"other work on the box before each run: median {fmt(statistics.median(background))}, "
                     f"max {fmt(max(background))} cores busy")
    if fig.get("setting"):
        facts.append(fig["setting"])
    facts += [f"best peer for {c.label}: {subjects[b[0]]['label']}" for c in figure.ratio_columns
              if (b := bests[c.key])]
    lines += ["; ".join(facts) + ".", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for subject in SUBJECTS:
        runs = fig["runs"].get(subject.name)
        if runs:
            row = [subject.label, *(cell(stat(runs, c.key)) for c in figure.columns)]
            for c in figure.ratio_columns:
                mine = stat(runs, c.key)
                if direct:
                    row.append(ratio(mine, (stat(direct, c.key) or (None,))[0]))
                row.append(ratio(mine, bests[c.key][1] if bests[c.key] else None))
        elif subject.name in fig["failed"]:
            row = [subject.label, fig["failed"][subject.name], *[""] * (len(head) - 2)]
        else:
            continue
        lines.append("| " + " | ".join(row) + " |")
    for name, note in fig.get("notes", {}).items():
        lines.append(f"\n{subjects[name]['label']}: {note}.")
    return lines + [""]


def control_table(control: dict) -> list[str]:
    lines = ["### Control plane: 8,000 forwarded ports", ""]
    if "failed" in control:
        return lines + [f"Not measured: {control['failed']}", ""]
    lines += [f"fastfwd's Forwarder API in a fresh process, {control['workers']} workers; "
              f"median of {control['repeats']} (min–max).", "",
              "| operation | ms | bar |", "|---|---|---|"]
    for key, label in CONTROL_LABELS.items():
        if key in control:
            s = stat([{key: v} for v in control[key]], key)
            lines.append(f"| {label} | {cell(s)} | < {fmt(CONTROL_BAR_MS[key])} |")
    return lines + [""]


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# fastfwd benchmark results", "",
             f"Machine: {m['cpus']} × {m['cpu']} ({'virtual machine' if m['hypervisor'] else 'bare metal'}), "
             f"{m['mem_gib']} GiB, Linux {m['kernel']}, Python {m['python']}. Everything on loopback; "
             "client, forwarder and server share the cores ('cores busy' is the whole box during the "
             "window). 'fwd' figures are the forwarder's processes only.", ""]
    gone = [f"{s['label']}: {s['unavailable']}" for s in results["subjects"].values() if s["unavailable"]]
    if gone:
        lines += ["Not run: " + "; ".join(gone) + ".", ""]
    for name, figure in FIGURES.items():
        if name in results["figures"]:
            lines += figure_table(figure, results["figures"][name], results)
    if "control" in results:
        lines += control_table(results["control"])
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [n for n in FIGURES if n in results["figures"]]
    panels = len(shown) + ("control" in results and "failed" not in results["control"])
    cols = 3
    rows = max(1, -(-panels // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    colors = {"direct": "#7f7f7f", "fastfwd": "#d95f02", "peer": "#1f78b4"}
    kinds = {n: s["kind"] for n, s in results["subjects"].items()}
    for ax, name in zip(axes.flat, shown):
        data, col = results["figures"][name], FIGURES[name].headline
        bars = [(s.label, s.name, st) for s in SUBJECTS
                if (runs := data["runs"].get(s.name)) and (st := stat(runs, col.key))]
        y = range(len(bars))
        ax.barh(list(y), [b[2][0] for b in bars], color=[colors[kinds[b[1]]] for b in bars],
                xerr=[[b[2][0] - b[2][1] for b in bars], [b[2][2] - b[2][0] for b in bars]], capsize=2)
        ax.set_yticks(list(y), [b[0] for b in bars], fontsize=7)
        ax.invert_yaxis()
        better = "higher" if col.higher_better else "lower"
        ax.set_title(f"{data['title']}\n{col.label} ({better} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    rest = list(axes.flat)[len(shown):]
    if panels > len(shown):
        ax, control = rest.pop(0), results["control"]
        keys = [k for k in CONTROL_LABELS if k in control]
        meds = [statistics.median(control[k]) for k in keys]
        ax.barh(range(len(keys)), meds, color=colors["fastfwd"])
        ax.set_yticks(range(len(keys)), [CONTROL_LABELS[k].split(":")[0][:40] for k in keys], fontsize=7)
        ax.invert_yaxis()
        ax.set_title("fastfwd control plane, 8,000 ports\nms (lower is better)", fontsize=9)
    for ax in rest:
        ax.axis("off")
    fig.suptitle(f"fastfwd vs direct path and peers — {results['machine']['cpus']} vCPU "
                 f"{results['machine']['cpu']}, loopback (orange: fastfwd, grey: direct, blue: peers)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, outdir: Path) -> None:
    (outdir / "results.md").write_text(markdown(results))
    chart(results, outdir / "chart.png")
