"""Issue 18's methods on real layers of the built-in model: the importance-weighted signed scale search
(``fast``, the default), SignRound block tuning (``best``), and ``marlin quantize --method fast`` against an
independent recomputation. Every reference here is computed in the test: calibration inputs are captured
with forward pre-hooks on the Hugging Face model (no batching, no padding) and reduced in float64; the
grids without search are written out here or taken from the unsigned ``row_scales`` that GPTQ uses.

That the default beats GPTQ in perplexity on the whole model is checked by CI's ``marlin reproduce --config
builtin`` (``default_beats_gptq``, both texts); a slow test here repeated it on a reduced calibration and cost
5-12 minutes of CI."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from checkpoint_cache import run_cli, signed_grid
from safetensors.torch import load_file

from gptq.quantizer import row_scales
from gptq.solver import weighted_rtn_quantize
from gptq.tune import BlockTuner, TuneConfig
from marlin_cli.data.corpora import calibration_samples
from marlin_cli.formats.compressed_tensors import decode_tensors
from marlin_cli.settings import QuantSettings

GROUP = 64
CALIB = {"dataset": "pydocs", "nsamples": 4, "seqlen": 128, "seed": 0}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
LAYER1 = [f"model.layers.1.{n}" for n in LINEARS]
"""Every linear of decoder layer 1: its inputs come through a real decoder layer."""


def hf_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


class Captured:
    """What the unquantized float32 model feeds each linear and layer 0 on the calibration samples."""

    def __init__(self, model: torch.nn.Module, samples: list[torch.Tensor]) -> None:
        self.model = model
        self._fast: dict = {}
        self.inputs: dict[str, list[torch.Tensor]] = {}  # full linear name -> [L_i, K] float32 per sample
        self.layer0: list[tuple[torch.Tensor, dict]] = []  # (hidden [1, L, D], kwargs) per sample
        handles = []
        for i in range(len(model.model.layers)):
            for name in LINEARS:
                full = f"model.layers.{i}.{name}"
                self.inputs[full] = []

                def record(_m: torch.nn.Module, inp: tuple, full: str = full) -> None:
                    self.inputs[full].append(inp[0].detach()[0].clone())

                handles.append(model.get_submodule(full).register_forward_pre_hook(record))

        def record_layer(_m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.layer0.append((hidden.detach().clone(),
                                {k: v for k, v in kwargs.items() if k != "hidden_states"}))

        handles.append(model.model.layers[0].register_forward_pre_hook(record_layer, with_kwargs=True))
        with torch.no_grad():
            for ids in samples:
                model(input_ids=ids, use_cache=False)
        for h in handles:
            h.remove()

    def x(self, name: str) -> torch.Tensor:
        """float64 [T, K] every calibration token's input to ``name``."""
        return torch.cat(self.inputs[name]).to(torch.float64)

    def importance(self, name: str) -> torch.Tensor:
        """float64 [K] the mean squared input of each feature, E[x^2]."""
        return self.x(name).square().mean(dim=0)

    def fast(self, name: str):  # noqa: ANN201 (a QuantizedMatrix)
        """``weighted_rtn_quantize`` of ``name``'s weights with :meth:`importance` (computed once per linear)."""
        if name not in self._fast:
            w = self.model.get_submodule(name).weight.detach()
            self._fast[name] = weighted_rtn_quantize(w, self.importance(name).to(torch.float32), cfg())
        return self._fast[name]


@pytest.fixture(scope="module")
def captured(two_layers: Path) -> Captured:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(two_layers)
    samples = calibration_samples(tok, **CALIB)
    return Captured(hf_model(two_layers), samples)


