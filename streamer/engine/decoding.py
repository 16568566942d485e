"""Encoding a window and decoding it token by token with the KV cache.

Shapes (B = 1 stream here; batching is the scheduler's job):
  audio (L,) float32 -> features -> encoder states (1, T, D)
  prefix ids (1, P) prefilled in one decoder pass, then one token per pass
  with ``past_key_values`` (self-attention grows, cross-attention K/V are
  computed on the first pass only and reused).
The start tokens are the family's (Whisper: [startofprev, prompt...,] sot,
language, task, notimestamps; SED/Speech2Text: decoder start [+ language]),
followed by the forced tokens already committed in this window. The logits
processing mirrors ``generate(do_sample=False, num_beams=1)``: suppress tokens
everywhere, begin-suppress tokens on the first generated position.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamer.core.session import DecodeRequest, DecodeResult
from streamer.core.stabilizer import attends_late
from streamer.engine.alignment import (
    AttentionProbe,
    cross_queries,
    default_heads,
    frame_samples,
    peak_frames,
    token_spans,
)
from streamer.engine.beams import BeamSearch
from streamer.engine.loader import LoadedModel, decodable_targets, whisper_task
from streamer.engine.tokens import TokenPieces
from streamer.engine.tokens import find_loop as find_loop  # re-exported for callers
from streamer.types import FloatArray


@dataclass(slots=True)
class EncodedWindow:
    hidden: torch.Tensor  # (1, T, D), already projected to the decoder's width
    mask: torch.Tensor | None  # (1, T) encoder frame mask for cross-attention


@dataclass(slots=True)
class Alignment:
    """What one decode wants of the attention (see ``alignment.py``)."""

    stop_frames: int = 0  # AlignAtt: stop at a token peaking in the last frames (0: never)
    audio_frames: int = 0  # encoder frames covering the window's audio
    keep_rows: bool = False  # keep every row (word timestamps), not only peaks


# Whisper was trained on audio followed by padding: with a shortened input and
# nothing after the speech it runs on ("and so my fellow Americans. And") or
# loops. Three seconds of silence after the window restored the padded
# model's output on our clips at about half the encoder cost (tools/evaluate.py).
TRIMMED_TAIL_S = 3.0


#: Rows for which the LM head runs as ``W @ h.T`` on the CPU (see :func:`project`).
_WEIGHT_LEFT_ROWS = range(7, 16)


def project(head: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Logits ``head(hidden)`` of (B, D) hidden states, as float32 (B, V).

    On the CPU, MKL's fp32 ``F.linear`` (``h @ W.T``) is 1.5-2.5x slower for
    7-15 rows than the same product as ``W @ h.T`` (Whisper base's 51865 x 512
    head, one thread: 31 ms against 21 ms for 8 rows, 44 against 21 for 12;
    8 ms either way for 1 row), and the head is the largest matrix of a
    decode step, so it takes the faster form there. Same products, summed in
    another order: logits differ in the last bits only.
    """
    weight = getattr(head, "weight", None)
    if (
        type(head) is torch.nn.Linear
        and head.bias is None
        and weight is not None
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and hidden.dim() == 2
        and hidden.shape[0] in _WEIGHT_LEFT_ROWS
    ):
        return (weight @ hidden.T).T
    return head(hidden).float()  # type: ignore[no-any-return]


class DecodeCancelled(Exception):
    """The request was superseded while it was being decoded."""


def _never() -> bool:
    return False


