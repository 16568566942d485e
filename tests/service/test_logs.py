"""Log formats, journal detection, secret masking and re-configuration (SIGHUP)."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamer.config import LoggingConfig
from streamer.errors import DeviceError
from streamer.service import logs
from streamer.service.logs import (
    NOISY_LOGGERS,
    clear_secrets,
    configure_logging,
    is_journal_stream,
    redact,
    register_secret,
    reload_logging,
    report_error,
    setup_logging,
)

REPO = Path(__file__).resolve().parents[2]
TOKEN = "tok-3f9a1c7e5b2d8a64"
PASSWORD = "mqtt-pa55word!"


@pytest.fixture(autouse=True)
def clean_logging() -> Iterator[None]:
    """Leave the root logger as pytest set it up."""
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if isinstance(h, logs._Handler)]:
        root.removeHandler(handler)
    root.setLevel(level)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    logging.captureWarnings(False)
    clear_secrets()
    logs._state.level_override = None


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def emit(stream: io.StringIO, *args: object, **kwargs: object) -> list[str]:
    """Log through ``streamer.audio.capture`` and return the new output lines."""
    before = len(stream.getvalue())
    logging.getLogger("streamer.audio.capture").log(*args, **kwargs)  # type: ignore[arg-type]
    return stream.getvalue()[before:].splitlines()


def boom() -> BaseException:
    try:
        raise ValueError(f"bad value {TOKEN}")
    except ValueError as exc:
        return exc


# ---------------------------------------------------------------- formats


def test_human_plain_has_date_time_level_and_full_logger_name() -> None:
    out = io.StringIO()
    setup_logging("info", "human", out)
    (line,) = emit(out, logging.WARNING, "mic0: %s", "lost")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} WARNING streamer\.audio\.capture: mic0: lost", line
    ), line
    assert emit(out, logging.DEBUG, "hidden") == []


def test_human_on_a_terminal_is_compact_and_coloured_unless_no_color(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    out = Tty()
    setup_logging("info", "human", out)
    (line,) = emit(out, logging.ERROR, "mic0: gone")
    assert "\x1b[31mERROR\x1b[0m" in line and line.endswith("mic0: gone")
    plain = re.sub(r"\x1b\[[0-9;]*m", "", line)
    assert re.fullmatch(r"\d\d:\d\d:\d\d ERROR audio\.capture: mic0: gone", plain), plain

    monkeypatch.setenv("NO_COLOR", "1")
    setup_logging("info", "human", out)
    (line,) = emit(out, logging.WARNING, "mic0: lost")
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARN  audio\.capture: mic0: lost", line), repr(line)


def test_human_on_a_real_pty_is_the_terminal_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    leader, follower = os.openpty()
    with open(follower, "w", encoding="utf-8", closefd=True) as tty:
        setup_logging("info", "auto", tty)
        logging.getLogger("streamer.service.app").info("ready")
        tty.flush()
        text = os.read(leader, 4096).decode()
    os.close(leader)
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO  service\.app: ready\r?\n", text), repr(text)


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.DEBUG, "<7>"),
        (logging.INFO, "<6>"),
        (logging.WARNING, "<4>"),
        (logging.ERROR, "<3>"),
        (logging.CRITICAL, "<2>"),
    ],
)
def test_journal_priority_prefix_per_level(level: int, prefix: str) -> None:
    out = io.StringIO()
    setup_logging("debug", "journal", out)
    assert emit(out, level, "hello") == [f"{prefix}audio.capture: hello"]


def test_journal_prefixes_every_line_of_a_traceback() -> None:
    out = io.StringIO()
    setup_logging("info", "journal", out)
    lines = emit(out, logging.ERROR, "failed\nsecond line", exc_info=boom())
    assert len(lines) > 4 and all(line.startswith("<3>") for line in lines), lines
    assert lines[0] == "<3>audio.capture: failed"
    assert "<3>Traceback (most recent call last):" in lines
    assert lines[-1].startswith("<3>ValueError: bad value")
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines)  # journald stamps


def test_json_lines_with_utc_time_extras_and_exc() -> None:
    out = io.StringIO()
    setup_logging("info", "json", out)
    (line,) = emit(out, logging.WARNING, "source lost", extra={"stream": "mic0", "n": 3})
    obj = json.loads(line)
    assert set(obj) == {"ts", "level", "logger", "message", "stream", "n"}
    assert (obj["level"], obj["logger"], obj["message"]) == (
        "warning",
        "streamer.audio.capture",
        "source lost",
    )
    assert obj["stream"] == "mic0" and obj["n"] == 3
    assert obj["ts"].endswith("Z")
    ts = dt.datetime.fromisoformat(obj["ts"].replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - ts).total_seconds()) < 60

    (line,) = emit(out, logging.ERROR, "crash", exc_info=boom(), extra={"obj": object()})
    obj = json.loads(line)
    assert obj["exc"].startswith("Traceback") and "ValueError" in obj["exc"]
    assert obj["obj"].startswith("<object object")


def test_expected_faults_stay_one_line_in_every_format() -> None:
    for fmt in ("human", "journal", "json"):
        out = io.StringIO()
        setup_logging("info", fmt, out)
        fault = DeviceError("no audio input device matches 'USB'")
        lines = emit(out, logging.ERROR, "mic0 failed", exc_info=fault)
        assert len(lines) == 1, (fmt, lines)
        assert "mic0 failed: no audio input device matches 'USB'" in lines[0]
        assert "Traceback" not in lines[0] and '"exc"' not in lines[0]


def test_bugs_keep_their_traceback() -> None:
    out = io.StringIO()
    setup_logging("info", "human", out)
    lines = emit(out, logging.ERROR, "unexpected", exc_info=boom())
    assert "Traceback (most recent call last):" in lines


# ---------------------------------------------------------------- auto / journal detection


def test_auto_is_journal_only_for_the_stream_journal_stream_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(tmp_path / "journal", "w") as journal, open(tmp_path / "other", "w") as other:
        st = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert is_journal_stream(journal) and not is_journal_stream(other)
        assert not is_journal_stream(io.StringIO())  # no descriptor
        setup_logging("info", "auto", journal)
        logging.getLogger("streamer").warning("to the journal")
        setup_logging("info", "auto", other)
        logging.getLogger("streamer").warning("to a file")
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not is_journal_stream(journal)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not is_journal_stream(journal)
    assert (tmp_path / "journal").read_text() == "<4>streamer: to the journal\n"
    assert re.fullmatch(r"\S+ \S+ WARNING streamer: to a file\n", (tmp_path / "other").read_text())


def child_stderr(
    code: str, stderr: object, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        stderr=stderr,  # type: ignore[arg-type]
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
        check=True,
    )


CHILD = (
    "import logging; from streamer.service.logs import setup_logging, register_secret\n"
    "setup_logging('info', 'auto'); register_secret('child-secret-123')\n"
    "logging.getLogger('streamer.service.app').warning('hello child-secret-123')\n"
)


def test_auto_in_a_process_whose_stderr_is_the_journal_stream(tmp_path: Path) -> None:
    """As under systemd: stderr is the stream JOURNAL_STREAM names."""
    path = tmp_path / "stderr"
    with open(path, "w") as err:
        st = os.fstat(err.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        child_stderr(CHILD, err, env)
    assert path.read_text() == "<4>service.app: hello ***\n"
    # A child of the service whose stderr is a pipe inherits the variable, not the stream.
    proc = child_stderr(CHILD, subprocess.PIPE, env)
    assert re.fullmatch(r"\S+ \S+ WARNING streamer\.service\.app: hello \*\*\*\n", proc.stderr)


# ---------------------------------------------------------------- secrets


LEAKS = [
    ("token %s", (TOKEN,)),
    ("Authorization: Bearer %s", ("eyJhbGciOiJIUzI1NiJ9.payload.sig",)),
    ("connect mqtt://streamer:%s@broker:1883", (PASSWORD,)),
    ("login password=%s user=x", ("hunter22",)),
    ('config {"password": "%s"}', ("hunter22",)),
    ("GET /v1/captions?token=%s HTTP/1.1", ("abcdef123456",)),
]


@pytest.mark.parametrize("fmt", ["human", "journal", "json"])
def test_secrets_are_masked_everywhere_in_every_format(fmt: str) -> None:
    out = io.StringIO()
    setup_logging("debug", fmt, out)
    register_secret(TOKEN)
    register_secret(PASSWORD)
    for msg, args in LEAKS:
        emit(out, logging.INFO, msg, *args)
    emit(out, logging.ERROR, "failed", exc_info=boom(), extra={"url": f"ws://h/?x={TOKEN}"})
    emit(out, logging.WARNING, "auth", extra={"nested": {"list": [TOKEN]}})
    text = out.getvalue()
    for secret in (TOKEN, PASSWORD, "hunter22", "eyJhbGciOiJIUzI1NiJ9", "abcdef123456"):
        assert secret not in text, (secret, text)
    shown_extras = 2 if fmt == "json" else 0  # only JSON writes extra fields
    assert text.count("***") == len(LEAKS) + 1 + shown_extras


def test_masking_keeps_ordinary_words() -> None:
    register_secret("abc")  # too short to mask without mangling every line
    for text in (
        "refused /metrics from 127.0.0.1: bad bearer token",
        "max_tokens=8 min_tokens=8 tokens: 12",
        "the token file /etc/streamer/token is empty",
        "site.toml: mqtt.password: must not be empty",
        "site.toml: mqtt.password_file: cannot read password file: No such file",
        'expected {"type":"auth","token":…} first',
        "abc",
    ):
        assert redact(text) == text
    register_secret("p@ss word/1")
    assert redact("a p%40ss%20word%2F1 b 'p@ss word/1'") == "a *** b '***'"


def test_other_handlers_see_the_masked_record(caplog: pytest.LogCaptureFixture) -> None:
    """Our filter rewrites the record in place: what other handlers keep is masked too."""
    setup_logging("info", "human", io.StringIO())
    register_secret(TOKEN)
    logging.getLogger("streamer").warning("token is %s", TOKEN)
    assert caplog.records[-1].getMessage() == "token is ***"


# ---------------------------------------------------------------- re-configuration


def test_setup_is_idempotent_and_reconfigures_its_one_handler() -> None:
    root = logging.getLogger()
    first, second = io.StringIO(), io.StringIO()
    handler = setup_logging("info", "human", first)
    assert setup_logging("debug", "journal", first) is handler
    assert setup_logging("debug", "json", second) is handler
    assert [h for h in root.handlers if isinstance(h, logs._Handler)] == [handler]
    logging.getLogger("streamer.x").debug("once")
    assert first.getvalue() == ""
    assert [json.loads(line)["message"] for line in second.getvalue().splitlines()] == ["once"]


def test_noisy_libraries_are_capped_unless_debug() -> None:
    out = io.StringIO()
    setup_logging("info", "human", out)
    for name in ("websockets.server", "aiomqtt", "paho.mqtt.client", "urllib3", "filelock"):
        logging.getLogger(name).info("chatter")
        logging.getLogger(name).warning("%s warns", name)
    text = out.getvalue()
    assert "chatter" not in text and text.count("warns") == 5
    setup_logging("debug", "human", out)
    logging.getLogger("websockets.server").debug("frame")
    assert "frame" in out.getvalue()
    setup_logging("warning", "human", out)  # back to capped
    assert logging.getLogger("transformers").level == logging.WARNING


def test_reload_applies_the_new_section_but_keeps_the_command_line_level() -> None:
    out = io.StringIO()
    configure_logging(LoggingConfig(level="info", format="human"), stream=out)
    assert reload_logging(LoggingConfig(level="info", format="human")) is None
    assert reload_logging(LoggingConfig(level="debug", format="json")) == (
        "log level debug, format json"
    )
    logging.getLogger("streamer").debug("now json")
    assert json.loads(out.getvalue().splitlines()[-1])["message"] == "now json"

    configure_logging(LoggingConfig(level="info"), level_override="warning", stream=out)
    assert reload_logging(LoggingConfig(level="debug", format="journal")) == (
        "log level warning, format journal"
    )
    assert logging.getLogger().level == logging.WARNING


def test_python_warnings_are_logged() -> None:
    import warnings

    out = io.StringIO()
    setup_logging("info", "journal", out)
    warnings.warn("deprecated thing", UserWarning, stacklevel=1)
    assert out.getvalue().startswith("<4>py.warnings: ")


def test_bad_level_or_format_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="log level"):
        setup_logging("loud", "human", io.StringIO())
    with pytest.raises(ValueError, match="log format"):
        setup_logging("info", "xml", io.StringIO())


# ---------------------------------------------------------------- the CLI's error line


def test_report_error_follows_the_active_format() -> None:
    out = io.StringIO()
    report_error("bad config: x", exit_code=78, stream=out)  # no handler yet: auto -> human
    setup_logging("info", "journal", out)
    register_secret(TOKEN)
    report_error(f"cannot use token {TOKEN}\nsecond line", stream=out)
    setup_logging("info", "json", out)
    report_error("model missing", exit_code=1, stream=out)
    human, journal, js = out.getvalue().splitlines()
    assert human == "streamer: error: bad config: x"
    assert journal == "<3>streamer: error: cannot use token *** second line"
    obj = json.loads(js)
    assert (obj["level"], obj["message"], obj["exit_code"]) == ("error", "model missing", 1)
