"""Model-level fusion: q/k/v and gate/up of every decoder layer become one Marlin matmul each.

Which linears read the same input is data: the ``sequential`` groups of configs/models.json (the groups that
share one Hessian in quantization are exactly the layers that multiply the same activations). In each group,
the quantized members (:class:`gptq.linear.MarlinLinear`) that can fuse (:func:`gptq.fused.can_fuse`) are
replaced by a :class:`gptq.fused.FusedMarlinLinear` registered on their parent module as
``fused_<name>_<name>...`` and, in their own places, by :class:`FusedPart` proxies. The transformers forward
code is untouched: attention still calls ``self.q_proj(x)``, ``self.k_proj(x)``, ``self.v_proj(x)``; the first
call computes the fused product and the others take their slice of it. That keeps the rewrite independent of
the transformers version (its attention signatures change often) and of per-architecture extras (Qwen3's
q/k norms, Qwen2's q/k/v biases).

The shared result is keyed on the input tensor's identity and version counter, and kept only until every
part has taken its slice, so a part never sees the result of another input. Under CUDA-graph capture the
forward runs once in Python as in eager mode, so the graph holds one kernel per group.
"""

from __future__ import annotations

import torch
from torch import nn

from gptq.fused import FusedMarlinLinear, fusion_key
from gptq.linear import MarlinLinear
from marlin_cli.pipeline.models import ArchSpec, arch_spec


def _version(x: torch.Tensor) -> int:
    """The tensor's in-place version counter; -1 for inference-mode tensors, which keep none (in-place writes
    to an input between the projections' calls are then not detected: transformers' forwards make none)."""
    return -1 if x.is_inference() else x._version


class _SharedProduct:
    """The fused product of the latest input, held until each of ``parts`` parts has read its slice."""

    def __init__(self, fused: FusedMarlinLinear) -> None:
        self.fused = fused
        self.parts = len(fused.offsets)
        self._input: torch.Tensor | None = None
        self._version = -2
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._taken: set[int] = set()

    def get(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Part ``index``'s output for ``x`` [..., in_features] -> [..., out_features_index]."""
        version = _version(x)
        fresh = self._input is x and self._version == version and index not in self._taken
        if not fresh:
            self._outputs = self.fused(x)
            self._input, self._version, self._taken = x, version, set()
        out = self._outputs[index]
        self._taken.add(index)
        if len(self._taken) == self.parts:  # every part served: drop the references (input and output)
            self._input, self._outputs, self._taken = None, (), set()
        return out


class FusedPart(nn.Module):
    """Stands where one fused linear was; returns its slice of the group's shared product.

    Has no parameters or buffers of its own (the weights live in the parent's ``fused_...`` module), so the
    model's state dict holds each weight once.
    """

    def __init__(self, shared: _SharedProduct, index: int) -> None:
        super().__init__()
        self._shared = [shared]  # a list: not registered as a submodule (no duplicate state-dict entries)
        self.index = index
        self.in_features = shared.fused.in_features
        self.out_features = shared.fused.out_features[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features] in x.dtype (a view of the group's product)."""
        return self._shared[0].get(x, self.index)

    def extra_repr(self) -> str:
        return f"index={self.index}, in_features={self.in_features}, out_features={self.out_features}"


def fuse_model(model: nn.Module, spec: ArchSpec | None = None) -> list[str]:
    """Fuse, in place, each decoder layer's groups of quantized linears that read the same input.

    Args:
        model: a transformers causal LM whose quantized linears are MarlinLinear (as ``load_model`` makes).
        spec: its :class:`ArchSpec` (default: from ``model.config.model_type``).

    Returns:
        The names of the fused modules created (e.g. ``model.layers.0.self_attn.fused_q_proj_k_proj_v_proj``);
        empty when nothing fuses (an unquantized model, or groups whose members differ in K, group size or
        act-order). Memory: one group's weights are held twice while it is concatenated.
    """
    spec = spec or arch_spec(model.config.model_type)
    created: list[str] = []
    for i, layer in enumerate(model.get_submodule(spec.layers)):
        for group in spec.sequential:
            if len(group) < 2:
                continue
            parent_names = {name.rpartition(".")[0] for name in group}
            if len(parent_names) != 1:  # parts must sit on one module to be proxied there
                continue
            parent_name = parent_names.pop()
            parent = layer.get_submodule(parent_name) if parent_name else layer
            children = [name.rpartition(".")[2] for name in group]
            members = [c for c in children if isinstance(getattr(parent, c, None), MarlinLinear)]
            classes: dict[tuple, list[str]] = {}
            for child in members:
                classes.setdefault(fusion_key(getattr(parent, child)), []).append(child)
            for names in classes.values():
                if len(names) < 2:
                    continue
                fused = FusedMarlinLinear([getattr(parent, c) for c in names])
                fused_name = "fused_" + "_".join(names)
                parent.add_module(fused_name, fused)
                shared = _SharedProduct(fused)
                for index, child in enumerate(names):
                    setattr(parent, child, FusedPart(shared, index))
                created.append(f"{spec.layers}.{i}.{parent_name}.{fused_name}".replace("..", "."))
    return created


def is_fused(model: nn.Module) -> bool:
    """Whether :func:`fuse_model` has rewritten any layer of ``model``."""
    return any(isinstance(m, FusedMarlinLinear) for m in model.modules())
