"""Perplexity protocols on hand-made models and token streams where the answer is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from marlin_cli.errors import MarlinError
from marlin_cli.eval.perplexity import documents_perplexity, stream_perplexity, stream_windows, token_nll


class UniformModel(torch.nn.Module):
    """Equal logits over ``V`` tokens: every prediction has probability 1/V, so ppl = V exactly."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.calls: list[int] = []

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """``[1, L]`` int64 -> ``[1, L, V]`` float32 zeros; records each call's length."""
        self.calls.append(input_ids.shape[1])
        return torch.zeros(*input_ids.shape, self.vocab)


class SuccessorModel(torch.nn.Module):
    """Predicts token ``(v + 1) % V`` after ``v`` with probability ``p[v]``, the rest spread evenly.

    On a stream that follows the successor rule, each prediction after token ``v`` costs ``-log p[v]``
    nats, so the perplexity is known in closed form.
    """

    def __init__(self, p: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.p = p.double()
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """``[1, L]`` int64 -> ``[1, L, V]`` logits (log-probabilities) in ``self.dtype``."""
        vocab = self.p.numel()
        p = self.p[input_ids]  # [1, L]
        rest = torch.log((1 - p) / (vocab - 1))
        logits = rest.unsqueeze(-1).expand(*input_ids.shape, vocab).clone()
        logits.scatter_(-1, ((input_ids + 1) % vocab).unsqueeze(-1), torch.log(p).unsqueeze(-1))
        return logits.to(self.dtype)


def successor_stream(start: int, length: int, vocab: int) -> torch.Tensor:
    """``[length]`` int64 tokens ``start, start+1, ...`` modulo ``vocab``."""
    return (torch.arange(length) + start) % vocab


def test_uniform_logits_give_ppl_equal_to_vocab() -> None:
    model = UniformModel(vocab=37)
    result = stream_perplexity(model, torch.randint(0, 37, (100,)), seqlen=10, progress=False)
    assert result.ppl == pytest.approx(37.0, rel=1e-6)
    assert result.nll_mean == pytest.approx(math.log(37), rel=1e-7)
    assert result.protocol == "stream"
    assert (result.windows, result.tokens_scored, result.seqlen, result.documents) == (10, 90, 10, None)


def test_constant_confidence_gives_ppl_one_over_p() -> None:
    vocab, p = 50, 0.3
    model = SuccessorModel(torch.full((vocab,), p))
    result = stream_perplexity(model, successor_stream(7, 64, vocab), seqlen=16, progress=False)
    assert result.ppl == pytest.approx(1 / p, rel=1e-6)


def test_windows_are_non_overlapping_and_last_partial_is_dropped() -> None:
    model = UniformModel(vocab=5)
    result = stream_perplexity(model, torch.zeros(10, dtype=torch.long), seqlen=4, progress=False)
    assert model.calls == [4, 4]  # t0..t3, t4..t7; t8 t9 dropped
    assert (result.windows, result.tokens_scored) == (2, 6)


def test_dropped_tail_does_not_change_the_result() -> None:
    vocab = 20
    model = SuccessorModel(torch.linspace(0.1, 0.9, vocab))
    clean = successor_stream(3, 40, vocab)
    noisy_tail = torch.cat([clean, torch.tensor([0, 0, 0, 0, 0])])  # breaks the rule, but is a partial window
    a = stream_perplexity(model, clean, seqlen=8, progress=False)
    b = stream_perplexity(model, noisy_tail, seqlen=8, progress=False)
    assert a.ppl == b.ppl and a.windows == b.windows == 5


def test_each_window_starts_a_fresh_context() -> None:
    """The first token of each window is not predicted: only ``seqlen - 1`` NLLs per window."""
    vocab = 10
    p = torch.full((vocab,), 0.5)
    model = SuccessorModel(p)
    # Window 2 starts with a token that breaks the successor rule relative to window 1's last token;
    # since windows do not see each other, the perplexity stays exactly 2.
    tokens = torch.cat([successor_stream(0, 5, vocab), successor_stream(8, 5, vocab)])
    result = stream_perplexity(model, tokens, seqlen=5, progress=False)
    assert result.ppl == pytest.approx(2.0, rel=1e-6)
    assert result.tokens_scored == 8


def test_closed_form_with_per_token_confidence() -> None:
    vocab = 12
    p = torch.linspace(0.05, 0.95, vocab)
    model = SuccessorModel(p)
    tokens = successor_stream(0, 36, vocab)
    result = stream_perplexity(model, tokens, seqlen=12, progress=False)
    # Each window is 0..11, predicting after tokens 0..10.
    expected = math.exp(-torch.log(p[:11].double()).mean().item())
    assert result.ppl == pytest.approx(expected, rel=1e-6)


def test_max_windows_bounds_the_work() -> None:
    model = UniformModel(vocab=3)
    result = stream_perplexity(
        model, torch.zeros(100, dtype=torch.long), seqlen=10, max_windows=3, progress=False
    )
    assert model.calls == [10, 10, 10]
    assert result.windows == 3 and result.tokens_scored == 27


def test_stream_window_count_rules() -> None:
    assert stream_windows(4096 * 3 + 4095, 4096) == 3
    assert stream_windows(100, 10, max_windows=50) == 10
    with pytest.raises(MarlinError, match="fewer than one window"):
        stream_windows(100, 101)
    with pytest.raises(MarlinError, match="at least 2"):
        stream_windows(100, 1)
    with pytest.raises(MarlinError, match="max-windows"):
        stream_windows(100, 10, max_windows=0)


def test_documents_mean_of_means_differs_from_token_mean() -> None:
    """A 2-token document at p=0.1 and an 11-token one at p=0.9: the protocol weighs documents equally."""
    vocab = 30
    p = torch.full((vocab,), 0.9)
    p[0] = 0.1
    model = SuccessorModel(p)
    short = torch.tensor([0, 1])  # one prediction after token 0: -log 0.1
    long = successor_stream(10, 11, vocab)  # ten predictions after tokens 10..19: -log 0.9 each
    result = documents_perplexity(model, [short, long], progress=False)
    doc_means = [-math.log(0.1), -math.log(0.9)]
    token_mean = (-math.log(0.1) - 10 * math.log(0.9)) / 11
    assert result.ppl == pytest.approx(math.exp(sum(doc_means) / 2), rel=1e-6)
    assert result.ppl != pytest.approx(math.exp(token_mean), rel=1e-2)
    assert result.protocol == "documents"
    assert (result.documents, result.tokens_scored, result.skipped_documents) == (2, 11, 0)
    assert result.windows is None


def test_documents_of_one_token_are_skipped_and_counted() -> None:
    model = UniformModel(vocab=8)
    docs = [
        torch.tensor([1]),
        torch.tensor([1, 2, 3]),
        torch.tensor([], dtype=torch.long),
        torch.tensor([4, 5]),
    ]
    result = documents_perplexity(model, docs, progress=False)
    assert result.ppl == pytest.approx(8.0, rel=1e-6)
    assert (result.documents, result.skipped_documents, result.tokens_scored) == (2, 2, 3)
    assert model.calls == [3, 2]


def test_documents_max_docs_and_nothing_to_score() -> None:
    model = UniformModel(vocab=8)
    docs = [torch.tensor([1, 2, 3])] * 5
    assert documents_perplexity(model, docs, max_docs=2, progress=False).documents == 2
    with pytest.raises(MarlinError, match="nothing to score"):
        documents_perplexity(model, [torch.tensor([1])], progress=False)


def test_token_nll_is_float32_and_chunking_does_not_change_it() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(50, 300, generator=gen) * 4).half()
    targets = torch.randint(0, 300, (50,), generator=gen)
    reference = torch.nn.functional.cross_entropy(logits.double(), targets, reduction="none")
    for chunk in (1, 7, 50, 1024):
        nll = token_nll(logits, targets, chunk=chunk)
        assert nll.dtype == torch.float32 and nll.shape == (50,)
        torch.testing.assert_close(nll.double(), reference, rtol=1e-6, atol=1e-6)


def test_half_precision_logits_are_upcast() -> None:
    """A model emitting fp16 logits still gets a float32 NLL: 1/p to fp16 rounding of the logits."""
    vocab, p = 40, 0.25
    model = SuccessorModel(torch.full((vocab,), p), dtype=torch.float16)
    result = stream_perplexity(model, successor_stream(0, 80, vocab), seqlen=20, progress=False)
    assert result.ppl == pytest.approx(1 / p, rel=2e-3)
