"""The command line as users run it: exit codes, stdout/stderr, one-line errors.

Most tests start ``python -m streamer`` in a subprocess, because the point is
what a shell sees (exit status, which stream gets what, no traceback); a few
call ``streamer.cli.main`` in-process where they patch the interpreter. Tests
marked ``slow`` load the real Whisper base model.
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import json
import os
import re
import socket
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streamer.cli import main
from streamer.config import Config, load_config
from streamer.errors import EX_CONFIG

CLI_TIMEOUT = 120.0  # a model load and a decode on 2 busy cores
MP3 = "common_voice_fr_17767732.mp3"
JFK = "jfk.flac"
SECTIONS = {f.name for f in dataclasses.fields(Config)}  # every section, sources included
SRT_CUE = re.compile(
    r"(?P<n>\d+)\n(?P<start>\d{2}:\d{2}:\d{2},\d{3}) --> (?P<end>\d{2}:\d{2}:\d{2},\d{3})\n"
    r"(?P<text>(?:[^\n]+\n)+)\n"
)
VTT_CUE = re.compile(
    r"(?P<start>\d{2}:\d{2}:\d{2}\.\d{3}) --> (?P<end>\d{2}:\d{2}:\d{2}\.\d{3})\n"
    r"(?P<text>[^\n]+)\n\n"
)

WireCheck = Callable[..., dict[str, Any]]


def run_cli(*args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def error_line(stderr: str) -> str:
    """The one ``streamer: error:`` line of a failed run (log lines aside)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("streamer: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def only_line(stderr: str) -> str:
    """stderr of a run that should print nothing but its one error line."""
    assert stderr.endswith("\n") and stderr.count("\n") == 1, repr(stderr)
    return error_line(stderr)


def srt_seconds(stamp: str) -> float:
    hms, ms = stamp.split(",")
    h, m, s = map(int, hms.split(":"))
    return h * 3600 + m * 60 + s + int(ms) / 1000


# ---------------------------------------------------------------- check-config


def test_check_config_default_prints_effective_toml(
    repo_root: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    default = repo_root / "configs" / "default.toml"
    proc = run_cli("check-config", default, env=cli_env)
    assert proc.returncode == 0, proc.stderr
    doc = tomllib.loads(proc.stdout)
    assert set(doc) == SECTIONS
    assert [s["stream"] for s in doc["sources"]] == ["demo"]
    assert doc["model"]["id"] == "builtin:whisper-base"
    assert "valid" in proc.stderr and "Traceback" not in proc.stderr
    # What it prints is the effective configuration: it reads back equal.
    printed = tmp_path / "effective.toml"
    printed.write_text(proc.stdout, encoding="utf-8")
    assert load_config([printed]) == load_config([default])


def test_check_config_set_override_is_applied(cli_env: dict[str, str]) -> None:
    proc = run_cli("check-config", "--set", "streaming.chunk_ms=500", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert tomllib.loads(proc.stdout)["streaming"]["chunk_ms"] == 500


BAD_CONFIGS = {
    "unknown-key": (
        '[model]\nidd = "x"\n',
        ["model.idd", "did you mean", "'id'"],
    ),
    "wrong-type": (
        '[streaming]\nchunk_ms = "fast"\n',
        ["streaming.chunk_ms", "expected integer", '"fast"'],
    ),
    "window-rule": (
        "[streaming]\nleft_context_s = 10.0\nmax_segment_s = 25.0\n",
        ["streaming.max_segment_s", "max_window_s"],
    ),
    "toml-syntax": (
        '[model\nid = "x"\n',
        ["invalid TOML", "line 1"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_check_config_bad_file_is_one_line(
    case: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    text, needles = BAD_CONFIGS[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text, encoding="utf-8")
    proc = run_cli("check-config", path, env=cli_env)
    assert proc.returncode == EX_CONFIG
    assert proc.stdout == ""
    line = only_line(proc.stderr)
    assert str(path) in line
    for needle in needles:
        assert needle in line, (needle, line)


def test_check_config_lists_every_error_one_line_each(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        '[model]\nidd = "x"\ntarget_language = "de"\n\n[streaming]\nchunk_ms = "fast"\n\n'
        '[websocket]\nclient_languages = "fr,xx"\nauth_token_file = "missing-token"\n',
        encoding="utf-8",
    )
    proc = run_cli("check-config", path, env=cli_env)
    assert proc.returncode == EX_CONFIG
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert all(line.startswith(f"streamer: error: {path}: ") for line in lines), lines
    keys = [line.removeprefix(f"streamer: error: {path}: ").split(":")[0] for line in lines]
    assert keys == [
        "model.idd",
        "streaming.chunk_ms",
        "model.target_language",
        "websocket.client_languages",
        "websocket.auth_token_file",
    ]
    assert "Whisper translates only into English" in lines[2]
    # serve stops at the first error, and says there are more
    proc = run_cli("serve", "-c", path, env=cli_env)
    assert proc.returncode == EX_CONFIG
    line = only_line(proc.stderr)
    assert f"{path}: model.idd: unknown key" in line and "and 1 more error(s)" in line


def test_check_config_refuses_whisper_into_german(cli_env: dict[str, str]) -> None:
    """serve exits 78 with this after loading the model; check-config knows it before."""
    proc = run_cli("check-config", "--set", 'model.target_language="de"', env=cli_env)
    assert proc.returncode == EX_CONFIG
    assert proc.stdout == ""
    line = only_line(proc.stderr)
    assert "--set: model.target_language: Whisper translates only into English" in line


def test_check_config_missing_file(tmp_path: Path, cli_env: dict[str, str]) -> None:
    missing = tmp_path / "nope.toml"
    proc = run_cli("check-config", missing, env=cli_env)
    assert proc.returncode == EX_CONFIG
    line = only_line(proc.stderr)
    assert str(missing) in line and "No such file" in line


def test_check_config_bad_set_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--set", "streaming.chunk_msec=500"]) == EX_CONFIG
    err = capsys.readouterr().err
    line = only_line(err)
    assert "--set" in line and "chunk_msec" in line and "did you mean 'chunk_ms'" in line


# ---------------------------------------------------------------- devices


def test_devices_lists_or_says_none(cli_env: dict[str, str]) -> None:
    proc = run_cli("devices", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout.strip()
    if out != "no audio input devices found":
        header, *rows = out.splitlines()
        assert header.split() == ["index", "name", "inputs", "rate"]
        assert rows, out


def _no_portaudio(name: str, real: Callable[[str], str | None]) -> str | None:
    return None if "portaudio" in name else real(name)


def test_devices_without_portaudio_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The library missing, as sounddevice sees it: find_library finds nothing."""
    real = ctypes.util.find_library
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: _no_portaudio(name, real))
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    assert main(["devices"]) == EX_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    line = only_line(err)
    assert "PortAudio" in line and "libportaudio2" in line


def test_devices_without_sounddevice_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", None)
    assert main(["devices"]) == EX_CONFIG
    line = only_line(capsys.readouterr().err)
    assert "sounddevice" in line


def test_devices_without_portaudio_subprocess(cli_env: dict[str, str]) -> None:
    """The same through a real interpreter: exit status and stderr as a shell sees them."""
    code = (
        "import ctypes.util, sys\n"
        "real = ctypes.util.find_library\n"
        "ctypes.util.find_library = lambda n: None if 'portaudio' in n else real(n)\n"
        "from streamer.cli import main\n"
        "sys.exit(main(['devices']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert proc.returncode == EX_CONFIG, proc.stderr
    assert proc.stdout == ""
    assert "PortAudio" in only_line(proc.stderr)


# ---------------------------------------------------------------- transcribe


@pytest.mark.slow
@pytest.mark.usefixtures("whisper_base_dir")
def test_transcribe_jsonl(audio_dir: Path, cli_env: dict[str, str], wire_event: WireCheck) -> None:
    clip = audio_dir / MP3
    proc = run_cli("transcribe", clip, env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines, proc.stderr
    events = [wire_event(json.loads(line), frozenset({"file"})) for line in lines]
    assert all(e["type"] == "final" and e["file"] == str(clip) for e in events)
    assert all(e["stream"] == "file" and e["lang"] == "fr" for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))
    text = " ".join(e["text"] for e in events)
    assert "national assembly" in text.lower(), text


@pytest.mark.slow
@pytest.mark.usefixtures("whisper_base_dir")
def test_transcribe_srt_to_file(audio_dir: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "out.srt"
    proc = run_cli("transcribe", audio_dir / MP3, "--format", "srt", "-o", out, env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    srt = out.read_text(encoding="utf-8")
    cues = list(SRT_CUE.finditer(srt))
    assert cues, srt
    assert "".join(c.group(0) for c in cues) == srt  # nothing but well-formed cues
    assert [int(c["n"]) for c in cues] == list(range(1, len(cues) + 1))
    previous_end = 0.0
    for cue in cues:
        start, end = srt_seconds(cue["start"]), srt_seconds(cue["end"])
        assert previous_end <= start <= end <= 5.0, cue.group(0)
        previous_end = end
    assert "national assembly" in srt.lower(), srt


@pytest.mark.slow
@pytest.mark.usefixtures("whisper_base_dir")
def test_transcribe_vtt_cues_follow_the_words(
    audio_dir: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """WebVTT, timed by word timestamps: JFK's pause before "ask not" splits no cue
    early, and every cue starts with its first word, not with the segment's pre-roll."""
    jsonl = run_cli("transcribe", audio_dir / JFK, env=cli_env)
    assert jsonl.returncode == 0, jsonl.stderr
    finals = [json.loads(line) for line in jsonl.stdout.splitlines()]
    words = [w for f in finals for w in f["words"]]
    assert "".join(w["word"] for w in words).split() == " ".join(f["text"] for f in finals).split()
    fellow = next(w for w in words if "fellow" in w["word"])
    ask = next(w for w in words if w["word"].strip(" .").lower() == "ask")
    assert 0.3 < fellow["start"] < 2.0 and fellow["end"] <= ask["start"]
    assert 2.0 < ask["start"] < 4.5, words  # "ask not" is said at 3.2-3.6 s
    assert words[-1]["end"] <= 11.1
    out = tmp_path / "jfk.vtt"
    proc = run_cli("transcribe", audio_dir / JFK, "--format", "vtt", "-o", out, env=cli_env)
    assert proc.returncode == 0, proc.stderr
    vtt = out.read_text(encoding="utf-8")
    assert vtt.startswith("WEBVTT\n\n"), vtt
    cues = list(VTT_CUE.finditer(vtt))
    assert "WEBVTT\n\n" + "".join(c.group(0) for c in cues) == vtt  # only well-formed cues
    assert " ".join(c["text"] for c in cues).split() == " ".join(f["text"] for f in finals).split()
    starts = {round(w["start"], 3) for w in words}
    for cue in cues:
        start, end = (
            srt_seconds(cue["start"].replace(".", ",")),
            srt_seconds(cue["end"].replace(".", ",")),
        )
        assert start in starts and start <= end and len(cue["text"]) <= 84, cue.group(0)


@pytest.mark.slow
@pytest.mark.usefixtures("whisper_base_dir")
def test_transcribe_text(audio_dir: Path, cli_env: dict[str, str]) -> None:
    proc = run_cli("transcribe", audio_dir / MP3, "--format", "text", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and all(line.strip() for line in lines), proc.stdout
    assert not any(line.lstrip().startswith("{") for line in lines)
    assert "national assembly" in proc.stdout.lower(), proc.stdout


@pytest.mark.slow
@pytest.mark.usefixtures("whisper_base_dir")
def test_transcribe_two_files(
    audio_dir: Path, cli_env: dict[str, str], wire_event: WireCheck
) -> None:
    jfk, mp3 = audio_dir / JFK, audio_dir / MP3
    proc = run_cli("transcribe", jfk, mp3, env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    events = [
        wire_event(json.loads(line), frozenset({"file"})) for line in proc.stdout.splitlines()
    ]
    assert all(e["type"] == "final" for e in events)
    files = [e["file"] for e in events]
    assert set(files) == {str(jfk), str(mp3)}
    assert files == sorted(files, key=[str(jfk), str(mp3)].index)  # in command-line order
    by_file = {f: " ".join(e["text"] for e in events if e["file"] == f).lower() for f in set(files)}
    # English speech under the default French->English settings: still English text.
    assert "what your country can do for you" in by_file[str(jfk)], by_file
    assert "national assembly" in by_file[str(mp3)], by_file
    assert {e["stream"] for e in events if e["file"] == str(jfk)} == {"file0"}
    assert {e["stream"] for e in events if e["file"] == str(mp3)} == {"file1"}


def test_transcribe_missing_file(tmp_path: Path, audio_dir: Path, cli_env: dict[str, str]) -> None:
    missing = tmp_path / "missing.wav"
    proc = run_cli("transcribe", audio_dir / MP3, missing, env=cli_env)
    assert proc.returncode != 0
    assert proc.stdout == ""  # checked before anything is decoded
    line = only_line(proc.stderr)
    assert str(missing) in line and "no such file" in line


def test_transcribe_model_folder_missing(audio_dir: Path, cli_env: dict[str, str]) -> None:
    """A model id that is a path names the missing folder, not hub repo-id rules."""
    proc = run_cli("transcribe", "--model", "/nonexistent/dir", audio_dir / MP3, env=cli_env)
    assert proc.returncode != 0
    assert proc.stdout == ""
    line = error_line(proc.stderr)
    assert "/nonexistent/dir" in line
    assert re.search(r"no such|does not exist|not found", line, re.IGNORECASE), line


def test_transcribe_output_folder_missing(
    tmp_path: Path, audio_dir: Path, cli_env: dict[str, str]
) -> None:
    """An output path that cannot be created is a user error: one line, no traceback."""
    out = tmp_path / "no-such-folder" / "out.srt"
    proc = run_cli("transcribe", audio_dir / MP3, "--format", "srt", "-o", out, env=cli_env)
    assert proc.returncode != 0
    line = error_line(proc.stderr)
    assert str(out) in line


def test_transcribe_output_through_a_symlink_and_to_dev_null(
    tiny_whisper: Path, tmp_path: Path, audio_dir: Path, cli_env: dict[str, str]
) -> None:
    """``-o`` writes a symlink's target (mode kept, link kept) and leaves /dev/null a device."""
    real = tmp_path / "captions.txt"
    real.write_text("old\n", encoding="utf-8")
    real.chmod(0o640)
    link = tmp_path / "latest.txt"
    link.symlink_to(real)
    args = ["transcribe", "--model", tiny_whisper, "--device", "cpu", "--format", "text"]
    args += ["--source-language", "en", "--target-language", "en", audio_dir / MP3]
    proc = run_cli(*args, "-o", link, env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert link.is_symlink() and link.resolve() == real
    assert real.read_text(encoding="utf-8") != "old\n"  # the random model's lines, maybe none
    assert os.stat(real).st_mode & 0o7777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.txt", "latest.txt"]
    proc = run_cli(*args, "-o", "/dev/null", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


# ---------------------------------------------------------------- serve


def test_serve_port_in_use(cli_env: dict[str, str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("serve", "--set", f"websocket.port={port}", env=cli_env)
    assert proc.returncode != 0
    line = error_line(proc.stderr)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line


NOT_CHECKPOINTS: dict[str, dict[str, str]] = {
    "stray-file": {"notes.txt": "hello\n"},
    "broken-config": {"config.json": "{"},
    "text-model": {"config.json": '{"model_type": "bert"}'},
}


@pytest.mark.parametrize("case", sorted(NOT_CHECKPOINTS))
def test_serve_with_folder_that_is_not_a_checkpoint(
    case: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for name, text in NOT_CHECKPOINTS[case].items():
        (folder / name).write_text(text, encoding="utf-8")
    config = tmp_path / "site.toml"
    config.write_text(
        '[model]\nid = "./model"\n\n[websocket]\nport = 0\n\n[console]\nenabled = false\n',
        encoding="utf-8",
    )
    proc = run_cli("serve", "-c", config, env=cli_env)
    assert proc.returncode != 0
    assert proc.stdout == ""
    line = error_line(proc.stderr)
    assert f"cannot load '{folder}'" in line, line


def test_srt_for_several_files_needs_a_folder(
    tmp_path: Path, audio_dir: Path, cli_env: dict[str, str]
) -> None:
    out = tmp_path / "one.srt"
    proc = run_cli(
        "transcribe", "--format", "srt", "-o", out, audio_dir / MP3, audio_dir / JFK, env=cli_env
    )
    assert proc.returncode == EX_CONFIG
    assert "folder" in error_line(proc.stderr) and not out.exists()


@pytest.mark.slow
def test_srt_for_several_files_goes_to_one_file_each(
    tmp_path: Path, audio_dir: Path, cli_env: dict[str, str]
) -> None:
    proc = run_cli(
        "transcribe",
        "--format",
        "srt",
        "-o",
        tmp_path,
        audio_dir / MP3,
        audio_dir / JFK,
        env=cli_env,
    )
    assert proc.returncode == 0, proc.stderr
    for stem in (Path(MP3).stem, Path(JFK).stem):
        cues = (tmp_path / f"{stem}.srt").read_text().strip().split("\n\n")
        assert cues[0].startswith("1\n00:00:")
    assert not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------- logging


def test_error_line_under_systemd_carries_the_error_priority(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """stderr is the journal stream: the one error line gets ``<3>`` for journald."""
    path = tmp_path / "stderr"
    with open(path, "w") as err:
        st = os.fstat(err.fileno())
        env = cli_env | {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = subprocess.run(
            [sys.executable, "-m", "streamer", "check-config", "--set", "model.idd=1"],
            stderr=err,
            stdout=subprocess.PIPE,
            env=env,
            timeout=CLI_TIMEOUT,
            check=False,
        )
    assert proc.returncode == EX_CONFIG
    text = path.read_text()
    assert (
        text.startswith("<3>streamer: error: --set: model.idd: unknown key")
        and text.count("\n") == 1
    ), text
    # The same variable with stderr on a pipe (a child of the service): the plain line.
    proc = run_cli("check-config", "--set", "model.idd=1", env=env)
    assert only_line(proc.stderr).startswith("streamer: error: --set: model.idd")


def test_serve_with_json_logs_writes_only_json_lines(cli_env: dict[str, str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli(
            "serve",
            "--set",
            f"websocket.port={port}",
            "--set",
            'logging.format="json"',
            "--log-level",
            "debug",
            env=cli_env,
        )
    assert proc.returncode != 0
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert all({"ts", "level", "logger", "message"} <= set(obj) for obj in lines), lines
    last = lines[-1]
    assert last["level"] == "error" and last["exit_code"] == proc.returncode
    assert f"cannot listen on 127.0.0.1:{port}" in last["message"]
    assert "Traceback" not in proc.stderr


def test_openmp_threads_wait_passively_unless_the_environment_says_otherwise() -> None:
    import os
    import subprocess
    import sys

    probe = (
        "import os, sys, streamer.cli; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["PASSIVE", "False"], out.stderr  # set before torch loads
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["ACTIVE", "False"], out.stderr
