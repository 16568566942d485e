"""Where a resumed ``/v1/stream`` stream goes on (README "Resuming a stream").

A client whose connection broke (its daemon died, a network blip, a balancer
moved it) sends ``start`` again with ``resume: {"seq": S, "offset": E}``: the
last ``seq`` it received and the end of its last final, and re-sends its
audio from ``E``. It may land on any daemon. :func:`plan_resume` decides,
from what this daemon knows, where the new session begins:

- ``seq`` continues above ``S + SEQ_GAP`` (and, in the stream factory, above
  whatever this process and its durable marks know). The client can only push
  numbering up, never back. The gap leaves room for the events the lost
  daemon published in its last moments that never reached the client (they
  reached MQTT): a number is never given to two different events.
- The audio begins at ``E``: event times stay those of the original stream.
  Except when this daemon ran the stream itself and finalised audio after
  ``E`` after the connection broke (a daemon keeps finalising what it had
  read from a vanished client): those finals (from the recent-finals history)
  are replayed to the client (its translation targets' finals too: they end
  where their source final ends), and the new session begins where the last of
  them ended, dropping the re-sent audio before it. Then neither the client
  nor the other subscribers get that stretch twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamer.core.wire import Resume
from streamer.sinks.history import FinalHistory
from streamer.types import Hypothesis

__all__ = ["SEQ_GAP", "WAIT_S", "ResumePlan", "plan_resume"]

#: Numbers skipped after the client's last ``seq`` (at most this many events of
#: the lost connection can be unknown to the client; a restart skips as many).
SEQ_GAP = 1000
#: How long a resume waits for the earlier session of its stream on this
#: daemon to publish its last finals (after that: "in use", try again).
WAIT_S = 10.0


@dataclass(frozen=True, slots=True)
class ResumePlan:
    """The new session: numbered above ``seq_floor``, its audio from stream
    sample ``start``; ``skip`` samples of the re-sent audio are dropped first
    and ``replay`` (finals the client missed) is sent to it before anything."""

    seq_floor: int
    start: int
    skip: int
    replay: tuple[Hypothesis, ...]


def plan_resume(resume: Resume, history: FinalHistory, stream: str, sample_rate: int) -> ResumePlan:
    """The plan for ``stream`` resumed at ``resume`` (sample positions at ``sample_rate``)."""
    offset = round(resume.offset * sample_rate)
    missed = tuple(
        event
        for event in history.snapshot({stream}, history.per_stream, targets=None)
        if event.seq > resume.seq and round(event.end * sample_rate) > offset
    )
    start = max([offset, *(round(event.end * sample_rate) for event in missed)])
    return ResumePlan(resume.seq + SEQ_GAP, start, start - offset, missed)
