"""Book-keeping ghost clipping: DP-SGD's per-example clipping in one backward pass.

Opacus's ghost clipping (``--grad-sample-mode ghost``) runs two backward passes: the
first computes every example's gradient norm, the second the gradient of the
clipping-weighted loss. Book-keeping (Bu et al., "Differentially private optimization
on large model at small cost", ICML 2023) keeps what the first pass saw instead:
each trainable layer's input and the gradient of its output. From those it computes
the per-example norms (the ghost norm, without per-example gradients) and then the
sum of clipped per-example gradients directly, so there is no second pass. The
parameters are also left out of the autograd graph, so the one backward pass
computes input gradients only.

Linear layers that read the same input (a block's query, key and value; the LoRA
adapters beside them) are computed as one layer of their summed width: one norm and
one matrix product for the clipped sum, whose rows are the layers' gradients. The
step never waits on the device (no ``.item()``, no branch on a tensor's value), so a
GPU runs it without synchronising. An example whose gradient is not finite (a
received model can make one overflow) gets zero weight through ``torch.where``
(a product would turn ``0 · inf`` into NaN): the clipped sum stays finite.

This module computes the clipped sum into ``p.grad``; noise, scaling, Poisson
sampling and accounting stay Opacus's (``DPOptimizerFastGradientClipping``, its data
loader and accountant), exactly as with ghost clipping. Supported trainable layers:
``nn.Linear``, ``nn.Embedding`` and ``nn.LayerNorm`` (every trainable layer of a
BERT classifier, LoRA adapters included), each used once per forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

#: Added to every norm before dividing, as Opacus does.
_EPS = 1e-6
#: Whether a layer's parameter (``None`` when the layer has none) is being trained.
Trains = Callable[[nn.Parameter | None], bool]
#: Clipped sums of some layers' trainable parameters, from per-example coefficients
#: and the mask of examples whose gradient is finite.
Clip = Callable[[torch.Tensor, torch.Tensor], dict[nn.Parameter, torch.Tensor]]


def _flat(t: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, ..., width)`` as ``(B, T, width)``."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), width)  # no -1: B may be 0


def _rows(keep: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` with the rows of examples outside ``keep`` set to zero (NaN and inf too)."""
    return torch.where(keep.view(-1, *(1,) * (t.dim() - 1)), t, 0)