class Decoder:
    """Runs one ``DecodeRequest`` on a loaded model (called on the engine thread)."""

    def __init__(
        self, loaded: LoadedModel, whisper_input: str = "trimmed", tail_s: float = TRIMMED_TAIL_S
    ) -> None:
        """``tail_s``: silence after a trimmed Whisper window. 1-2 s instead of 3 cut the
        encoder's cost by 12-24 %, but Whisper then decoded longer and WER rose on the
        English sets (README, "Where the CPU time goes"), so 3 s stays the default."""
        if whisper_input not in ("padded", "trimmed"):
            raise ValueError(f"whisper_input must be padded or trimmed, not {whisper_input!r}")
        if tail_s < 0:
            raise ValueError(f"tail_s must be >= 0, not {tail_s!r}")
        self.m = loaded
        self.trimmed = loaded.family == "whisper" and whisper_input == "trimmed"
        self.tail_s = tail_s
        self.model = loaded.model
        self.pieces = TokenPieces(loaded.tokenizer)
        self.loop_guard = True  # exactness tests against generate() turn it off
        self.num_beams = max(1, loaded.spec.num_beams)
        self._encoder = self.model.get_encoder()
        self._proj = getattr(self.model, "enc_to_dec_proj", None)
        self.pads_exactly = self._pads_exactly()
        # A *ForCausalLM decoder that can: the logits of the last position only (prefill)
        self._keep_last: dict[str, int] = {}
        lm = getattr(self.model, "decoder", None) if loaded.family == "sed" else None
        if lm is not None and "logits_to_keep" in inspect.signature(lm.forward).parameters:
            self._keep_last = {"logits_to_keep": 1}
        head = self.model.get_output_embeddings()  # int8 (loader.Int8Linear): no .weight
        vocab = int(getattr(head, "out_features", None) or head.weight.shape[0])
        self._suppress = torch.tensor(
            [t for t in loaded.suppress_tokens if t < vocab], dtype=torch.long, device=loaded.device
        )
        self._begin_suppress = torch.tensor(
            [t for t in loaded.begin_suppress_tokens if t < vocab],
            dtype=torch.long,
            device=loaded.device,
        )
        queries = cross_queries(self.model, loaded.family)
        heads = list(loaded.spec.alignment_heads) or default_heads(self.model, queries)
        self.probe = AttentionProbe(queries, heads)
        self.frame_samples = frame_samples(self.model, loaded.family, loaded.feature_extractor)

    def alignment(self, req: DecodeRequest) -> Alignment | None:
        """The attention a request needs read (None: none)."""
        if not req.alignatt_frames and not req.words:
            return None
        frames = -(-len(req.audio) // self.frame_samples)
        return Alignment(req.alignatt_frames, frames, req.words)

    def attention(self, cache: Any, frame_mask: torch.Tensor | None) -> torch.Tensor:
        """Alignment heads' attention (B, Q, n, T) of the pass just captured on ``cache``."""
        layers = cache.cross_attention_cache.layers
        return self.probe.weights(lambda i: layers[i].keys, frame_mask)

    def result(
        self,
        req: DecodeRequest,
        tokens: list[int],
        looped: bool,
        lang: str | None,
        align: Alignment | None,
        rows: torch.Tensor | None,
    ) -> DecodeResult:
        """The answer to ``req``; ``rows`` (forced + new [+ end], n, T) when aligned."""
        pieces = self.pieces.pieces(list(req.forced), tokens)
        extra: dict[str, Any] = {}
        if align is not None and rows is not None:
            forced = len(req.forced)
            extra = {
                "peaks": tuple(peak_frames(rows[forced : forced + len(tokens)])),
                "frame_samples": self.frame_samples,
                "audio_frames": align.audio_frames,
            }
            if align.keep_rows:
                spans = token_spans(rows, align.audio_frames, forced + len(tokens))
                extra["spans"] = tuple(spans)
        return DecodeResult(
            request_id=req.request_id,
            tokens=tuple(tokens),
            pieces=tuple(pieces),
            looped=looped,
            lang=lang,
            **extra,
        )

    def forced_rows(self, enc: EncodedWindow, start: list[int], tokens: list[int]) -> torch.Tensor:
        """Attention rows of ``tokens`` (and the position after them) in one forced pass.

        For decodes that did not read the attention as they went (beam search).
        """
        ids = torch.tensor([start + tokens], dtype=torch.long, device=self.m.device)
        cache = self.new_cache()
        with self.probe.capture():
            self.logits(ids, enc, cache)
            rows = self.attention(cache, None if enc.mask is None else enc.mask.bool())
        return rows[0, len(start) - 1 :]

    # --------------------------------------------------------------- encoder
    def _pads_exactly(self) -> bool:
        """Whether padded windows encode like unpadded ones.

        True for wav2vec2-style encoders with layer norm in the feature encoder
        and an attention mask from the feature extractor (DESIGN.md section 8:
        the group-norm variants change under padding, Speech2Text's subsampler
        leaks it), so windows of different lengths can share one encoder pass.
        """
        if self.m.family != "sed":
            return False
        norm = getattr(self._encoder.config, "feat_extract_norm", None)
        return norm == "layer" and bool(
            getattr(self.m.feature_extractor, "return_attention_mask", False)
        )

    def bucket(self, samples: int) -> int:
        """Which encoder batch a window joins.

        Windows of one bucket encode together in one pass. Trimmed Whisper
        pads to whole seconds and padded Whisper to 30 s, alone or batched;
        encoders with an exact padding mask batch any lengths, grouped by
        power-of-two seconds to bound the padding; the others only batch
        windows of equal length. So batching never changes a result.
        """
        rate = self.m.sample_rate
        if self.trimmed:
            return min(-(-samples // rate) * rate, int(self.m.feature_extractor.n_samples))
        if self.m.family == "whisper":
            return int(self.m.feature_extractor.n_samples)
        if self.pads_exactly:
            size = rate // 2
            while size < samples:
                size *= 2
            return -size  # a key, not a length: padding is to the longest in the batch
        return samples

    def features(self, audios: list[FloatArray]) -> dict[str, torch.Tensor]:
        """Model input features of equally long windows, one row each."""
        fe = self.m.feature_extractor
        kwargs: dict[str, Any] = {"sampling_rate": self.m.sample_rate, "return_tensors": "pt"}
        batch = [np.asarray(a, dtype=np.float32) for a in audios]
        if self.trimmed:
            kwargs["padding"] = "longest"
            max_samples = int(fe.n_samples)
            padded = []
            for audio in batch:
                target = self.bucket(len(audio))
                tail = min(target - len(audio) + round(self.tail_s * self.m.sample_rate),
                           max_samples - len(audio))  # fmt: skip
                padded.append(np.pad(audio, (0, max(tail, 0))))
            batch = padded
        if self.m.family != "whisper":
            kwargs["return_attention_mask"] = True
        if self.pads_exactly:
            kwargs["padding"] = "longest"
        out = fe(batch if len(batch) > 1 else batch[0], **kwargs)
        name = self._encoder.main_input_name
        feats: dict[str, torch.Tensor] = {name: out[name].to(self.m.device, dtype=self.m.dtype)}
        if self.m.family != "whisper" and "attention_mask" in out:
            feats["attention_mask"] = out["attention_mask"].to(self.m.device)
        return feats

    def encode(self, audio: FloatArray) -> EncodedWindow:
        return self.encode_batch([audio])[0]

    def encode_batch(self, audios: list[FloatArray]) -> list[EncodedWindow]:
        """Encode windows of one bucket in one encoder pass."""
        feats = self.features(audios)
        if self.trimmed:
            hidden = self._encode_trimmed(feats["input_features"])
        else:
            hidden = self._encoder(**feats).last_hidden_state
        mask = None
        if "attention_mask" in feats and hasattr(
            self._encoder, "_get_feature_vector_attention_mask"
        ):
            mask = self._encoder._get_feature_vector_attention_mask(
                hidden.shape[1], feats["attention_mask"]
            )
        elif "attention_mask" in feats and self.m.family == "speech2text":
            mask = self.model.model._get_feature_vector_attention_mask(
                hidden.shape[1], feats["attention_mask"]
            )
        if self._proj is not None and self.m.family == "sed":
            hidden = self._proj(hidden)
        return [
            EncodedWindow(hidden[i : i + 1], None if mask is None else mask[i : i + 1])
            for i in range(hidden.shape[0])
        ]

    def _encode_trimmed(self, feats: torch.Tensor) -> torch.Tensor:
        """Whisper's encoder on a window shorter than 30 s.

        The stock forward insists on 3000 mel frames; this runs the same layers
        on the window's own frames with the first T rows of the position table
        (the encoder is otherwise local up to global self-attention). For a
        full 3000-frame input it equals the stock encoder exactly.
        """
        enc = self._encoder
        max_frames = enc.config.max_source_positions * enc.conv1.stride[0] * enc.conv2.stride[0]
        frames = min(max(feats.shape[-1] + feats.shape[-1] % 2, 2), max_frames)
        if feats.shape[-1] < frames:
            feats = torch.nn.functional.pad(
                feats, (0, frames - feats.shape[-1]), value=float(feats.min())
            )
        feats = feats[..., :frames]
        x = torch.nn.functional.gelu(enc.conv1(feats))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        for layer in enc.layers:
            x = layer(x, None)
            if isinstance(x, tuple):
                x = x[0]
        return enc.layer_norm(x)  # type: ignore[no-any-return]

    # --------------------------------------------------------------- decoder
    def new_cache(self) -> Any:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        return EncoderDecoderCache(DynamicCache(), DynamicCache())

    def logits(self, ids: torch.Tensor, enc: EncodedWindow, cache: Any) -> torch.Tensor:
        """Logits of the last position, (1, V), advancing ``cache``."""
        fam = self.m.family
        if fam == "sed":
            out = self.model.decoder(
                input_ids=ids,
                encoder_hidden_states=enc.hidden,
                encoder_attention_mask=enc.mask,
                past_key_values=cache,
                use_cache=True,
                **self._keep_last,
            )
            return out.logits[:, -1, :].float()  # type: ignore[no-any-return]
        if fam in ("whisper", "speech2text"):
            dec = self.model.model.decoder
            kw: dict[str, Any] = {}
            if enc.mask is not None:
                kw["encoder_attention_mask"] = enc.mask
            out = dec(
                input_ids=ids,
                encoder_hidden_states=enc.hidden,
                past_key_values=cache,
                use_cache=True,
                **kw,
            )
            return project(self.model.get_output_embeddings(), out.last_hidden_state[:, -1, :])
        from transformers.modeling_outputs import BaseModelOutput

        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=enc.hidden),
            attention_mask=None,
            decoder_input_ids=ids,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1, :].float()  # type: ignore[no-any-return]

    def start_tokens(
        self,
        prompt: tuple[int, ...],
        lang: str | None,
        task: str | None = None,
        target: str | None = None,
    ) -> list[int]:
        """``target``: decode into that language (``DecodeRequest.target``; a decoder
        that picks its language by a token only, see ``loader.decodable_targets``)."""
        m = self.m
        if m.whisper_prompt:  # Whisper, or a SED with Whisper's decoder (whisper_sed.py)
            ids: list[int] = []
            prev = m.extra.get("startofprev")
            if prompt and prev is not None:
                text_prompt = [t for t in prompt if t < m.eos_token_id]
                ids = [prev, *text_prompt[-int(m.extra["max_prompt"]) :]]
            ids.append(int(m.extra["sot"]))
            if m.lang_to_id and lang is not None:
                ids.append(m.lang_to_id[lang])
                chosen = whisper_task(lang, m.spec.target_language, task or m.spec.task)
                ids.append(m.task_to_id[chosen])
            if m.extra.get("no_timestamps") is not None:
                ids.append(int(m.extra["no_timestamps"]))
            return ids
        start = m.model.generation_config.decoder_start_token_id
        if start is None:
            start = m.model.config.decoder_start_token_id
        ids = [int(start)]
        if target is not None:
            ids.append(self.target_token(target))
        elif "lang_token" in m.extra:
            ids.append(int(m.extra["lang_token"]))
        return ids

    def target_token(self, target: str) -> int:
        """The decoder's language token of ``target``; ValueError if it has none."""
        known: dict[str, int] = self.m.extra.setdefault("target_tokens", {})
        if target not in known:  # (the vocabulary is read once per target)
            tokens = decodable_targets(self.m, (target,))
            if tokens is None:
                raise ValueError(f"{self.m.name} cannot decode into {target!r} (no language token)")
            known[target] = tokens[target]
        return known[target]

    def detect_language(self, enc: EncodedWindow) -> str:
        """Whisper language identification: argmax over language tokens after sot."""
        m = self.m
        ids = torch.tensor([[int(m.extra["sot"])]], device=m.device)
        logits = self.logits(ids, enc, self.new_cache())[0]
        langs = list(m.lang_to_id.items())
        lang_ids = torch.tensor([i for _, i in langs], device=m.device)
        best = int(torch.argmax(logits[lang_ids]).item())
        return langs[best][0]

    def greedy(
        self,
        enc: EncodedWindow,
        prefix: list[int],
        max_new_tokens: int,
        cancelled: Callable[[], bool] = _never,
        align: Alignment | None = None,
        forced: int = 0,
        rows: list[torch.Tensor] | None = None,
    ) -> tuple[list[int], bool]:
        """Greedy decode after ``prefix``; returns (new tokens without EOS, looped).

        ``cancelled`` is polled between tokens: a superseded request stops
        within one decoder pass (``DecodeCancelled``). With ``align`` the
        attention rows (n, T) of the last ``forced`` prefix tokens and of every
        new token (and of the end of text) go to ``rows``, and AlignAtt may
        stop the decode.
        """
        cache = self.new_cache()
        ids = torch.tensor([prefix], dtype=torch.long, device=self.m.device)
        rows = [] if rows is None else rows
        mask = None if align is None or enc.mask is None else enc.mask.bool()
        logits = self._pass(ids, enc, cache, align, mask, rows, keep=forced + 1)
        out: list[int] = []
        for step in range(max_new_tokens):
            self.suppress(logits, first=step == 0)
            tok = int(torch.argmax(logits, dim=-1).item())
            if tok == self.m.eos_token_id:
                break
            out.append(tok)
            cut = find_loop(out) if self.loop_guard else None
            if cut is not None:
                del rows[forced + cut :]
                return out[:cut], True
            if step + 1 == max_new_tokens or stops_early(align, rows):
                break
            if cancelled():
                raise DecodeCancelled
            ids = torch.tensor([[tok]], dtype=torch.long, device=self.m.device)
            logits = self._pass(ids, enc, cache, align, mask, rows, keep=1)
        return out, False

    def _pass(
        self,
        ids: torch.Tensor,
        enc: EncodedWindow,
        cache: Any,
        align: Alignment | None,
        mask: torch.Tensor | None,
        rows: list[torch.Tensor],
        keep: int,
    ) -> torch.Tensor:
        """``logits``, keeping the attention rows of the last ``keep`` positions when aligning."""
        if align is None:
            return self.logits(ids, enc, cache)
        with self.probe.capture():
            logits = self.logits(ids, enc, cache)
            weights = self.attention(cache, mask)[0]  # (Q, n, T)
        rows.extend(weights[-keep:].unbind(0))
        return logits

    def beam(
        self,
        enc: EncodedWindow,
        prefix: list[int],
        max_new_tokens: int,
        num_beams: int,
        cancelled: Callable[[], bool] = _never,
    ) -> tuple[list[int], bool]:
        """Beam search after ``prefix`` with one KV cache row per beam (:class:`BeamSearch`).

        The cache rows follow their beams with ``reorder_cache``; encoder
        states are repeated once per window.
        """
        if num_beams <= 1:
            return self.greedy(enc, prefix, max_new_tokens, cancelled)
        dev = self.m.device
        cache = self.new_cache()
        ids = torch.tensor([prefix], dtype=torch.long, device=dev)
        logits = self.logits(ids, enc, cache)
        cache.batch_repeat_interleave(num_beams)
        enc = EncodedWindow(
            enc.hidden.repeat_interleave(num_beams, 0),
            None if enc.mask is None else enc.mask.repeat_interleave(num_beams, 0),
        )
        logits = logits.repeat_interleave(num_beams, 0)
        search = BeamSearch(num_beams, self.m.eos_token_id, max_new_tokens, dev)
        while True:
            self.suppress(logits, first=search.step == 0)
            rows = search.advance(logits)
            if rows is None:
                break
            if cancelled():
                raise DecodeCancelled
            cache.reorder_cache(torch.tensor(rows, dtype=torch.long, device=dev))
            ids = torch.tensor([[t] for t in search.last_tokens], dtype=torch.long, device=dev)
            logits = self.logits(ids, enc, cache)
        return search.best(self.loop_guard)

    def suppress(self, logits: torch.Tensor, first: bool) -> None:
        """Mask the tokens ``generate`` never emits (``first``: at the first new position)."""
        if self._suppress.numel():
            logits[:, self._suppress] = -float("inf")
        if first and self._begin_suppress.numel():
            logits[:, self._begin_suppress] = -float("inf")

    def run(self, req: DecodeRequest, cancelled: Callable[[], bool] = _never) -> DecodeResult:
        """Encode the window, prefill the prefix, decode; ``DecodeCancelled`` if superseded."""
        if cancelled():
            raise DecodeCancelled
        align = self.alignment(req)
        rows: torch.Tensor | None = None
        with torch.inference_mode():
            enc = self.encode(req.audio)
            if cancelled():
                raise DecodeCancelled
            lang = req.lang
            if self.m.whisper_prompt and lang is None and self.m.lang_to_id:
                lang = self.detect_language(enc)
            start = self.start_tokens(req.prompt, lang, req.task, req.target)
            prefix = start + list(req.forced)
            if self.num_beams > 1:
                tokens, looped = self.beam(enc, prefix, req.max_new_tokens, self.num_beams,
                                           cancelled)  # fmt: skip
                if align is not None:
                    rows = self.forced_rows(enc, start, list(req.forced) + tokens)
            else:
                kept: list[torch.Tensor] = []
                tokens, looped = self.greedy(enc, prefix, req.max_new_tokens, cancelled, align,
                                             len(req.forced), kept)  # fmt: skip
                if align is not None:
                    rows = torch.stack(kept)
        result = self.result(req, tokens, looped, lang, align, rows)
        if req.target_rows:  # each alone (the reference; the batch runner shares the encoder)
            answers = {r.target or "": self.run(r, cancelled) for r in req.target_rows}
            result = dataclasses.replace(result, targets=answers)
        return result


def stops_early(align: Alignment | None, rows: list[torch.Tensor]) -> bool:
    """AlignAtt: the newest token's attention peak lies in the last ``stop_frames`` frames."""
    if align is None or not align.stop_frames or not rows:
        return False
    (peak,) = peak_frames(rows[-1][None])
    return attends_late(peak, align.audio_frames, align.stop_frames)
