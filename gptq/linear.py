"""``MarlinLinear``: a drop-in replacement for ``nn.Linear`` whose weight is stored in the Marlin format.

On a CUDA device with the extension available it calls the kernel (:func:`gptq.kernel.marlin_gemm`);
elsewhere it computes the reference product (:func:`gptq.format.reference_matmul` semantics) from a
dequantized copy of the weight that it caches per dtype and device (not saved in the state dict).
"""

from __future__ import annotations

import torch
from torch import nn

from gptq import format as fmt


class MarlinLinear(nn.Module):
    """y = x @ dequant(B) + bias, with B = W.T packed by :func:`gptq.format.pack`.

    Buffers (all saved in the state dict):
        qweight: int32 [K_pad / 16, 2 * N_pad].
        scales: [K_pad / g or 1, N_pad], fp16 as saved (cast with the module like any float buffer).
        shape: int32 [2] = (in_features, out_features) before padding.
        bias: [out_features] or absent.
        perm: int64 [in_features] or absent: act-order checkpoints (GPTQ ``desc_act``, compressed-tensors
            ``actorder: group``) have their weight rows sorted into groups at load; the input columns are
            gathered in the same order at run time, ``y = x[..., perm] @ B_sorted`` (as vLLM's gptq_marlin).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.packed = fmt.padded_shape(in_features, out_features, group_size)
        p = self.packed
        # Every nibble 8 (0x88888888 as int32): a fresh layer computes exactly zero.
        self.register_buffer("qweight", torch.full((p.k_pad // 16, 2 * p.n_pad), -0x77777778, dtype=torch.int32,
                                                   device=device))
        self.register_buffer("scales", torch.ones((p.num_groups, p.n_pad), dtype=dtype, device=device))
        self.register_buffer("shape", torch.tensor([in_features, out_features], dtype=torch.int32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.register_buffer("perm", None)  # act-order only (see from_codes); a None buffer is not saved
        self._dense: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self.register_load_state_dict_post_hook(lambda module, _keys: module._dense.clear())

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None = None,
        scale_dtype: torch.dtype = torch.float16,
        perm: torch.Tensor | None = None,
    ) -> MarlinLinear:
        """Build from a quantized matrix in the layer's orientation.

        Args:
            codes: integer [N, K] in 0..15 (N = out_features).
            scales: float [N, G] (G = ceil(K / g), or 1 per channel).
            group_size: 32, 64, 128 or -1.
            bias: optional [N].
            perm: optional int [K], act-order: ``codes[:, j]`` (sorted into groups) belongs to input column
                ``perm[j]``; the layer then computes ``x[..., perm] @ dequant(codes)^T``.
        """
        n, k = codes.shape
        layer = cls(k, n, group_size, bias=bias is not None, dtype=scale_dtype)
        qweight, packed_scales, _ = fmt.pack(codes.T.contiguous(), scales.T.contiguous().to(scale_dtype), group_size)
        layer.qweight.copy_(qweight)
        layer.scales.copy_(packed_scales)
        if bias is not None:
            layer.bias.copy_(bias.to(scale_dtype))
        if perm is not None:
            perm = perm.reshape(-1).to(torch.int64)
            if perm.numel() != k or not torch.equal(perm.sort().values, torch.arange(k)):
                raise ValueError(f"perm must be a permutation of range({k})")
            layer.register_buffer("perm", perm.contiguous())
        return layer

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module signature
        self._dense = {}
        return super()._apply(fn, recurse)

    def dense_weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Dequantized padded B [K_pad, N_pad] in ``dtype`` on ``device`` (cached)."""
        key = (dtype, device)
        if key not in self._dense:
            self._dense[key] = fmt.dequantize(self.qweight, self.scales, self.group_size, torch.float32).to(device, dtype)
        return self._dense[key]

    def padded_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> the product's left operand [rows, K_pad] (act-order gather, zero padding)."""
        x2 = x.reshape(-1, x.shape[-1])
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        if self.packed.k_pad != self.in_features:
            x2 = nn.functional.pad(x2, (0, self.packed.k_pad - self.in_features))
        return x2

    def finish_output(self, out: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        """The product [rows, N_pad] -> [*lead, out_features]: padding columns dropped, bias added."""
        out = out[:, : self.out_features]
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*lead, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] (fp16/bf16 on CUDA, any float on CPU) -> [..., out_features] in x.dtype."""
        x2 = self.padded_input(x)
        if x2.is_cuda and x2.dtype in (torch.float16, torch.bfloat16):
            from gptq.kernel import marlin_gemm  # here: the kernel module builds/loads the CUDA extension

            out = marlin_gemm(x2.contiguous(), self.qweight, self.scales.to(x2.dtype), self.group_size)
        else:
            out = x2 @ self.dense_weight(x2.dtype, x2.device)
        return self.finish_output(out, x.shape[:-1])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"padded=({self.packed.k_pad}, {self.packed.n_pad})" + (", act_order" if self.perm is not None else ""))
