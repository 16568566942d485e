"""Beam search bookkeeping for one window, shared by solo and batched decoding.

The decoder passes (alone in ``Decoder.beam``, or as ``num_beams`` rows of the
batch in ``BatchRunner``) feed each window's logits here; ``advance`` picks
the next beams the way ``generate(num_beams=k, do_sample=False)`` does and
says which rows the KV cache must follow. One implementation for both paths
keeps a window's tokens the same whether it ran alone or batched.

Scores are summed log-probabilities; a hypothesis that ends (EOS) is ranked
by its score divided by its length (length penalty 1.0, as in ``generate``).
"""

from __future__ import annotations

import torch

from streamer.engine.tokens import find_loop

__all__ = ["BeamSearch"]


class BeamSearch:
    """The running and finished hypotheses of one window.

    Shapes: ``advance`` takes logits ``(k, V)``, one row per beam, already
    masked (suppressed tokens at -inf).
    """

    def __init__(self, num_beams: int, eos: int, max_new_tokens: int, device: torch.device) -> None:
        if num_beams < 2:
            raise ValueError("beam search needs num_beams >= 2")
        self.k = num_beams
        self.eos = eos
        self.max_new_tokens = max_new_tokens
        self.scores = torch.full((num_beams,), -float("inf"), device=device)
        self.scores[0] = 0.0  # all beams start identical: expand only the first
        self.seqs: list[list[int]] = [[] for _ in range(num_beams)]
        self.finished: list[tuple[float, list[int]]] = []
        self.step = 0

    def advance(self, logits: torch.Tensor) -> list[int] | None:
        """Choose the next ``k`` beams; returns the source row of each, or None when done.

        After a non-None return, ``last_tokens`` are the next decoder inputs
        (one per row, in the order of the returned rows).
        """
        k = self.k
        logp = torch.log_softmax(logits.float(), dim=-1) + self.scores[:, None]
        top = torch.topk(logp.flatten(), 2 * k)
        vocab = logp.shape[-1]
        new_seqs: list[list[int]] = []
        rows: list[int] = []
        new_scores: list[float] = []
        for rank, (value, flat) in enumerate(
            zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ):
            row, tok = divmod(int(flat), vocab)
            if tok == self.eos:
                if rank < k:
                    self.finished.append((value / (len(self.seqs[row]) + 1), self.seqs[row]))
                continue
            new_seqs.append([*self.seqs[row], tok])
            rows.append(row)
            new_scores.append(value)
            if len(new_seqs) == k:
                break
        best_running = max(new_scores) / (self.step + 2)
        self.step += 1
        if len(self.finished) >= k and max(f[0] for f in self.finished) >= best_running:
            return None
        self.seqs = new_seqs
        self.scores = torch.tensor(new_scores, device=self.scores.device)
        if self.step == self.max_new_tokens:
            return None
        return rows

    @property
    def last_tokens(self) -> list[int]:
        return [s[-1] for s in self.seqs]

    def best(self, loop_guard: bool = True) -> tuple[list[int], bool]:
        """The best hypothesis (running ones count as ended) and whether a loop was cut."""
        finished = list(self.finished)
        for score, seq in zip(self.scores.tolist(), self.seqs, strict=True):
            finished.append((score / max(len(seq), 1), seq))
        best = max(finished, key=lambda f: f[0])[1]
        cut = find_loop(best) if loop_guard else None
        return (best, False) if cut is None else (best[:cut], True)
