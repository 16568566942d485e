"""tools/translate_benchmark.py in --quick mode (tiny models, CPU): the path the GPU check runs."""

from __future__ import annotations

import json
from pathlib import Path

from tools import gpu_sweep, translate_benchmark


def test_quick_run_measures_both_paths(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "t.json"
    argv = ["--quick", "--targets", "0,2", "--seconds", "2", "--out", str(out)]
    assert translate_benchmark.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["stream_seconds"] == 2
    runs = report["runs"]
    assert set(runs) == {"cascade", "sed"} and set(runs["cascade"]) == {"0", "2"}
    cascade, sed = runs["cascade"]["2"], runs["sed"]["2"]
    assert cascade["translation_requests"] > 0 and cascade["translation_per_stream_second"] > 0
    assert sed["translation_requests"] == 0 and sed["events"]["target"] > 0
    for res in (cascade, sed, runs["sed"]["0"]):
        assert res["compute_per_stream_second"] > 0 and res["events"]["source"] > 0
    assert runs["sed"]["0"]["events"]["target"] == 0
    table = gpu_sweep.targets_table(str(out))
    assert table is not None and "cascade" in table[1] and "compute/s" in table[1]
    missing = gpu_sweep.targets_table(str(tmp_path / "none.json"))
    assert missing is not None and "no figures" in missing[1]
