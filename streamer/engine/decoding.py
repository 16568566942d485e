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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamer.core.session import DecodeRequest, DecodeResult
from streamer.engine.loader import LoadedModel, whisper_task
from streamer.engine.tokens import TokenPieces
from streamer.types import FloatArray


@dataclass(slots=True)
class EncodedWindow:
    hidden: torch.Tensor  # (1, T, D), already projected to the decoder's width
    mask: torch.Tensor | None  # (1, T) encoder frame mask for cross-attention


def find_loop(tokens: list[int], min_span: int = 12, min_repeats: int = 3) -> int | None:
    """Index where a trailing repetition loop starts, or None.

    A loop is the same n-gram (n <= 16) repeated ``min_repeats`` times at the
    end, covering at least ``min_span`` tokens (or 6 repeats of one token).
    The returned index keeps one occurrence of the repeated n-gram.
    """
    n_tok = len(tokens)
    for period in range(1, 17):
        reps = 1
        while (reps + 1) * period <= n_tok and (
            tokens[n_tok - (reps + 1) * period : n_tok - reps * period]
            == tokens[n_tok - period : n_tok]
        ):
            reps += 1
        need = max(min_repeats, -(-min_span // period)) if period > 1 else max(6, min_repeats)
        if reps >= need:
            return n_tok - (reps - 1) * period
    return None


class Decoder:
    """Runs one ``DecodeRequest`` on a loaded model (called on the engine thread)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.m = loaded
        self.model = loaded.model
        self.pieces = TokenPieces(loaded.tokenizer)
        self.loop_guard = True  # exactness tests against generate() turn it off
        self._encoder = self.model.get_encoder()
        self._proj = getattr(self.model, "enc_to_dec_proj", None)
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self._suppress = torch.tensor(
            [t for t in loaded.suppress_tokens if t < vocab], dtype=torch.long, device=loaded.device
        )
        self._begin_suppress = torch.tensor(
            [t for t in loaded.begin_suppress_tokens if t < vocab],
            dtype=torch.long,
            device=loaded.device,
        )

    # --------------------------------------------------------------- encoder
    def features(self, audio: FloatArray) -> dict[str, torch.Tensor]:
        fe = self.m.feature_extractor
        kwargs: dict[str, Any] = {"sampling_rate": self.m.sample_rate, "return_tensors": "pt"}
        if self.m.family != "whisper":
            kwargs["return_attention_mask"] = True
        out = fe(np.asarray(audio, dtype=np.float32), **kwargs)
        name = self._encoder.main_input_name
        feats: dict[str, torch.Tensor] = {name: out[name].to(self.m.device, dtype=self.m.dtype)}
        if self.m.family != "whisper" and "attention_mask" in out:
            feats["attention_mask"] = out["attention_mask"].to(self.m.device)
        return feats

    def encode(self, audio: FloatArray) -> EncodedWindow:
        feats = self.features(audio)
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
        return EncodedWindow(hidden, mask)

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
            head = self.model.get_output_embeddings()
            return head(out.last_hidden_state[:, -1, :]).float()  # type: ignore[no-any-return]
        from transformers.modeling_outputs import BaseModelOutput

        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=enc.hidden),
            attention_mask=None,
            decoder_input_ids=ids,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1, :].float()  # type: ignore[no-any-return]

    def start_tokens(self, prompt: tuple[int, ...], lang: str | None) -> list[int]:
        m = self.m
        if m.family == "whisper":
            ids: list[int] = []
            prev = m.extra.get("startofprev")
            if prompt and prev is not None:
                text_prompt = [t for t in prompt if t < m.eos_token_id]
                ids = [prev, *text_prompt[-int(m.extra["max_prompt"]) :]]
            ids.append(int(m.extra["sot"]))
            if m.lang_to_id and lang is not None:
                ids.append(m.lang_to_id[lang])
                task = whisper_task(lang, m.spec.target_language, m.spec.task)
                ids.append(m.task_to_id[task])
            if m.extra.get("no_timestamps") is not None:
                ids.append(int(m.extra["no_timestamps"]))
            return ids
        start = m.model.generation_config.decoder_start_token_id
        if start is None:
            start = m.model.config.decoder_start_token_id
        ids = [int(start)]
        if "lang_token" in m.extra:
            ids.append(int(m.extra["lang_token"]))
        return ids

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
        self, enc: EncodedWindow, prefix: list[int], max_new_tokens: int
    ) -> tuple[list[int], bool]:
        """Greedy decode after ``prefix``; returns (new tokens without EOS, looped)."""
        cache = self.new_cache()
        ids = torch.tensor([prefix], dtype=torch.long, device=self.m.device)
        logits = self.logits(ids, enc, cache)
        out: list[int] = []
        for step in range(max_new_tokens):
            if self._suppress.numel():
                logits[:, self._suppress] = -float("inf")
            if step == 0 and self._begin_suppress.numel():
                logits[:, self._begin_suppress] = -float("inf")
            tok = int(torch.argmax(logits, dim=-1).item())
            if tok == self.m.eos_token_id:
                break
            out.append(tok)
            cut = find_loop(out) if self.loop_guard else None
            if cut is not None:
                return out[:cut], True
            if step + 1 == max_new_tokens:
                break
            ids = torch.tensor([[tok]], dtype=torch.long, device=self.m.device)
            logits = self.logits(ids, enc, cache)
        return out, False

    def run(self, req: DecodeRequest) -> DecodeResult:
        with torch.inference_mode():
            enc = self.encode(req.audio)
            lang = req.lang
            if self.m.family == "whisper" and lang is None and self.m.lang_to_id:
                lang = self.detect_language(enc)
            prefix = self.start_tokens(req.prompt, lang) + list(req.forced)
            tokens, looped = self.greedy(enc, prefix, req.max_new_tokens)
        pieces = self.pieces.pieces(list(req.forced), tokens)
        return DecodeResult(
            request_id=req.request_id,
            tokens=tuple(tokens),
            pieces=tuple(pieces),
            looped=looped,
            lang=lang,
        )
