"""Reading cross-attention: the probe equals the model's own attention; DTW word spans."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from streamer.engine import alignment
from streamer.engine.alignment import AttentionProbe, cross_queries, default_heads, token_spans
from streamer.engine.decoding import Decoder
from streamer.engine.loader import ModelSpec, load_model
from streamer.testing.tiny_models import FAMILIES


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def decoder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Decoder:
    path = FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    spec = ModelSpec(id=str(path), device="cpu", dtype="float32", source_language="fr")
    return Decoder(load_model(spec))


def test_probe_reads_the_attention_the_model_computes(decoder: Decoder) -> None:
    """The probe's weights equal the decoder's own cross-attentions (eager, output_attentions)."""
    m = decoder.m
    model = m.model
    queries = cross_queries(model, m.family)
    every = [(q.layer, h) for q in queries for h in range(q.heads)]
    probe = AttentionProbe(queries, every)
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(16000).astype(np.float32) * 0.1
    ids = torch.tensor([[*decoder.start_tokens((), "fr"), 50, 51, 52]])
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            enc = decoder.encode(audio)
            cache = decoder.new_cache()
            with probe.capture():
                if m.family == "sed":
                    out = model.decoder(
                        input_ids=ids,
                        encoder_hidden_states=enc.hidden,
                        encoder_attention_mask=enc.mask,
                        past_key_values=cache,
                        use_cache=True,
                        output_attentions=True,
                    )
                else:
                    out = model.model.decoder(
                        input_ids=ids,
                        encoder_hidden_states=enc.hidden,
                        past_key_values=cache,
                        use_cache=True,
                        output_attentions=True,
                    )
                layers = cache.cross_attention_cache.layers
                got = probe.weights(lambda i: layers[i].keys, None).transpose(1, 2)  # (1, n, Q, T)
    finally:
        model.set_attn_implementation("sdpa" if m.family != "speech2text" else "eager")
        probe.close()
    want = torch.cat([a for a in out.cross_attentions], dim=1)  # (1, layers*H, Q, T)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_default_heads() -> None:
    class Q:
        def __init__(self, layer: int) -> None:
            self.layer, self.heads = layer, 4

    queries = [Q(i) for i in range(6)]

    class Gen:
        def __init__(self) -> None:
            self.alignment_heads = [[3, 1], [5, 2]]

    class Model:
        def __init__(self) -> None:
            self.generation_config = Gen()

    model = Model()
    assert default_heads(model, queries) == [(3, 1), (5, 2)]  # type: ignore[arg-type]
    model.generation_config.alignment_heads = [[9, 0]]  # not in this model: the last half
    half = default_heads(model, queries)  # type: ignore[arg-type]
    assert half == [(layer, h) for layer in (3, 4, 5) for h in range(4)]
    with pytest.raises(ValueError, match="does not exist"):
        AttentionProbe(queries, [(6, 0)])  # type: ignore[arg-type]


def test_median_filter_is_the_median() -> None:
    x = np.random.default_rng(1).random((3, 5, 40)).astype(np.float32)
    padded = np.pad(x, [(0, 0), (0, 0), (3, 3)], mode="reflect")
    want = np.median(np.lib.stride_tricks.sliding_window_view(padded, 7, axis=-1), axis=-1)
    np.testing.assert_array_equal(alignment._median_filter(x, 7), want)


def test_spans_follow_a_diagonal_attention() -> None:
    """Token k attends to frames 10k..10k+9: the warping puts it there."""
    tokens, frames = 6, 70
    rows = torch.full((tokens + 1, 2, frames), 1e-4)
    for k in range(tokens + 1):
        rows[k, :, 10 * k : 10 * k + 10] = 1.0
    rows = rows / rows.sum(-1, keepdim=True)
    spans = token_spans(rows, frames, tokens)
    assert len(spans) == tokens
    for k, (start, end) in enumerate(spans):
        assert abs(start - 10 * k) <= 3 and abs(end - 10 * (k + 1)) <= 3, spans
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # contiguous
    # without an end-of-text row the last token ends where its row's path ends
    short = token_spans(rows[:tokens], frames, tokens)
    assert short[:-1] == spans[:-1] and short[-1][1] == frames
    assert token_spans(rows, frames, 0) == []
