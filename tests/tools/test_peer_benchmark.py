"""tools/peer_benchmark.py: streamer next to faster-whisper, in --quick mode (shape, not numbers).

faster-whisper is in the dev extra, so this runs for real in CI (no skip).
"""

import json
import sys
from pathlib import Path

import pytest

from tools import peer_benchmark


@pytest.mark.slow
def test_quick_run_reports_both_sides_and_ratios(whisper_base_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "peer.json"
    assert peer_benchmark.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())

    machine = report["machine"]
    assert machine["cpu_model"] and {"avx512_bf16", "amx_bf16"} <= set(machine["cpu_flags"])
    assert machine["torch_threads"] == report["threads"]["count"] >= 1
    assert machine["faster_whisper"] == peer_benchmark.PEER_VERSION
    assert report["streamer_dtypes"] == ["float32"]  # --quick: the first CPU dtype only

    offline = report["offline"]
    assert set(offline["peer"]) == {"int8", "float32"} and set(offline["streamer"]) == {"float32"}
    for row in [*offline["peer"].values(), *offline["streamer"].values()]:
        assert row["audio_s_per_s"] > 0 and row["load_s"] > 0 and row["words"] > 0
        assert row["wer"] is not None and row["wer"] < 0.5  # both really transcribed it
    assert set(offline["streamer"]["float32"]["throughput_ratio"]) == {"vs_int8", "vs_float32"}

    enc = report["encoder"]["trimmed-1s"]
    ours = enc["streamer"]["float32"]
    for peer in enc["peer"].values():  # the same input shape on both sides
        assert peer["input_frames"] == ours["input_frames"] == 400  # 1 s + 3 s tail
        assert peer["encoder_frames"] == ours["encoder_frames"] == 200
        assert peer["encoder"]["median_ms"] > 0
    assert ours["ratio"]["vs_int8"]["median"] > 0

    for batch in (1, 8):
        step = report["decode_step"][f"trimmed-1s-b{batch}"]
        assert step["tokens"] == [2, 6] and step["prompt"][0] == 50258  # <|startoftranscript|>
        assert all(p["generated_tokens"] == [2, 6] for p in step["peer"].values())
        assert step["streamer"]["float32"]["n"] == 4  # steps producing tokens 3..6
        assert set(step["streamer"]["float32"]["ratio"]) == {"vs_int8", "vs_float32"}


def test_dtypes_come_from_the_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from streamer.engine import loader

    names = peer_benchmark.loader_dtypes()
    assert "float32" in names and "fp32" not in names  # aliases are dropped
    monkeypatch.setitem(loader._DTYPES, "int8", torch.qint8)  # a dtype added later
    assert "int8" in peer_benchmark.loader_dtypes()
    run, skipped = peer_benchmark.cpu_dtypes()
    assert "int8" in run and "float32" in run and not set(run) & set(skipped)


def test_missing_faster_whisper_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # import fails
    assert peer_benchmark.main(["--quick", "--out", "unused.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install -e '.[bench]'" in err
