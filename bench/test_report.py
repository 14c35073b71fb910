"""Checks of the report (bench/report.py): ``python -m pytest bench/``."""
from __future__ import annotations

from .figures import BY_NAME
from .report import bar_table, best_peer, figure_table


def results_with(runs: dict, failed: dict | None = None, repeats: int = 3) -> tuple[dict, dict]:
    kinds = {"direct": "direct", "cref": "reference", "fastfwd-auto-1w": "fastfwd", "nginx": "peer",
             "socat": "peer"}
    results = {"subjects": {n: {"label": n, "kind": k, "unavailable": None} for n, k in kinds.items()}}
    fig = {"title": "t", "measured_at": "now", "repeats": repeats, "runs": runs, "failed": failed or {},
           "notes": {}}
    return results, fig


def test_a_subject_that_failed_after_some_rounds_is_flagged() -> None:
    runs = {"direct": [{"gbit_s": 20.0}] * 3, "nginx": [{"gbit_s": 10.0}]}
    results, fig = results_with(runs, {"nginx": "failed: boom"})
    text = "\n".join(figure_table(BY_NAME["tcp1"], fig, results))
    assert "nginx: 1 of 3 rounds, then failed: boom." in text


def test_best_peer_is_a_peer_in_the_right_direction() -> None:
    runs = {"direct": [{"p50_us": 1.0}], "cref": [{"p50_us": 2.0}], "fastfwd-auto-1w": [{"p50_us": 3.0}],
            "nginx": [{"p50_us": 5.0}], "socat": [{"p50_us": 4.0}]}
    results, fig = results_with(runs)
    kinds = {n: s["kind"] for n, s in results["subjects"].items()}
    assert best_peer(fig, BY_NAME["rtt_tcp"].columns[0], kinds) == ("socat", 4.0)
    runs = {"direct": [{"gbit_s": 9.0}], "cref": [{"gbit_s": 8.0}], "nginx": [{"gbit_s": 5.0}],
            "socat": [{"gbit_s": 4.0}]}
    results, fig = results_with(runs)
    assert best_peer(fig, BY_NAME["tcp1"].columns[0], kinds) == ("nginx", 5.0)


def test_the_bar_checks_8_streams_with_each_client() -> None:
    results, _ = results_with({})
    results["figures"] = {
        "tcp8": {"runs": {"direct": [{"gbit_s": 50.0}], "fastfwd-auto-1w": [{"gbit_s": 20.0, "cpu_s_per_gb": 0.3}]}},
        "tcp8_iperf3": {"runs": {"direct": [{"gbit_s": 26.0}],
                                 "fastfwd-auto-1w": [{"gbit_s": 19.5, "cpu_s_per_gb": 0.2}]}}}
    text = "\n".join(bar_table(results))
    assert "| TCP 8 streams (bench client) ≥ 0.73× direct | 0.400× ❌ |" in text
    assert "| TCP 8 streams (iperf3 -P 8) ≥ 0.73× direct | 0.750× ✅ |" in text
    assert "| TCP 8 streams (iperf3 -P 8) ≤ 0.25 CPU-s/GB | 0.20 ✅ |" in text
