"""What the MQTT sink publishes for a caption event: topics, QoS, payloads.

Split from :mod:`streamer.sinks.mqtt` (which owns the connection and the
outbox) so that the mapping from an event to its messages reads in one place:

- the source (the speech model's events): ``{prefix}/{stream}/partial|final``,
  and, with ``hermes``, the Rhasspy/Hermes ASR topics;
- a translation target's events (``Hypothesis.target``):
  ``{prefix}/{stream}/{target}/partial|final``, with the QoS (and, for
  partials, the MQTT 5 expiry) of the source topics; never Hermes, whose
  consumers expect what was said, in the language it was said in.

The payload of the caption topics is the WebSocket event
(``Hypothesis.to_wire()``), so one parser serves every sink.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from streamer.sinks.mqtt_settings import MqttSettings
from streamer.types import Hypothesis

__all__ = [
    "HERMES_FINAL_TOPIC",
    "HERMES_PARTIAL_TOPIC",
    "Message",
    "hermes_payload",
    "messages_for",
]

HERMES_PARTIAL_TOPIC = "hermes/asr/partialTextCaptured"
HERMES_FINAL_TOPIC = "hermes/asr/textCaptured"


@dataclass(frozen=True, slots=True)
class Message:
    """One publish: ``expires`` says the MQTT 5 partial expiry applies."""

    topic: str
    payload: str
    qos: int
    expires: bool


def messages_for(settings: MqttSettings, event: Hypothesis) -> list[Message]:
    """The messages that publish ``event`` (a partial or a final), in order."""
    final = event.kind == "final"
    qos = settings.final_qos if final else settings.partial_qos
    topic = settings.topic(event.stream, event.kind, event.target)
    out = [Message(topic, json.dumps(event.to_wire(), ensure_ascii=False), qos, not final)]
    # An empty final (retracted partials) is no utterance; a translation is not ASR.
    if settings.hermes and event.text and event.target is None:
        hermes_topic = HERMES_FINAL_TOPIC if final else HERMES_PARTIAL_TOPIC
        body = json.dumps(hermes_payload(event, settings.hermes_site_id), ensure_ascii=False)
        out.append(Message(hermes_topic, body, qos, not final))
    return out


def hermes_payload(event: Hypothesis, site_id: str = "") -> dict[str, Any]:
    """Rhasspy/Snips Hermes ``AsrTextCaptured`` JSON for ``event``.

    Fields as rhasspy-hermes writes them: ``text``, ``likelihood`` (1.0: the
    model gives no utterance confidence), ``seconds`` (processing time, from
    ``latency_ms``), ``siteId`` (``site_id`` or the stream name), ``sessionId``
    (null: no dialogue session), ``wakewordId`` (null), ``asrTokens`` (one
    list of whitespace tokens with character ranges) and ``lang``.
    """
    text = event.text.strip()
    tokens = [
        {
            "value": m.group(),
            "confidence": 1.0,
            "rangeStart": m.start(),
            "rangeEnd": m.end(),
            "time": None,
        }
        for m in re.finditer(r"\S+", text)
    ]
    seconds = 0.0 if event.latency_ms is None else round(event.latency_ms / 1000.0, 3)
    return {
        "text": text,
        "likelihood": 1.0,
        "seconds": seconds,
        "siteId": site_id or event.stream,
        "sessionId": None,
        "wakewordId": None,
        "asrTokens": [tokens],
        "lang": event.lang,
    }