def _linears(layers: list[nn.Linear], a: torch.Tensor, gs: list[torch.Tensor],
             trains: Trains) -> tuple[torch.Tensor, Clip]:
    """Per-example squared norms and clipped sum of linear layers that share input ``a``.

    Their output gradients side by side are the output gradient of one layer whose
    weight stacks theirs: its per-example gradient norm is their joint norm.
    """
    widths = [layer.out_features for layer in layers]
    g = torch.cat([_flat(x, w) for x, w in zip(gs, widths, strict=True)], -1)
    a = _flat(a, layers[0].in_features).to(g.dtype)
    width, steps, fan_in = g.shape[-1], a.shape[1], a.shape[-1]
    weights, biases = trains(layers[0].weight), trains(layers[0].bias)
    if not weights:
        norms = torch.zeros(len(g), dtype=g.dtype, device=g.device)
    elif steps == 1:
        norms = g.square().sum((1, 2)) * a.square().sum((1, 2))
    elif steps * (fan_in + width) < fan_in * width:
        # Ghost norm: ||g^T a||^2 = <g g^T, a a^T>, without the (out, in) per-example gradient.
        norms = (g @ g.transpose(1, 2) * (a @ a.transpose(1, 2))).sum((1, 2))
    else:  # long sequences: the per-example gradient is the smaller tensor
        norms = (g.transpose(1, 2) @ a).square().sum((1, 2))
    if biases:
        norms = norms + g.sum(1).square().sum(1)

    def clip(coef: torch.Tensor, keep: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        weighted = _rows(keep, g * coef.to(g.dtype)[:, None, None])
        grads: dict[nn.Parameter, torch.Tensor] = {}
        if weights:
            stacked = weighted.reshape(-1, width).T @ _rows(keep, a).reshape(-1, fan_in)
            grads.update(zip([layer.weight for layer in layers], stacked.split(widths),
                                 strict=True))
        if biases:
            grads.update(zip([layer.bias for layer in layers],
                             weighted.sum((0, 1)).split(widths), strict=True))
        return grads

    return norms, clip


def _embedding(layer: nn.Embedding, ids: torch.Tensor, g: torch.Tensor,
               _trains: Trains) -> tuple[torch.Tensor, Clip]:
    """Per-example squared norms of an embedding's gradients, and its clipped sum."""
    ids, g = ids.reshape(ids.shape[0], math.prod(ids.shape[1:])), _flat(g, layer.embedding_dim)
    if layer.padding_idx is not None:  # the padding row gets no gradient
        g = g * (ids != layer.padding_idx).unsqueeze(-1).to(g.dtype)
    # Row v of an example's gradient sums the output gradients of its tokens with id v.
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
    norms = (same * (g @ g.transpose(1, 2))).sum((1, 2))

    def clip(coef: torch.Tensor, keep: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        rows = _rows(keep, g * coef.to(g.dtype)[:, None, None]).reshape(-1, layer.embedding_dim)
        return {layer.weight: torch.zeros_like(layer.weight).index_add_(
            0, ids.reshape(-1), rows.to(layer.weight.dtype))}

    return norms, clip


def _layer_norm(layer: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor,
                trains: Trains) -> tuple[torch.Tensor, Clip]:
    """Per-example squared norms of a LayerNorm's affine gradients, and their clipped sum.

    The per-example gradients are as small as the parameters, so they are formed.
    """
    dims = tuple(range(1, x.dim() - len(layer.normalized_shape)))
    samples = {}
    if trains(layer.weight):
        normed = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
        samples[layer.weight] = (normed * g).sum(dims)
    if trains(layer.bias):
        samples[layer.bias] = g.sum(dims)
    norms = sum(s.reshape(len(s), -1).square().sum(1) for s in samples.values())

    def clip(coef: torch.Tensor, keep: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        return {p: torch.einsum("n,n...->...", coef.to(s.dtype), _rows(keep, s))
                for p, s in samples.items()}

    return norms, clip


#: Each supported layer type's norms-and-clipped-sum function (Linear: by shared input).
_LAYERS = {nn.Embedding: _embedding, nn.LayerNorm: _layer_norm}
SUPPORTED = (nn.Linear, *_LAYERS)


class BookKeepingClipper:
    """Hooks on a model's trainable layers that turn one backward pass into a clipped sum.

    Parameters
    ----------
    model
        The classifier (or head); its trainable layers must be of a supported type.
    max_grad_norm
        The per-example clipping norm ``C``.

    Raises
    ------
    ValueError
        If a trainable parameter sits in a layer type book-keeping does not support.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        self.max_grad_norm = max_grad_norm
        self.names = {m: name or type(m).__name__ for name, m in model.named_modules()
                      if any(p.requires_grad for p in m.parameters(recurse=False))}
        self.layers = list(self.names)
        unsupported = sorted({type(m).__name__ for m in self.layers
                              if type(m) not in SUPPORTED
                              or (isinstance(m, nn.Embedding) and (m.max_norm or m.sparse))})
        if unsupported:
            raise ValueError(
                "--grad-sample-mode bk supports trainable Linear, Embedding (without "
                "max_norm or sparse) and LayerNorm layers only; this model trains "
                f"{', '.join(unsupported)}: use --grad-sample-mode ghost")
        self.params = [p for m in self.layers for p in m.parameters(recurse=False)
                       if p.requires_grad]
        if not self.params:
            raise ValueError("--grad-sample-mode bk: the model has no trainable parameters")
        self._ids = {id(p) for p in self.params}
        self._armed = False
        self._seen: dict[nn.Module, list[torch.Tensor]] = {}
        self._handles: list[RemovableHandle] = [model.register_forward_pre_hook(self._detach)]
        self._handles += [m.register_forward_hook(self._record) for m in self.layers]
        self.per_sample_norms: torch.Tensor | None = None

    def _trains(self, param: nn.Parameter | None) -> bool:
        return param is not None and id(param) in self._ids

    def _active(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled()

    def _detach(self, module: nn.Module, _inputs: tuple) -> None:
        """Leave the parameters out of the graph: the backward pass needs no weight gradients."""
        if self._active(module):
            self._seen.clear()
            self._armed = True
            for p in self.params:
                p.requires_grad_(False)

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not self._active(module) or not self._armed:
            return
        if module in self._seen:
            self._release()
            raise NotImplementedError(
                f"--grad-sample-mode bk: {self.names[module]} ({type(module).__name__}) runs "
                "twice in one forward pass (shared weights, as in ALBERT); use "
                "--grad-sample-mode hooks (Opacus's ghost clipping refuses shared weights too)")
        if not output.requires_grad:  # nothing trainable upstream: the graph starts here
            output.requires_grad_(True)
        a = inputs[0].detach()
        # Which tensor this is (host-side metadata): layers given the same one share it.
        key = (a.data_ptr(), a.dtype, tuple(a.shape), a.stride(), a.storage_offset())
        record = self._seen[module] = [key, a]
        output.register_hook(record.append)

    def _release(self) -> None:
        self._armed = False
        for p in self.params:
            p.requires_grad_(True)

    def backward(self, losses: torch.Tensor) -> None:
        """Backpropagate per-example ``losses`` once; set each ``p.grad`` to the clipped sum.

        Raises
        ------
        RuntimeError
            If ``losses`` did not come from a training-mode forward pass of the model.
        """
        if not self._armed:
            raise RuntimeError("--grad-sample-mode bk: backward() needs the losses of a "
                               "training-mode forward pass of the whole model")
        try:
            uncalled = [self.names[m] for m in self.layers if m not in self._seen]
            if uncalled:
                raise NotImplementedError(
                    f"--grad-sample-mode bk: trainable {', '.join(uncalled)} did not run its "
                    "forward in this pass (its weights were used directly, as DeBERTa's "
                    "relative embeddings are), so no mode can clip its per-example "
                    "gradients; choose a --trainable set that leaves it frozen")
            losses.sum().backward()
        finally:
            self._release()
        # A layer whose output the loss does not reach has no output gradient.
        seen = {layer: r for layer, r in self._seen.items() if len(r) == 3}
        self._seen = {}
        layers = self._layers(seen)
        squared = (torch.stack([norms.float() for norms, _ in layers]).sum(0) if layers
                   else torch.zeros(len(losses), device=losses.device))  # float32: MPS
        keep = torch.isfinite(squared)  # a non-finite gradient weighs nothing
        norms = squared.sqrt()
        self.per_sample_norms = norms.to(losses.dtype)
        coef = torch.where(keep, (self.max_grad_norm / (norms + _EPS)).clamp(max=1.0), 0.0)
        clipped: dict[nn.Parameter, torch.Tensor] = {}
        for _, clip in layers:
            clipped.update(clip(coef, keep))
        for p in self.params:  # zero for a layer the loss does not reach
            p.grad = clipped[p].to(p.dtype) if p in clipped else torch.zeros_like(p)

    def _layers(self, seen: dict[nn.Module, list]) -> list[tuple[torch.Tensor, Clip]]:
        """Norms and clipped sums of the layers ``seen``; linears that share an input as one."""
        shared: dict[tuple, list[tuple[nn.Linear, torch.Tensor, torch.Tensor]]] = {}
        layers = []
        for layer, (key, a, g) in seen.items():
            if isinstance(layer, nn.Linear):
                pattern = (self._trains(layer.weight), self._trains(layer.bias))
                shared.setdefault((*key, *pattern), []).append((layer, a, g))
            else:
                layers.append(_LAYERS[type(layer)](layer, a, g, self._trains))
        for group in shared.values():
            linears, inputs, grads = zip(*group, strict=True)
            layers.append(_linears(list(linears), inputs[0], list(grads), self._trains))
        return layers

    def close(self) -> None:
        """Remove the hooks; the model is a plain module again."""
        self._release()
        for handle in self._handles:
            handle.remove()
        self._handles = []


class BookKeepingLoss:
    """A criterion whose loss's ``backward()`` runs book-keeping clipping.

    ``criterion`` must take ``reduction="none"``; the returned loss detaches to the mean
    (what is logged), and its ``backward()`` sets every trainable ``p.grad`` to the sum
    of clipped per-example gradients (as Opacus's ghost-clipping loss does).
    """

    def __init__(self, clipper: BookKeepingClipper, criterion: nn.Module) -> None:
        self.clipper = clipper
        self.criterion = criterion

    def __call__(self, *args: torch.Tensor) -> PerExampleLoss:
        """Per-example losses of ``criterion(*args)``."""
        reduction, self.criterion.reduction = self.criterion.reduction, "none"
        try:
            return PerExampleLoss(self.criterion(*args), self.clipper)
        finally:
            self.criterion.reduction = reduction


class PerExampleLoss:
    """Per-example losses of one batch, backpropagated through a :class:`BookKeepingClipper`."""

    def __init__(self, losses: torch.Tensor, clipper: BookKeepingClipper) -> None:
        self.losses = losses
        self.clipper = clipper

    def __mul__(self, factor: float) -> PerExampleLoss:
        """The losses scaled by ``factor`` (0 for an empty batch's placeholder)."""
        return PerExampleLoss(self.losses * factor, self.clipper)

    def detach(self) -> torch.Tensor:
        """The batch's mean loss."""
        return self.losses.detach().mean()

    def backward(self) -> None:
        """One backward pass; ``p.grad`` becomes the sum of clipped per-example gradients."""
        self.clipper.backward(self.losses)
