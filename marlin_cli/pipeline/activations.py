"""Calibration activations between decoder layers, in the model dtype, on the GPU up to a budget and in pinned
CPU memory beyond it.

The activations of N calibration tokens are N x hidden x 2 bytes in fp16 (128 x 2048 tokens of a 70B model:
4.3 GB; 256 x 4096: 17.2 GB), one copy only: a layer's output for a batch replaces that batch's input in place
(the Hessian passes read the inputs first, the output pass reads each batch once and writes it back). Batches
are placed in order: on the compute device while their total stays within ``budget_bytes``, the rest in
pinned host memory (page-locked, so the copies run asynchronously on the copy engine). A host batch is
copied to the device when a pass reaches it, the next one is prefetched meanwhile, and the layer's output is
copied back into the same pinned buffer. So the GPU holds at most ``budget_bytes`` of activations plus two
batches in flight, whatever the number of calibration tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


def _move(value: Any, device: torch.device | str, pin: bool = False) -> Any:
    """``value`` (a tensor, or a tuple/list/dict of them, or anything else) on ``device``."""
    if isinstance(value, torch.Tensor):
        if pin:
            out = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            out.copy_(value)
            return out
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(_move(v, device, pin) for v in value)
    if isinstance(value, list):
        return [_move(v, device, pin) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, device, pin) for k, v in value.items()}
    return value


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in ``value`` (nested tuples/lists/dicts)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


@dataclass
class CalibrationBatch:
    """Inputs of the current decoder layer for a batch of samples.

    Attributes:
        hidden: [B, L, D] hidden states in the model dtype (rows past a sample's length are padding).
        kwargs: the other arguments the decoder layer takes (position embeddings, masks...).
        valid: bool [B, L], True at real tokens.
        full: True when every position is a real token (no mask needed: saves a host synchronisation).
        on_host: True when the batch lives in (pinned) host memory and is streamed to the device per pass.
    """

    hidden: torch.Tensor
    kwargs: dict
    valid: torch.Tensor
    full: bool = False
    on_host: bool = False


class ActivationStore:
    """The calibration batches of the current layer (see the module docstring for the placement rule).

    Args:
        device: where the layers run.
        budget_bytes: activations (hidden states and the layer's other inputs) kept on ``device``; ``None``:
            no limit. On the CPU the placement only decides which batches take the streaming path (useful
            for testing it); host batches are pinned only when CUDA is available.
    """

    def __init__(self, device: torch.device | str, budget_bytes: int | None) -> None:
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self.batches: list[CalibrationBatch] = []
        self.device_bytes = 0
        self.host_bytes = 0

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def spilled(self) -> int:
        """How many batches live in host memory."""
        return sum(b.on_host for b in self.batches)

    def append(self, hidden: torch.Tensor, kwargs: dict, valid: torch.Tensor, full: bool) -> None:
        """Add one batch (tensors anywhere); placed on the device while within budget, else on the host."""
        size = tensor_bytes(hidden) + tensor_bytes(kwargs) + tensor_bytes(valid)
        if self.budget_bytes is None or self.device_bytes + size <= self.budget_bytes:
            self.batches.append(CalibrationBatch(_move(hidden, self.device), _move(kwargs, self.device),
                                                 _move(valid, self.device), full, False))
            self.device_bytes += size
            return
        pin = torch.cuda.is_available()
        cpu = torch.device("cpu")
        self.batches.append(CalibrationBatch(_move(hidden, cpu, pin), _move(kwargs, cpu, pin), _move(valid, cpu, pin),
                                             full, True))
        self.host_bytes += size

    def _on_device(self, b: CalibrationBatch) -> CalibrationBatch:
        if not b.on_host:
            return b
        return CalibrationBatch(_move(b.hidden, self.device), _move(b.kwargs, self.device),
                                _move(b.valid, self.device), b.full, False)

    def batch(self, index: int) -> CalibrationBatch:
        """Batch ``index`` on the device (a host batch is copied; no prefetch)."""
        return self._on_device(self.batches[index])

    def iterate(self) -> Iterator[tuple[int, CalibrationBatch]]:
        """(index, batch on the device) for every batch; a host batch's copy is started one batch ahead."""
        ahead: CalibrationBatch | None = None
        for i, b in enumerate(self.batches):
            cur = ahead if ahead is not None else self._on_device(b)
            ahead = self._on_device(self.batches[i + 1]) if i + 1 < len(self.batches) and \
                self.batches[i + 1].on_host else None
            yield i, cur

    def replace_hidden(self, index: int, hidden: torch.Tensor) -> None:
        """The layer's output for batch ``index`` becomes that batch's input for the next layer (in place)."""
        b = self.batches[index]
        if b.on_host:
            b.hidden.copy_(hidden, non_blocking=b.hidden.is_pinned())
        else:
            b.hidden = hidden

    def gpu_bytes(self) -> int:
        """Bytes of activations resident on the device (0 on the CPU)."""
        return self.device_bytes if self.device.type == "cuda" else 0
