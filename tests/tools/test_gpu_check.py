"""tools/gpu_check.sh and tools/gpu_sweep.py: the GPU run's script path, kept from rotting on CPU.

The end-to-end test runs the script itself in ``--quick`` mode (tiny Whisper on
the CPU, N = 1, 2, a few seconds of audio, torch.compile stubbed) with one
injected failing ``gpu`` test: the sweep must still run, write its JSON and
print the table, and the script must exit 1. The sweep's logic (stop rule,
budget, table) is checked directly on made-up stages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tools import gpu_sweep

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def test_quick_run_still_sweeps_when_a_gpu_test_fails(tmp_path: Path) -> None:
    failing = tmp_path / "test_injected.py"
    failing.write_text(
        "import pytest\n\n\n@pytest.mark.gpu\ndef test_fails():\n    assert False\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    tests = f"tests/engine/test_static_decode.py {failing}"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--quick", "--out-dir", str(out)],
        cwd=tmp_path,  # the script finds the repository itself
        env=_env(GPU_CHECK_TESTS=tests),
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "nvidia-smi" in text and "torch: torch " in text  # the device, first
    assert "1 failed" in text and "1 skipped" in text  # the injected test and the CUDA one
    assert "gpu tests FAILED (pytest exit 1); sweep exit 0" in text

    summary = json.loads((out / "gpu-check.json").read_text())
    assert summary["quick"] is True and summary["tests"] == {"rc": 1, "passed": False}
    assert summary["device"]["usable"] and summary["device"]["cuda_build"] is None
    model = json.loads((out / "gpu-tiny-whisper.json").read_text())
    assert set(model["sweeps"]) == {"off", "on"}
    for compile_key, sweep in model["sweeps"].items():
        assert sweep["error"] is None, sweep["error"]
        assert set(sweep["stages"]) == {"1", "2"}, (compile_key, sweep)
        for stage in sweep["stages"].values():
            assert stage["finals"] >= 1 and stage["final_latency_s"]["p95"] is not None
            assert stage["failed_windows"] == 0 and stage["crashed_streams"] == 0
            assert stage["steps"] > 0 and stage["mean_batch"] >= 1
            assert stage["gpu_peak_mib"] is None  # no GPU here
        assert sweep["stages"]["2"]["mean_batch"] is not None
    assert model["sweeps"]["on"]["stages"]["1"]["static_steps"] > 0  # compile on took its path

    # the table: a header and one row per model, compile setting and N
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("tiny-whisper float32")]
    assert len(lines) == 4 and all(ln.rstrip().endswith("ok") for ln in lines), lines
    header = next(ln for ln in proc.stdout.splitlines() if ln.startswith("model "))
    for column in ("final p50/p95 s", "partial p50/p95 s", "compute/stream-s", "GPU peak MiB"):
        assert column in header
    assert summary["table"].splitlines()[0] == header
    # the targets rows (tools/translate_benchmark.py, run before the sweep), under the table
    assert "targets: exit 0" in text and summary["targets"]["quick"] is True
    targets = summary["table"].split("\n\n")[1]
    assert targets.startswith("targets (") and targets in proc.stdout
    assert sum(ln.startswith(("cascade ", "sed ")) for ln in targets.splitlines()) == 8


def test_a_cpu_only_torch_is_named_and_nothing_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--out-dir", str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "CUDA build: none" not in proc.stdout:
        pytest.skip("this torch is a CUDA build")
    assert proc.returncode == gpu_sweep.NO_GPU_EXIT
    assert "is a CPU-only build" in proc.stderr and "CUDA build of torch" in proc.stderr
    assert "no test or benchmark was run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("gpu-*.json"))


def test_no_budget_skips_every_sweep_before_loading(tmp_path: Path) -> None:
    now = str(time.time())
    code = gpu_sweep.main(
        ["--quick", "--out-dir", str(tmp_path), "--budget-s", "24", "--started-at", now]
    )
    assert code == 0
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    rows = report["rows"]
    assert len(rows) == 4
    assert all(r["result"].startswith("skipped: budget") for r in rows), rows
    for sweep in report["models"][0]["sweeps"].values():
        assert sweep["stages"] == {} and sweep["skipped_from"] == 1


# -- the sweep's logic, on made-up stages ----------------------------------------------------


def _stage(n: int, p95: float | None, *, failed: int = 0, warm: str = "time") -> dict[str, Any]:
    lat = {"n": 3, "mean": p95, "p50": p95, "p95": p95, "p99": p95, "max": p95}
    stage = {
        "streams": n,
        "warmup_end": warm,
        "final_latency_s": lat,
        "partial_latency_s": {**lat, "p50": 0.1, "p95": 0.2},
        "compute_per_stream_second": 0.0012,
        "mean_batch": 37.5,
        "gpu_peak_mib": 2048.0,
        "engine_busy": 0.95,
        "host_cpu": 1.2,
        "loop_lag_s": {"p95": 0.01},
        "failed_windows": failed,
    }
    stage["sustained"] = gpu_sweep.sustained(stage, 1.0) and warm != "budget"
    stage["bottleneck"] = gpu_sweep.bottleneck(stage)
    return stage


def _sweep(stages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    base = {"stages": {str(s["streams"]): s for s in stages}, "error": None}
    base.update({"stopped_at": None, "skipped_from": None, "skip_reason": None})
    base.update(fields)
    return base


def test_stop_rule() -> None:
    assert gpu_sweep.sustained(_stage(1, 0.8), 1.0)
    assert not gpu_sweep.sustained(_stage(1, 1.2), 1.0)
    assert not gpu_sweep.sustained(_stage(1, None), 1.0)  # no final measured
    assert not gpu_sweep.sustained(_stage(1, 0.5, failed=2), 1.0)


def test_table_says_what_ran_stopped_and_was_skipped() -> None:
    report = {
        "compile_stubbed": False,
        "models": [
            {
                "label": "whisper-base",
                "dtype": "float16",
                "sweeps": {
                    "off": _sweep([_stage(1, 0.7), _stage(50, 1.4)], stopped_at=50),
                    "on": _sweep(
                        [_stage(1, 0.6), _stage(50, None, warm="budget")],
                        skipped_from=50,
                        skip_reason="budget: the warm-up ran into the deadline",
                    ),
                },
            },
            {
                "label": "sed-base-random",
                "dtype": "bfloat16",
                "sweeps": {"off": _sweep([], error="OutOfMemoryError: boom")},
            },
        ],
    }
    rows = gpu_sweep.table_rows(report, [1, 50, 200], 1.0)
    results = [(r["model"], r["compile"], r["N"], r["result"]) for r in rows]
    assert results == [
        ("whisper-base float16", "off", "1", "ok"),
        ("whisper-base float16", "off", "50", "p95 final > 1 s: sweep stops (engine-bound)"),
        ("whisper-base float16", "off", "200", "not run (stopped at N=50)"),
        ("whisper-base float16", "on", "1", "ok"),
        ("whisper-base float16", "on", "50", "skipped: budget (its warm-up ran into the deadline)"),
        (
            "whisper-base float16",
            "on",
            "200",
            "skipped: budget: the warm-up ran into the deadline",
        ),
        ("sed-base-random bfloat16", "off", "1", "failed: OutOfMemoryError: boom"),
        ("sed-base-random bfloat16", "off", "50", "not run"),
        ("sed-base-random bfloat16", "off", "200", "not run"),
    ]
    first = rows[0]
    assert first["final p50/p95 s"] == "0.70/0.70" and first["partial p50/p95 s"] == "0.10/0.20"
    assert first["batch"] == "37.5" and first["GPU peak MiB"] == "2048" and first["busy"] == "95%"
    table = gpu_sweep.format_table(rows).splitlines()
    assert table[0].startswith("model") and len(table) == 1 + len(rows)
    assert table[3].split()[:4] == ["whisper-base", "float16", "off", "200"]


def test_budget_shares_and_estimates() -> None:
    # an equal share of what is left; nothing left gives nothing
    assert gpu_sweep.share_end(100.0, 500.0, 4) == 200.0
    assert gpu_sweep.share_end(100.0, 500.0, 1) == 500.0
    assert gpu_sweep.share_end(600.0, 500.0, 2) == 600.0
    t = gpu_sweep.Timing(seconds=20.0, warmup_s=3.0, compile_warmup_max_s=60.0)
    # a compile sweep's first stage assumes the whole compile warm-up
    assert gpu_sweep.first_estimate(t, compile_on=True).stage(t) == 60.0 + 20.0 + 3.0
    assert gpu_sweep.first_estimate(t, compile_on=False).stage(t) == 3.0 + 20.0 + 3.0


def test_host_bound_stages_are_named() -> None:
    stage = _stage(2000, 3.0)
    stage["loop_lag_s"] = {"p95": 0.4}
    stage["engine_busy"] = 0.3
    assert gpu_sweep.bottleneck(stage) == "host"
    stage["loop_lag_s"] = {"p95": 0.01}
    assert gpu_sweep.bottleneck(stage) == "-"


def test_shared_audio_is_leveled_read_only_and_paced_as_views() -> None:
    audio = gpu_sweep.SharedSpeech(12.0)
    assert len(audio.rotations) == 6 and audio.for_stream(7) is audio.for_stream(1)
    for rot in audio.rotations:
        assert len(rot) == 12 * gpu_sweep.RATE and not rot.flags.writeable
    for clip in (gpu_sweep.leveled(c) for c in gpu_sweep.benchmark.clips()):
        rms_db = 10 * np.log10(np.mean(np.square(clip, dtype=np.float64)))
        assert rms_db == pytest.approx(gpu_sweep.LEVEL_DB, abs=0.5) or np.abs(clip).max() > 0.89
    assert len({round(gpu_sweep.phase(i), 3) for i in range(50)}) == 50  # never in lockstep

    import asyncio

    samples = audio.for_stream(0)[:8000]
    src = gpu_sweep.PacedArraySource(samples, "s", gpu_sweep.RATE, 100, time.monotonic() - 1.0)

    async def take() -> list[Any]:
        return [block async for block in src.blocks()]

    blocks = asyncio.run(take())  # all due already: no waiting
    assert [b.start for b in blocks] == list(range(0, 8000, 1600))
    assert np.shares_memory(blocks[1].samples, samples)  # views, not copies
    assert np.array_equal(np.concatenate([b.samples for b in blocks]), samples)


def test_sweep_runs_as_a_script_help() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_sweep.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "--quick" in proc.stdout
