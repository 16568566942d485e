"""Console sink: in-place partial line on a TTY, plain lines elsewhere."""

from __future__ import annotations

import asyncio
import dataclasses
import io

from streamer.sinks.console import CLEAR_LINE, DIM, UNDIM, ConsoleSink, format_final
from streamer.sinks.fanout import Fanout
from streamer.types import Hypothesis


class FlushCountingIO(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def partial(
    committed: str, tentative: str, stream: str = "demo", seq: int = 0, segment: int = 0
) -> Hypothesis:
    return Hypothesis(
        kind="partial",
        stream=stream,
        segment=segment,
        seq=seq,
        text=committed + tentative,
        committed=committed,
        tentative=tentative,
        start=0.0,
        end=1.0,
    )


def final(
    text: str, stream: str = "demo", start: float = 0.0, end: float = 4.2, segment: int = 0
) -> Hypothesis:
    return Hypothesis(
        kind="final", stream=stream, segment=segment, seq=9, text=text, start=start, end=end
    )


def lost(stream: str = "demo") -> Hypothesis:
    return dataclasses.replace(
        final("no audio for 1 s", stream=stream), kind="source_lost", start=7.5, end=7.5
    )


def tty(width: int = 80) -> tuple[io.StringIO, ConsoleSink]:
    out = io.StringIO()
    return out, ConsoleSink(out, is_tty=True, color=False, width=width)


def take(out: io.StringIO) -> str:
    """What was written since the last call."""
    text = out.getvalue()
    out.seek(0)
    out.truncate()
    return text


def test_format_final_shows_stream_and_time_range() -> None:
    assert format_final(final("Hello there.", start=0.0, end=4.2)) == "[demo 0.0–4.2s] Hello there."
    assert format_final(final("x", stream="mic0", start=12.48, end=15.3)) == "[mic0 12.5–15.3s] x"


def test_tty_rewrites_partial_line_in_place_then_keeps_final() -> None:
    out = FlushCountingIO()
    sink = ConsoleSink(out, is_tty=True, color=False, width=80)
    sink.write(partial("Hello", " wor"))
    sink.write(partial("Hello world", ", how"))
    sink.write(final("Hello world, how are you?"))
    assert out.getvalue() == (
        "\r\x1b[2K[demo] Hello wor"
        "\r\x1b[2K[demo] Hello world, how"
        "\r\x1b[2K[demo 0.0–4.2s] Hello world, how are you?\n"
    )
    assert out.flushes == 3  # one flush per write
    # The rewritten partials left no kept line behind: only the final has a newline.
    assert out.getvalue().count("\n") == 1


def test_tty_dims_tentative_tail_when_colored() -> None:
    out = io.StringIO()
    sink = ConsoleSink(out, is_tty=True, color=True, width=80)
    sink.write(partial("Guten Morgen,", " wie"))
    assert out.getvalue() == f"{CLEAR_LINE}[demo] Guten Morgen,{DIM} wie{UNDIM}"


def test_tty_long_partial_is_cut_at_the_left_to_one_line() -> None:
    out = io.StringIO()
    sink = ConsoleSink(out, is_tty=True, color=False, width=20)
    sink.write(partial("a" * 30, "bcd"))
    line = out.getvalue().removeprefix(CLEAR_LINE)
    assert len(line) == 20
    assert line == "[demo] …" + "a" * 9 + "bcd"


def test_tty_redraws_other_streams_partial_after_a_final() -> None:
    out = io.StringIO()
    sink = ConsoleSink(out, is_tty=True, color=False, width=80)
    sink.write(partial("left talk", "", stream="L"))
    sink.write(partial("right talk", "", stream="R"))
    sink.write(partial("left talk goes on", "", stream="L"))  # both speak at once
    out.seek(0)
    out.truncate()
    sink.write(final("right done", stream="R"))
    assert out.getvalue() == (f"{CLEAR_LINE}[R 0.0–4.2s] right done\n[L] left talk goes on")
    sink.finish()
    assert out.getvalue().endswith(CLEAR_LINE)  # dangling partial cleared at exit


def test_tty_partial_of_an_empty_final_goes_with_the_next_event_of_its_stream() -> None:
    # Segment 0's final was empty: the session sends nothing, "uh" dangles.
    out, sink = tty()
    sink.write(partial("uh", "", segment=0))
    take(out)
    sink.write(final("Next one.", segment=1))  # its partials never reached us
    assert take(out) == f"{CLEAR_LINE}[demo 0.0–4.2s] Next one.\n"
    sink.write(partial("um", "", segment=2))
    sink.write(partial("Then", "", segment=3))
    assert take(out) == f"{CLEAR_LINE}[demo] um{CLEAR_LINE}[demo] Then"
    sink.write(lost())
    assert take(out) == f"{CLEAR_LINE}[demo 7.5s] source lost: no audio for 1 s\n"
    sink.finish()
    assert take(out) == ""  # nothing left on the line to clear


def test_tty_final_of_an_older_segment_keeps_the_newer_partial() -> None:
    # Segment 0 is still being finalised while segment 1 already speaks.
    out, sink = tty()
    sink.write(partial("one", "", segment=0))
    sink.write(partial("two", "", segment=1))
    take(out)
    sink.write(final("One.", segment=0))
    assert take(out) == f"{CLEAR_LINE}[demo 0.0–4.2s] One.\n[demo] two"
    sink.write(final("Two.", segment=1))
    assert take(out) == f"{CLEAR_LINE}[demo 0.0–4.2s] Two.\n"


def test_tty_dangling_partial_of_a_silent_stream_is_not_redrawn() -> None:
    # L's segment 3 ended with an empty final; then only R speaks.
    out, sink = tty()
    sink.write(partial("left mumble", "", stream="L", segment=3))
    for segment in (7, 8):
        sink.write(partial("right talk", "", stream="R", segment=segment))
        take(out)
        sink.write(final("right done", stream="R", segment=segment))
        assert take(out) == f"{CLEAR_LINE}[R 0.0–4.2s] right done\n"
    sink.write(partial("left again", "", stream="L", segment=4))
    assert take(out) == f"{CLEAR_LINE}[L] left again"


def test_tty_status_event_clears_its_streams_partial_only() -> None:
    out, sink = tty()
    sink.write(partial("left talk", "", stream="L"))
    sink.write(partial("right talk", "", stream="R"))
    take(out)
    sink.write(lost(stream="R"))
    assert take(out) == f"{CLEAR_LINE}[R 7.5s] source lost: no audio for 1 s\n[L] left talk"
    sink.write(lost(stream="L"))
    assert take(out) == f"{CLEAR_LINE}[L 7.5s] source lost: no audio for 1 s\n"


def test_tty_turning_partials_off_clears_the_partial_line() -> None:
    out, sink = tty()
    sink.write(partial("Hello", " wor"))
    take(out)
    sink.partials = False  # SIGHUP reload: no partial will replace it any more
    assert take(out) == CLEAR_LINE
    sink.write(final("Hello world."))
    assert take(out) == "[demo 0.0–4.2s] Hello world.\n"


async def test_tty_run_clears_a_dangling_partial_at_the_end() -> None:
    fan = Fanout()
    out, sink = tty()
    sub = fan.subscribe(kinds=sink.kinds)
    task = asyncio.create_task(sink.run(sub))
    fan.publish(partial("uh", "", segment=0))  # an empty final follows: no event
    fan.close_all("done")
    await asyncio.wait_for(task, 2.0)
    assert out.getvalue() == f"{CLEAR_LINE}[demo] uh{CLEAR_LINE}"


def test_plain_mode_has_no_escape_codes() -> None:
    out = io.StringIO()
    sink = ConsoleSink(out, is_tty=False)
    sink.write(partial("Hello", " wor"))
    sink.write(partial("", ""))  # empty partials are not worth a line
    sink.write(final("Hello world."))
    sink.finish()
    assert out.getvalue() == "~ [demo] Hello wor\n[demo 0.0–4.2s] Hello world.\n"
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()


def test_is_tty_detected_from_the_stream() -> None:
    # A StringIO is no terminal, so the default is plain mode without colour.
    sink = ConsoleSink(io.StringIO())
    assert not sink.is_tty and not sink.color


def test_partials_off_prints_finals_only() -> None:
    out = io.StringIO()
    sink = ConsoleSink(out, partials=False, is_tty=True)
    assert sink.kinds == frozenset({"final", "source_lost", "source_restored"})
    sink.write(partial("Hello", ""))
    sink.write(final("Hello."))
    assert out.getvalue() == "[demo 0.0–4.2s] Hello.\n"


def test_source_events_print_a_kept_line() -> None:
    out = io.StringIO()
    sink = ConsoleSink(out, is_tty=False)
    lost = dataclasses.replace(final("no audio for 1 s"), kind="source_lost", start=7.5, end=7.5)
    sink.write(lost)
    assert out.getvalue() == "[demo 7.5s] source lost: no audio for 1 s\n"


async def test_run_prints_until_subscription_closes() -> None:
    fan = Fanout()
    out = io.StringIO()
    sink = ConsoleSink(out, is_tty=False)
    sub = fan.subscribe(kinds=sink.kinds)
    task = asyncio.create_task(sink.run(sub))
    fan.publish(partial("one", " two"))
    fan.publish(final("one two three"))
    fan.close_all("done")
    assert await fan.wait_drained(2.0)
    await asyncio.wait_for(task, 2.0)
    # The partial was superseded by the final before the sink ran: never shown.
    assert out.getvalue() == "[demo 0.0–4.2s] one two three\n"


def test_an_empty_final_retracts_its_partial_and_prints_nothing() -> None:
    out, sink = tty()
    sink.write(partial("", "uh", segment=4))
    take(out)
    sink.write(final("", segment=4))  # the speech came to nothing
    assert take(out) == CLEAR_LINE and sink.lines == 0
    sink.finish()
    assert take(out) == ""  # the line is already clear
    out = io.StringIO()
    plain = ConsoleSink(out, is_tty=False)
    plain.write(partial("", "uh", segment=4))
    plain.write(final("", segment=4))
    assert out.getvalue() == "~ [demo] uh\n" and plain.lines == 1
