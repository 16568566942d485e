"""tools/benchmark.py end to end on a tiny model (its numbers are not checked, its shape is)."""

import json
from pathlib import Path

from tools import benchmark


def test_report_has_ours_naive_and_the_sustained_ratio(tiny_whisper: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code = benchmark.main(
        [
            "--model",
            str(tiny_whisper),
            "--streams",
            "1,3",
            "--naive",
            "1",
            "--seconds",
            "4",
            "--max-p95",
            "120",  # shape, not speed: a loaded 2-core machine once took 30 s for the naive loop
            "--set",
            "vad.enabled=false",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    three = report["ours"]["3"]
    assert three["exit_code"] == 0 and three["failed_windows"] == 0
    assert three["finals"] >= 3 and three["max_batch"] >= 2  # the three streams shared steps
    assert set(three["final_latency_s"]) == {"n", "mean", "p50", "p95", "p99", "max"}
    assert report["naive"]["1"]["updates"] == 4
    assert report["sustained"]["ours"] == 3 and report["sustained"]["naive"] == 1
    assert report["sustained"]["ratio"] == 3.0


def test_speech_is_rotated_real_audio() -> None:
    a, b = benchmark.speech(5.0, 0), benchmark.speech(5.0, 1)
    assert len(a) == len(b) == 5 * benchmark.RATE
    assert abs(a).max() > 0.05 and (a != b).any()
