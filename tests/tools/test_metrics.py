"""The evaluation tool's metric functions on hand-computed cases."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.metrics import (
    BlockClock,
    TimedEvent,
    bleu_chrf,
    final_latencies,
    first_partial_latencies,
    laal,
    normalized_erasure,
    partial_latencies,
    quality_figures,
    relative_diff,
    stable_word_times,
    summarize,
    text_normalizer,
    word_error_rate,
)


def partial(seg, text, time, committed="", start=0.0, end=0.0):
    return TimedEvent("partial", seg, text, start, end, time, committed)


def final(seg, text, time, start=0.0, end=0.0):
    return TimedEvent("final", seg, text, start, end, time)


# ------------------------------------------------------------------ LAAL


def test_laal_stops_at_the_first_word_after_the_source_ends():
    # |X| = 4000 ms, |Y| = 5 > |Y*| = 4 -> step 4000/5 = 800 ms per word.
    # terms: 1000, 2000-800, 3500-1600, 4500-2400 (first d >= |X|: tau = 4)
    delays = [1000.0, 2000.0, 3500.0, 4500.0, 5000.0]
    assert laal(delays, 4000.0, 4) == pytest.approx((1000 + 1200 + 1900 + 2100) / 4)


def test_laal_uses_the_longer_of_hypothesis_and_reference():
    # |Y*| = 8 > |Y| = 2: step 4000/8 = 500 ms; no word after the end -> tau = |Y|
    assert laal([1000.0, 1500.0], 4000.0, 8) == pytest.approx((1000 + 1000) / 2)


def test_laal_is_the_first_delay_when_everything_comes_after_the_source():
    assert laal([5000.0, 5100.0], 4000.0, 2) == pytest.approx(5000.0)


def test_laal_without_output_is_undefined():
    assert laal([], 4000.0, 3) is None


# ------------------------------------------------------------------ stable words


def test_word_is_stable_once_committed_text_covers_it_whole():
    events = [
        partial(0, "Hello wor", 1.0),
        partial(0, "Hello world", 2.0, committed="Hello wor"),  # covers "Hello" only
        partial(0, "Hello world, again", 3.0, committed="Hello world,"),
        final(0, "Hello world, again.", 4.0),
        final(1, "Bye", 6.0),
    ]
    assert stable_word_times(events) == [2.0, 3.0, 4.0, 6.0]


def test_segment_without_final_has_no_output_words():
    assert stable_word_times([partial(0, "lost words", 1.0, committed="lost")]) == []


# ------------------------------------------------------------------ erasure


def test_normalized_erasure_counts_words_beyond_the_common_prefix():
    events = [
        partial(0, "the cat", 1.0),  # from nothing: 0 erased
        partial(0, "the cap sat", 2.0),  # prefix "the": erases "cat" (1)
        final(0, "the cat sat on", 3.0),  # prefix "the": erases "cap sat" (2)
        partial(1, "hello", 4.0),  # its final is empty (not emitted): erases 1
    ]
    er = normalized_erasure(events)
    assert (er.erased_words, er.final_words) == (4, 4)
    assert er.normalized == pytest.approx(1.0)


def test_append_only_displays_erase_nothing():
    events = [partial(0, "a", 1.0), partial(0, "a b", 2.0), final(0, "a b c", 3.0)]
    assert normalized_erasure(events).normalized == 0.0
    assert normalized_erasure([]).normalized is None


# ------------------------------------------------------------------ latency


def test_block_clock_arrival_times():
    clock = BlockClock(block=1600, total=16000, sample_rate=16000)
    assert clock.containing(0) == pytest.approx(0.1)
    assert clock.containing(3200) == pytest.approx(0.3)  # first sample of block 2
    assert clock.covering(3200) == pytest.approx(0.2)  # last sample 3199 is in block 1
    assert clock.covering(3201) == pytest.approx(0.3)
    assert clock.covering(99999) == pytest.approx(1.0)  # clamped to the last block
    short = BlockClock(block=1600, total=2000, sample_rate=16000)
    assert short.covering(2000) == pytest.approx(2000 / 16000)  # a short last block


def test_event_latencies():
    clock = BlockClock(block=1600, total=32000, sample_rate=16000)
    events = [
        partial(0, "a", 1.1, start=0.25, end=0.5),  # start sample 4000: block 2 at 0.3 s
        partial(0, "a b", 1.5, start=0.25, end=1.0),  # end 16000 covered by block 9 at 1.0 s
        final(0, "a b", 1.9, start=0.25, end=1.2),  # end 19200: block 11 at 1.2 s
        final(1, "c", 2.5, start=1.5, end=2.0),  # a segment without partials
    ]
    assert first_partial_latencies(events, clock) == pytest.approx([800.0])
    assert partial_latencies(events, clock) == pytest.approx([600.0, 500.0])
    assert final_latencies(events, clock) == pytest.approx([700.0, 500.0])


def test_summary_percentiles():
    s = summarize([400.0, 100.0, 300.0, 200.0])
    assert s["n"] == 4
    assert s["p50"] == pytest.approx(250.0)
    assert s["p95"] == pytest.approx(385.0)  # linear: 300 + 0.85 * 100
    assert s["mean"] == pytest.approx(250.0) and s["max"] == 400.0
    assert summarize([]) == {"n": 0, "mean": None, "p50": None, "p95": None, "max": None}


# ------------------------------------------------------------------ quality


def test_wer_ignores_case_punctuation_and_number_spelling_in_english():
    assert text_normalizer("en")("Twenty dollars, Mr. Smith!") == "$20 mister smith"
    out = word_error_rate(["And so, my fellow Americans!"], ["and so my fellow americans"], "en")
    assert out is not None and out["wer"] == 0.0
    out = word_error_rate(["the cat sat", "on the mat"], ["the cat sit", "on mat"], "en")
    assert out is not None
    assert out["wer"] == pytest.approx(2 / 6)
    assert (out["substitutions"], out["deletions"], out["ref_words"]) == (1, 1, 6)


def test_wer_uses_the_basic_normaliser_for_other_languages():
    assert text_normalizer("fr")("Ça, été: déjà!") == "ça été déjà"
    out = word_error_rate(["Ça, été: déjà!"], ["ça été déjà"], "fr")
    assert out is not None and out["wer"] == 0.0


def test_wer_skips_empty_references():
    assert word_error_rate(["", "(laughs) um!"], ["a", "b"], "en") is None
    out = word_error_rate(["", "a b"], ["x", "a"], "en")
    assert out is not None and out["wer"] == 0.5 and out["skipped_empty_refs"] == 1


def test_bleu_and_chrf_on_normalised_text():
    same = bleu_chrf(["The cat sat on the mat."], ["the cat sat on the mat"], "en")
    assert same is not None
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    other = bleu_chrf(["the cat sat on the mat"], ["a dog stood under a table"], "en")
    assert other is not None and other["bleu"] < 5 and other["chrf"] < 30
    assert bleu_chrf([], [], "en") is None


def test_relative_diff():
    assert relative_diff(0.12, 0.10) == pytest.approx(0.2)
    assert relative_diff(0.1, 0.0) is None
    assert relative_diff(None, 0.1) is None


def test_quality_against_references_and_offline():
    q = quality_figures(
        "transcribe", "en", ["the cat sat", "on the mat"], ["the cat sit", "on the mat"],
        ["the cat sat", "on a mat"],
    )  # fmt: skip
    assert (q["basis"], q["metric"]) == ("reference", "wer")
    assert q["streaming"]["wer"] == pytest.approx(1 / 6)
    assert q["offline"]["wer"] == pytest.approx(1 / 6)
    assert q["relative_diff"] == {"wer": pytest.approx(0.0)}
    assert q["consistency"]["wer"] == pytest.approx(2 / 6)  # streaming vs offline output


def test_quality_without_a_reference_is_consistency_only():
    q = quality_figures(
        "translate", "en", ["a ref", None], ["hello there", "x"], ["hello there", "x"]
    )
    assert q["basis"] == "offline" and "streaming" not in q and "note" in q
    assert q["consistency"]["chrf"] == pytest.approx(100.0)
    same = "the cat sat on the mat"
    q = quality_figures("translate", "en", [same], [same], ["the cat sat on the rug"])
    assert q["metric"] == "bleu,chrf" and q["streaming"]["bleu"] == pytest.approx(100.0)
    assert q["relative_diff"]["bleu"] is not None and q["relative_diff"]["bleu"] > 0