def expand(scales: torch.Tensor, k: int) -> torch.Tensor:
    per = -(-k // scales.shape[1])
    return scales.to(torch.float64).repeat_interleave(per, dim=1)[:, :k]


def grid_of(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64 dequantized round to nearest of ``w`` on ``scales`` [N, G] (codes clamped to -8..7)."""
    s = expand(scales, w.shape[1])
    return torch.clamp(torch.round(w.to(torch.float64) / s), -8, 7) * s


def unsigned_covering(w: torch.Tensor) -> torch.Tensor:
    """[N, G] ``row_scales`` of every group (GPTQ's and RTN's scale: max(-min / 8, max / 7))."""
    return torch.cat([row_scales(part) for part in w.to(torch.float32).split(GROUP, dim=1)], dim=1)


def weighted_error(w: torch.Tensor, wq: torch.Tensor, d: torch.Tensor) -> float:
    """sum_ij d_j (w_ij - wq_ij)^2 in float64: the output error when the inputs are uncorrelated."""
    return float(((w.to(torch.float64) - wq.to(torch.float64)).square() * d).sum())


def cfg() -> object:
    return QuantSettings(method="fast", group_size=GROUP).gptq_config()


def test_signed_search_beats_the_unsigned_and_the_signed_covering_scales(captured: Captured) -> None:
    """On every linear of real layer 1, with its real calibration inputs: the importance-weighted error of
    the fast solution is below that of round to nearest on the unsigned covering scale (GPTQ's grid without
    clipping) and below that of the signed grid's covering scale ``-a / 8`` without the search."""
    for name in LAYER1:
        w = captured.model.get_submodule(name).weight.detach()
        d = captured.importance(name)
        fast = captured.fast(name)
        errors = {
            "fast": weighted_error(w, grid_of(w, fast.scales), d),
            "unsigned covering": weighted_error(w, grid_of(w, unsigned_covering(w)), d),
            "signed covering": weighted_error(w, grid_of(w, signed_grid(w, GROUP)[1]), d),
        }
        # the dequantized weights the solver returns are its codes times its scales
        assert torch.allclose(fast.weight.to(torch.float64), grid_of(w, fast.scales), rtol=0, atol=1e-7), name
        print(name, {k: f"{v:.4g}" for k, v in errors.items()})
        assert errors["fast"] < 0.97 * errors["unsigned covering"], (name, errors)
        assert errors["fast"] < 0.97 * errors["signed covering"], (name, errors)
        # And the real output error ||X dW^T||^2 on the captured inputs follows (not what is optimized: looser).
        x = captured.x(name)
        out_err = {k: float((x @ (w.to(torch.float64) - grid_of(w, s)).T).square().sum())
                   for k, s in (("fast", fast.scales), ("unsigned covering", unsigned_covering(w)))}
        assert out_err["fast"] < out_err["unsigned covering"], (name, out_err)


def test_importance_weighting_beats_an_unweighted_search_on_the_weighted_error(captured: Captured) -> None:
    """The same search with a flat importance (plain squared weight error) loses on the error the weighted
    search optimizes, on every linear of layer 1."""
    for name in LAYER1:
        w = captured.model.get_submodule(name).weight.detach()
        d = captured.importance(name)
        weighted = captured.fast(name)
        flat = weighted_rtn_quantize(w, torch.ones(w.shape[1]), cfg())
        assert not torch.equal(weighted.scales, flat.scales), name
        e_w, e_f = weighted_error(w, grid_of(w, weighted.scales), d), weighted_error(w, grid_of(w, flat.scales), d)
        print(name, f"weighted {e_w:.4g} flat {e_f:.4g}")
        assert e_w < e_f, (name, e_w, e_f)


def block_loss(layer: torch.nn.Module, weights: dict[str, torch.Tensor], stream: list[tuple[torch.Tensor, dict]],
               targets: list[torch.Tensor]) -> float:
    """Mean squared error of ``layer`` with ``weights`` put in, over ``stream``, against ``targets`` (float64)."""
    layer = copy.deepcopy(layer)
    for n, wq in weights.items():
        layer.get_submodule(n).weight.data = wq.to(torch.float32)
    total = count = 0.0
    with torch.no_grad():
        for (hidden, kwargs), target in zip(stream, targets, strict=True):
            out = layer(hidden, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            total += float((out.to(torch.float64) - target.to(torch.float64)).square().sum())
            count += target.numel()
    return total / count


def test_block_tuner_lowers_the_block_output_error_it_optimizes(captured: Captured) -> None:
    """Decoder layer 0 of the built-in model, its real calibration inputs with a little noise as the quantized
    stream, the unquantized layer's outputs as targets: the tuned solution's block MSE (its dequantized weights
    put into the layer) is below the start's; and before any step (V = 0, A = 1) the tuner's result is the
    start, code for code."""
    layer = copy.deepcopy(captured.model.model.layers[0])
    gen = torch.Generator().manual_seed(0)
    fp_stream = captured.layer0
    q_stream = [(h + 0.01 * h.std() * torch.randn(h.shape, generator=gen), kw) for h, kw in fp_stream]
    with torch.no_grad():
        targets = []
        for h, kw in fp_stream:
            out = layer(h, **kw)
            targets.append((out[0] if isinstance(out, tuple) else out).detach())
    start = {n: captured.fast(f"model.layers.0.{n}") for n in LINEARS}

    untouched = BlockTuner(layer, {n: qm.scales for n, qm in start.items()}, TuneConfig()).result()
    for n, qm in start.items():
        assert torch.equal(untouched[n][0], qm.codes), n
        assert torch.equal(untouched[n][1], qm.scales), n

    tune = TuneConfig(steps=12, samples=len(q_stream))
    tuner = BlockTuner(layer, {n: qm.scales for n, qm in start.items()}, tune)
    first = last = None
    for _ in range(tune.steps):
        losses = [tuner.loss(h, kw, t, None, torch.float32) for (h, kw), t in zip(q_stream, targets, strict=True)]
        mean = float(torch.stack(losses).detach().mean())
        first = mean if first is None else first
        last = mean
        tuner.step(losses)
    tuned = tuner.result()
    assert all(p.requires_grad for p in layer.parameters())  # given back
    changed = sum(int((tuned[n][0] != start[n].codes).sum()) for n in LINEARS)
    before = block_loss(layer, {n: qm.weight for n, qm in start.items()}, q_stream, targets)
    after = block_loss(layer, {n: (codes.to(torch.float64) - 8) * expand(scales, codes.shape[1])
                               for n, (codes, scales) in tuned.items()}, q_stream, targets)
    print(f"block MSE start {before:.5g} tuned {after:.5g}; tuner's loss {first:.5g} -> {last:.5g}; "
          f"{changed} codes changed")
    assert changed > 0
    assert first == pytest.approx(before, rel=1e-3)  # the tuner's first loss is the start's
    assert after < 0.99 * before, (before, after)
    for n in LINEARS:  # the sign of every scale is kept, within the multiplier range
        ratio = tuned[n][1] / start[n].scales
        assert (ratio >= 0.8 - 1e-3).all() and (ratio <= 1.2 + 1e-3).all(), n


def test_fast_checkpoint_is_the_weighted_search_of_independently_recomputed_importance(
    two_layers: Path, captured: Captured, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``marlin quantize --method fast`` of the 2-layer model: about half of the scales are negative, and each
    linear's codes and scales are ``weighted_rtn_quantize`` of its weights with E[x^2] recomputed here in float64
    from the unquantized model's inputs. The layers are forced to run in float32 (on a CPU with native bf16
    the fast method runs them in bfloat16, which rounds the weights and statistics it works from); float32 vs
    float64 sums may still flip a rare near-tie between candidate scales, so a handful of groups may differ."""
    from marlin_cli.pipeline import quantize as q

    monkeypatch.setattr(q, "quantize_dtype", lambda device, method: torch.float32)
    out = tmp_path / "fast"
    code, output = run_cli("quantize", two_layers, "--out", out, "--method", "fast", "--group-size", GROUP,
                           "--dataset", CALIB["dataset"], "--nsamples", CALIB["nsamples"], "--seqlen",
                           CALIB["seqlen"], "--seed", CALIB["seed"], "--format", "compressed-tensors", "--quiet")
    assert code == 0, output
    tensors = load_file(out / "model.safetensors")
    negative = total = groups_differ = codes_differ = 0
    for name in captured.inputs:
        parts = {key.rpartition(".")[2]: v for key, v in tensors.items() if key.rpartition(".")[0] == name}
        codes, scales, perm = decode_tensors(parts, name, GROUP)
        assert perm is None
        scales = scales.to(torch.float32)
        negative += int((scales < 0).sum())
        total += scales.numel()
        w = captured.model.get_submodule(name).weight.detach()
        want = captured.fast(name)
        differ = want.scales != scales
        groups_differ += int(differ.sum())
        codes_differ += int((want.codes != codes).sum())
        assert int(differ.sum()) <= max(4, differ.numel() // 500), (name, int(differ.sum()), differ.numel())
        # ... and where they differ it is a near-tie: both scales' weighted errors of the group agree to 1%
        # (a last-bit change of the importance can move a refit scale across an fp16 rounding boundary)
        d = captured.importance(name)
        per_group = [((w.to(torch.float64) - grid_of(w, s)).square() * d).view(w.shape[0], -1, GROUP).sum(-1)
                     for s in (scales, want.scales)]
        mine, theirs = per_group[1][differ], per_group[0][differ]
        assert torch.allclose(theirs, mine, rtol=1e-2, atol=0), (name, theirs, mine)
        # wherever the scale agrees, every code of the group agrees
        same = ~expand(differ.to(torch.float64), w.shape[1]).bool()
        assert torch.equal(codes[same], want.codes[same]), name
    print(f"negative scales {negative}/{total}; groups differing {groups_differ}; codes differing {codes_differ}")
    assert 0.4 < negative / total < 0.6, (negative, total)
