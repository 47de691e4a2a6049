"""Printing results: the console line of each row, the text table, and the Markdown table of BENCHMARKS.md."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.bench_core import SECTIONS


def _num(v: float | None, digits: int = 1) -> str:
    if v is None:
        return ""
    return f"{v:.{digits}f}" if v < 1000 else f"{v:,.0f}"


def _outcome(r: dict) -> str:
    return f"{_num(r['value'])} {r['unit']}" if r["error"] is None else ("OOM" if r["oom"] else r["error"][:60])


def format_line(r: dict) -> str:
    batch = "" if r["batch"] is None else f"b{r['batch']}"
    peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} GiB"
    sp = "" if r["speedup"] is None else f"x{r['speedup']:.2f}"
    return f"{r['name']:<32} {batch:>5} {_outcome(r):>24} {peak:>10} {sp:>7}  {r['label']}"


def _ordered(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: SECTIONS.index(r["section"]))  # stable: run order within a section


def text_table(records: list[dict]) -> str:
    head = f"{'configuration':<32} {'batch':>5} {'throughput':>24} {'peak':>10} {'vs base':>7}  description"
    return "\n".join([head, "-" * len(head), *(format_line(r) for r in _ordered(records))])


def markdown_table(records: list[dict]) -> str:
    """The BENCHMARKS.md table: one line per row, errors shown in the throughput column."""
    lines = ["| section | configuration | batch | throughput | peak GiB | vs baseline |", "|---|---|---|---|---|---|"]
    for r in _ordered(records):
        value = f"{_num(r['value'])} {r['unit']}" if r["error"] is None else ("OOM" if r["oom"] else
                                                                               f"error: {r['error'][:80]}")  # fmt: skip
        sp = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['section']} | {r['label']} | {r['batch'] or ''} | {value} | {peak} | {sp} |")
    return "\n".join(lines)


def run_header(r: dict) -> str:
    v = r.get("versions", {})
    return (f"{r['device']}, torch {r['torch']} (CUDA {r['cuda']}, cuDNN {v.get('cudnn')}), transformers "
            f"{r['transformers']}, llm2vec {v.get('llm2vec')}, Python {v.get('python')}, {v.get('cpus')} CPUs; "
            f"{r['date']}; volumes D x H x W = {' x '.join(map(str, r.get('shape_dhw', [])))}, median of "
            f"{r.get('steps')} steps after {r.get('warmup')} warm-up steps\n\n`{r['command']}`")  # fmt: skip


def report(path: Path, run_id: str | None = None) -> str:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"{path}: no results")
    run_id = run_id or records[-1]["run_id"]
    records = [r for r in records if r["run_id"] == run_id]
    if not records:
        raise SystemExit(f"{path}: no run {run_id}")
    return run_header(records[0]) + "\n\n" + markdown_table(records)
