"""The exact generic fallback: a module's own forward re-run, and each group's output gradient pulled back.

For any module no rule claims. The forward is re-run once per use, on the
*whole* batch (rows must not be sliced before the forward, or dropout masks
would differ), functionally with detached copies of the module's own
parameters, with the CPU/CUDA RNG and the autocast state of the original
forward replayed. Each group's contribution is then one ``autograd.grad`` of
the re-run outputs against the output gradients with the other rows zeroed.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from ..precision import autocast_as
from .base import Probes, ProbeResult, Rule, RowSelector, Use, probe_dense, tensor_leaves


def rerun_forward(use: Use) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """(output tensors, parameters they were computed from), memoised for this use."""
    if "rerun" not in use.memo:
        m = use.module
        params = {name: p.detach().requires_grad_(True) for name, p in m.named_parameters(recurse=False) if name in use.wanted}

        def run():
            cuda = use.rng_state[1] if use.rng_state is not None else None
            with torch.enable_grad(), torch.random.fork_rng(devices=[cuda[0]] if cuda else []), autocast_as(use.autocast):
                if use.rng_state is not None:
                    torch.random.set_rng_state(use.rng_state[0])
                    if cuda:
                        torch.cuda.set_rng_state(cuda[1], cuda[0])
                return functional_call(m, params, use.args, use.kwargs, strict=False)

        use.memo["rerun"] = (tensor_leaves(use.run_unhooked(run)), params)
    return use.memo["rerun"]


def _keep_rows(g: torch.Tensor, rows: RowSelector) -> torch.Tensor:
    """``g`` with every row outside ``rows`` zeroed."""
    index = rows(torch.arange(g.shape[0], device=g.device))
    return torch.zeros_like(g).index_copy_(0, index, g.index_select(0, index))


def contribution(use: Use, rows: RowSelector) -> dict[str, torch.Tensor]:
    """Exact contribution of the selected rows: their output gradients pulled back
    through the module's own forward (re-run once per use)."""
    outputs, params = rerun_forward(use)
    pairs = [(o, _keep_rows(g, rows)) for o, g in zip(outputs, use.grad_outputs) if g is not None and o.requires_grad]
    grads = torch.autograd.grad(
        [o for o, _ in pairs], list(params.values()), [g for _, g in pairs], retain_graph=True, allow_unused=True
    )
    return {name: (torch.zeros_like(p) if gr is None else gr).to(use.dtype) for (name, p), gr in zip(params.items(), grads)}


def probe(use: Use, probes: Probes) -> ProbeResult:
    parts = contribution(use, lambda x: x)
    return {name: probe_dense(t, probes[name]) for name, t in parts.items()}


def per_row_sq(use: Use) -> dict[str, torch.Tensor]:
    n = use.grad_outputs[0].shape[0]
    per_row = [contribution(use, lambda x, i=i: x[i : i + 1]) for i in range(n)]
    return {name: torch.stack([r[name].pow(2).sum() for r in per_row]) for name in use.wanted}


FALLBACK = Rule("fallback", contribution, probe, per_row_sq, reruns_forward=True)
