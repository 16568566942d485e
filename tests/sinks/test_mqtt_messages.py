"""What the MQTT sink publishes per event: source and target topics, QoS, Hermes."""

from __future__ import annotations

import json

import pytest

from streamer.sinks.mqtt_messages import HERMES_FINAL_TOPIC, HERMES_PARTIAL_TOPIC, messages_for
from streamer.sinks.mqtt_settings import MqttSettings
from streamer.types import Hypothesis


def ev(kind: str, target: str | None = None, text: str = "Hallo Welt") -> Hypothesis:
    return Hypothesis(
        kind=kind,  # type: ignore[arg-type]
        stream="kitchen/1",
        segment=2,
        seq=7,
        text=text,
        committed=text if kind == "partial" else "",
        start=1.0,
        end=2.0,
        lang="en",
        target=target,
    )


def test_source_and_target_topics_with_the_source_qos() -> None:
    s = MqttSettings(client_id="t", prefix="cap", partial_qos=0, final_qos=1, hermes=True)
    final = messages_for(s, ev("final"))
    assert [(m.topic, m.qos, m.expires) for m in final] == [
        ("cap/kitchen_1/final", 1, False),
        (HERMES_FINAL_TOPIC, 1, False),
    ]
    assert json.loads(final[0].payload) == ev("final").to_wire()
    partial = messages_for(s, ev("partial"))
    assert [(m.topic, m.qos, m.expires) for m in partial] == [
        ("cap/kitchen_1/partial", 0, True),
        (HERMES_PARTIAL_TOPIC, 0, True),
    ]
    # A target's events: its own topics, the same QoS and expiry, never Hermes.
    (de_final,) = messages_for(s, ev("final", "de"))
    assert (de_final.topic, de_final.qos, de_final.expires) == ("cap/kitchen_1/de/final", 1, False)
    assert json.loads(de_final.payload)["target"] == "de"
    (de_partial,) = messages_for(s, ev("partial", "deu_Latn"))
    assert (de_partial.topic, de_partial.qos, de_partial.expires) == (
        "cap/kitchen_1/deu_Latn/partial", 0, True,
    )  # fmt: skip
    # An empty final retracts partials: published, but no Hermes utterance.
    assert [m.topic for m in messages_for(s, ev("final", text=""))] == ["cap/kitchen_1/final"]


def test_each_named_daemon_has_its_own_status_topic() -> None:
    from streamer.errors import ConfigError

    one = MqttSettings(prefix="cap")
    assert (one.status_topic, one.run_topic) == ("cap/status", "cap/status/run")
    box = MqttSettings(prefix="cap", node="box-1")
    assert (box.status_topic, box.run_topic) == ("cap/status/box-1", "cap/status/box-1/run")
    for bad in ("run", "a/b", "+", "x" * 65):
        with pytest.raises(ConfigError) as err:
            MqttSettings(node=bad)
        assert err.value.key == "mqtt.node"
