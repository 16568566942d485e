"""tools/profile_engine.py in quick mode on the tiny Whisper (its numbers are not checked, its
shape is): encoder passes, decode steps against runner.py of HEAD, live phases per tail."""

import json
from pathlib import Path

from tools import profile_engine

from ..conftest import REPO_ROOT


def test_quick_profile_report(tiny_whisper: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    clip = REPO_ROOT / "tests" / "data" / "audio" / "LDC93S1_timit_sample.wav"  # 2.9 s
    (tmp_path / clip.name).symlink_to(clip)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"path": clip.name, "lang": "en", "text": "x"}) + "\n")
    code = profile_engine.main(
        [
            "--quick",
            "--model",
            str(tiny_whisper),
            "--batches",
            "1,2",
            "--before",
            "HEAD",
            "--manifest",
            str(manifest),
            "--tails",
            "3,1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["torch_threads"] == 1 and report["clock"] == "thread CPU time"
    enc = report["encoder"]
    assert enc["encoder_frames"] == 250  # 2 s window + 3 s of silence: 5 s, 250 frames
    for b in ("1", "2"):
        assert enc[b]["pass_ms"] > 0 and enc[b]["profile"]["aten_ops"] > 0
        step = report["decode_step"][b]
        assert step["after_ms"] > 0 and step["before_ms"] > 0
        assert step["same_tokens"] is True  # this runner chooses what HEAD's chooses
        assert step["cache_length"] > report["decode_step"]["prompt_tokens"]
        assert step["ops"]["ops_ms"] > 0 and step["ops"]["top_ms"]
        assert step["profile"]["aten_ops"] > 0 and step["profile"]["allocations"] >= 0
    live = report["live"]["en"]  # the set of a manifest's top-level clips: their language
    long_tail, short_tail = live["tail_s=3"], live["tail_s=1"]
    for run in (long_tail, short_tail):
        assert run["final_requests"] >= 1 and run["encoder_passes"] == run["requests"]
        assert abs(sum(run["share"].values()) - 1) < 0.01
    assert short_tail["encoder_frames_per_pass"] < long_tail["encoder_frames_per_pass"]
