"""An eager PyTorch K-SSM v3, written from the spec's formulas (shared/docs/kssm-v3-spec.md), as
the reference ratio in ``kssm bench``: what the published model costs in eager PyTorch on the
same machine, in the same run. Not used anywhere else; imported only when torch is installed.

It computes what the published code computes, in the published way: the readout from cos and
sin of the (B, L, N, H) angle tensor, the phase noise drawn at every forward pass, the head tied
to the embedding, AdamW with gradient clipping. ``tests/test_bench.py`` checks that, with the
same weights and no noise, its logits equal this package's.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn


class TorchBank(nn.Module):
    """Spec "Forward pass, per layer", steps 1-7."""

    def __init__(self, d: int, n: int, h: int, bistable: bool = True):
        super().__init__()
        self.omega_0 = nn.Parameter(torch.linspace(-math.pi, math.pi, n))
        self.delta_param = nn.Parameter(torch.tensor([0.2]))
        self.to_params = nn.Linear(d, 10)
        nn.init.orthogonal_(self.to_params.weight)
        nn.init.constant_(self.to_params.bias, 0.5)
        self.readout = nn.Linear(3 * h, d)
        self.n_harmonics, self.bistable = h, bistable
        self.noise = True

    def forward(self, x):
        a, b, c, d, e, f, g, h = self.to_params(x).unbind(-1)[:8]
        det = b * g - c * f
        u = (d * g - c * h) / (a * g - c * e + 1e-6)
        if self.bistable:
            u = u.clamp(0.1, 10.0)
        coupling = 2 * torch.sigmoid(u).unsqueeze(-1)
        theta0 = self.omega_0 + x.mean(-1, keepdim=True)
        ms = torch.sin(theta0).mean(-1, keepdim=True)
        mc = torch.cos(theta0).mean(-1, keepdim=True)
        theta = theta0 + coupling * (ms * torch.cos(theta0) - mc * torch.sin(theta0))
        if self.noise:
            theta = theta - (self.delta_param.abs() + 1e-5) * torch.randn_like(theta)
        harmonics = torch.arange(1, self.n_harmonics + 1, dtype=theta.dtype)
        angles = theta.unsqueeze(-1) * harmonics  # (B, L, N, H)
        re, im = torch.cos(angles).mean(-2), torch.sin(angles).mean(-2)
        features = torch.cat([re, im, torch.sqrt(re * re + im * im + 1e-8)], dim=-1)
        reg = 0.1 / (det.abs().mean() + 1e-5) + 0.5 * (-torch.log(u.mean().clamp(min=1e-5)))
        return self.readout(features), reg


class TorchBlock(nn.Module):
    def __init__(self, d, n, h, bistable):
        super().__init__()
        self.oscillators = TorchBank(d, n, h, bistable)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        out, reg = self.oscillators(self.norm1(x))
        x = x + out
        return x + self.ffn(self.norm2(x)), reg


class TorchKSSMv3(nn.Module):
    """Spec "Block and model": learned positions, pre-norm blocks, a head tied to the embedding."""

    def __init__(self, args):
        super().__init__()
        d = args.hidden_dim
        self.embed = nn.Embedding(args.vocab_size, d)
        self.pos_embed = nn.Parameter(torch.randn(1, args.max_positions, d) * 0.02)
        self.blocks = nn.ModuleList(
            TorchBlock(d, args.n_oscillators, args.n_harmonics, args.bistable)
            for _ in range(args.n_layers)
        )
        self.final_norm = nn.LayerNorm(d)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        regs = []
        for block in self.blocks:
            x, reg = block(x)
            regs.append(reg)
        return self.final_norm(x) @ self.embed.weight.T, torch.stack(regs).mean()


def measure_train_step(args, batch: int, length: int, warmup: int, repeats: int) -> dict:
    """Seconds of one full eager train step (forward, CE + 0.5 reg, backward, clip, AdamW)."""
    torch.manual_seed(0)
    model = TorchKSSMv3(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    tokens = torch.randint(0, args.vocab_size, (batch, length + 1))

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits, reg = model(tokens[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        (ce + 0.5 * reg).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": times, "parameters": sum(p.numel() for p in model.parameters())}
