"""Side-by-side table of ``tools/evaluate.py`` reports (streaming policies, hold-back, ...).

One row per report and set kind (clips, long streams): quality (WER for
transcription sets with references, chrF consistency against the same model's
offline output for translation sets), first-partial p50, partial p95, final
p95, LAAL, normalized erasure and compute (real-time factor). The figures are
pooled over the chosen sets: words for WER, audio seconds for the rest
(latency percentiles: the mean of the sets' percentiles, weighted by audio).

Usage:
    .venv/bin/python tools/policy_table.py results/eval-policy-*.json [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ENGLISH = ("en", "fleurs-en")
TRANSLATION = ("fleurs-de", "fleurs-fr", "fr-en")


def _weighted(parts: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in parts)
    return None if total == 0 else sum(v * w for v, w in parts) / total


def summarize(report: dict[str, Any], sets: tuple[str, ...], kind: str) -> dict[str, Any]:
    """Pooled figures of ``sets`` (``kind``: clips or long_stream) of one report."""
    aggs = []
    for name in sets:
        entry = report["sets"].get(name, {}).get(kind)
        if entry:
            aggs.append(entry["aggregate"])
    if not aggs:
        return {}
    errors = words = 0.0
    offline_errors = 0.0
    chrf: list[tuple[float, float]] = []
    for agg in aggs:
        q = agg["quality"]
        if q["basis"] == "reference" and q["metric"] == "wer":
            n = q["streaming"]["ref_words"]
            words += n
            errors += q["streaming"]["wer"] * n
            offline_errors += q["offline"]["wer"] * n
        else:
            chrf.append((q["consistency"]["chrf"], agg["audio_s"]))

    def lat(key: str, pct: str) -> float | None:
        return _weighted(
            [(a["latency_ms"][key][pct], a["audio_s"]) for a in aggs if a["latency_ms"][key]["n"]]
        )

    return {
        "audio_s": sum(a["audio_s"] for a in aggs),
        "wer": errors / words if words else None,
        "offline_wer": offline_errors / words if words else None,
        "chrf_vs_offline": _weighted(chrf),
        "first_partial_p50_ms": lat("first_partial", "p50"),
        "partial_p95_ms": lat("partial", "p95"),
        "final_p95_ms": lat("final", "p95"),
        "laal_ms": _weighted([(a["latency_ms"]["laal_mean"], a["audio_s"]) for a in aggs]),
        "normalized_erasure": _weighted([(a["normalized_erasure"], a["audio_s"]) for a in aggs]),
        "rtf": _weighted([(a["compute"]["rtf"], a["audio_s"]) for a in aggs]),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(paths: list[Path]) -> tuple[str, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    lines = [
        "| report | sets | WER (offline) | chrF vs offline | first partial p50 | "
        "partial p95 | final p95 | LAAL | NE | RTF |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        report = json.loads(path.read_text())
        for group, sets in (("English", ENGLISH), ("→en translation", TRANSLATION)):
            for kind, label in (("clips", "clips"), ("long_stream", "long")):
                s = summarize(report, sets, kind)
                if not s:
                    continue
                rows.append({"report": path.name, "group": group, "kind": kind, **s})
                wer = (
                    "–"
                    if s["wer"] is None
                    else f"{s['wer'] * 100:.1f} ({s['offline_wer'] * 100:.1f})"
                )
                lines.append(
                    f"| {path.stem.removeprefix('eval-policy-')} | {group} {label} | {wer} | "
                    f"{_fmt(s['chrf_vs_offline'], '.1f')} | "
                    f"{_fmt(s['first_partial_p50_ms'], '.0f')} | "
                    f"{_fmt(s['partial_p95_ms'], '.0f')} | {_fmt(s['final_p95_ms'], '.0f')} | "
                    f"{_fmt(s['laal_ms'], '.0f')} | {_fmt(s['normalized_erasure'], '.2f')} | "
                    f"{_fmt(s['rtf'], '.2f')} |"
                )
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", type=Path)
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    text, rows = table(args.reports)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
