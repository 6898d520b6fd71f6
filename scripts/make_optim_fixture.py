#!/usr/bin/env python3
"""Reference trajectories of torch.optim.AdamW + clipping + transformers' LR schedules,
for the Rust parity test `tests/optim.rs` (osp::train::optim).

Usage (from the repository root):

    /work/pyenv/bin/python scripts/make_optim_fixture.py [--out tests/fixtures/optim]

Writes
  adamw.safetensors   float32 tensors, keys "<case>/<kind>/<name>":
                        <case>/init/<param>            parameters before step 0
                        <case>/grad/<step>/<param>     gradient fed at optimiser step <step> (0-based)
                        <case>/final/<param>           parameters after the last step
                        <case>/exp_avg/<param>         torch's first moment after the last step
                        <case>/exp_avg_sq/<param>      torch's second moment after the last step
  adamw.json          scalars: per case the osp OptimConfig (field names as in the TOML section),
                      total_steps, parameter order, and per step the learning rate used, the global
                      gradient L2 norm before clipping and whether clipping scaled the gradients;
                      plus "schedules": LR multipliers of transformers' schedule functions for
                      steps 0..=total (lr = 1).

Every case uses three parameters: a 2-D matrix "layer.weight" [4, 3], a 1-D bias-like vector
"layer.bias" [5] and a 3-D tensor "conv.weight" [2, 3, 2]. As in the usual transformers
recipe, weight decay is applied through param groups only to tensors with dim >= 2.

Each step: p.grad = stored gradient; clip_grad_norm_(max_norm) when max_grad_norm > 0 (its
return value, the norm before clipping, is recorded; otherwise the same norm is computed
without clipping); optimizer.step(); scheduler.step(). The LR recorded for a step is the
group LR used by that optimizer.step() (LambdaLR counts from 0, so with warm-up the first
step has LR 0, exactly as in transformers' Trainer).

Deterministic: fixed seeds, float32, CPU, single-tensor (foreach=False) AdamW.
"""
import argparse
import json
import math
import os

import torch

torch.set_num_threads(2)

import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

SHAPES = [("layer.weight", (4, 3)), ("layer.bias", (5,)), ("conv.weight", (2, 3, 2))]
STEPS = 6

# Per-step gradient scales: chosen so the global norm (about 5.4 * scale) crosses the
# clipping threshold on some steps and not on others.
GRAD_SCALES = [0.1, 0.4, 0.2, 1.0, 0.15, 0.5]

CASES = [
    {
        # The brief's main case: cosine with warm-up 2 over 6 steps, clipping on some steps.
        "name": "cosine",
        "seed": 1,
        "config": {
            "lr": 0.05,
            "weight_decay": 0.1,
            "beta1": 0.9,
            "beta2": 0.999,
            "eps": 1e-8,
            "max_grad_norm": 1.5,
            "warmup_steps": 2,
            "schedule": "cosine",
            "min_lr_ratio": 0.0,
        },
        "total_steps": 6,
    },
    {
        # Linear decay (min_lr_ratio 0 = transformers' linear schedule), no clipping,
        # non-default betas / eps so that every field is exercised.
        "name": "linear",
        "seed": 2,
        "config": {
            "lr": 0.02,
            "weight_decay": 0.05,
            "beta1": 0.8,
            "beta2": 0.99,
            "eps": 1e-6,
            "max_grad_norm": 0.0,
            "warmup_steps": 1,
            "schedule": "linear",
            "min_lr_ratio": 0.0,
        },
        "total_steps": 6,
    },
    {
        # Cosine to a floor (transformers' cosine_with_min_lr), no warm-up, total_steps
        # longer than the replay.
        "name": "cosine_min_lr",
        "seed": 3,
        "config": {
            "lr": 0.03,
            "weight_decay": 0.2,
            "beta1": 0.9,
            "beta2": 0.95,
            "eps": 1e-8,
            "max_grad_norm": 1.0,
            "warmup_steps": 0,
            "schedule": "cosine",
            "min_lr_ratio": 0.1,
        },
        "total_steps": 8,
    },
]


def make_scheduler(opt, cfg, total):
    w = cfg["warmup_steps"]
    if cfg["schedule"] == "constant":
        assert cfg["min_lr_ratio"] == 0.0
        return get_constant_schedule_with_warmup(opt, w)
    if cfg["schedule"] == "linear":
        assert cfg["min_lr_ratio"] == 0.0, "transformers has no linear schedule with a floor"
        return get_linear_schedule_with_warmup(opt, w, total)
    if cfg["schedule"] == "cosine":
        if cfg["min_lr_ratio"] == 0.0:
            return get_cosine_schedule_with_warmup(opt, w, total)
        return get_cosine_with_min_lr_schedule_with_warmup(
            opt, w, total, min_lr_rate=cfg["min_lr_ratio"]
        )
    raise ValueError(cfg["schedule"])


def total_norm(grads):
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def run_case(case, tensors):
    name, cfg, total = case["name"], case["config"], case["total_steps"]
    g = torch.Generator().manual_seed(case["seed"])
    params = [torch.randn(shape, generator=g, dtype=torch.float32) for _, shape in SHAPES]
    for (pname, _), p in zip(SHAPES, params):
        tensors[f"{name}/init/{pname}"] = p.clone()
    params = [torch.nn.Parameter(p) for p in params]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg["lr"],
        betas=(cfg["beta1"], cfg["beta2"]),
        eps=cfg["eps"],
        foreach=False,
    )
    sched = make_scheduler(opt, cfg, total)
    lrs, norms, clipped = [], [], []
    for step in range(STEPS):
        for (pname, shape), p in zip(SHAPES, params):
            grad = torch.randn(shape, generator=g, dtype=torch.float32) * GRAD_SCALES[step]
            tensors[f"{name}/grad/{step}/{pname}"] = grad.clone()
            p.grad = grad
        max_norm = cfg["max_grad_norm"]
        if max_norm > 0:
            n = torch.nn.utils.clip_grad_norm_(params, max_norm)
            # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)).
            clipped.append(bool(max_norm / (float(n) + 1e-6) < 1.0))
        else:
            n = total_norm([p.grad for p in params])
            clipped.append(False)
        norms.append(float(n))
        assert len({grp["lr"] for grp in opt.param_groups}) == 1
        lrs.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
    for (pname, _), p in zip(SHAPES, params):
        tensors[f"{name}/final/{pname}"] = p.detach().clone()
        st = opt.state[p]
        tensors[f"{name}/exp_avg/{pname}"] = st["exp_avg"].clone()
        tensors[f"{name}/exp_avg_sq/{pname}"] = st["exp_avg_sq"].clone()
        assert int(st["step"]) == STEPS
    print(
        f"{name}: lrs {['%.6g' % x for x in lrs]}, norms {['%.4g' % x for x in norms]}, "
        f"clipped {clipped}"
    )
    return {
        "name": name,
        "config": cfg,
        "total_steps": total,
        "steps": STEPS,
        "params": [pname for pname, _ in SHAPES],
        "lrs": lrs,
        "grad_norms": norms,
        "clipped": clipped,
    }


def schedule_table():
    """LR multipliers of transformers' schedules (base lr 1) for steps 0..=total."""
    out = []
    variants = [
        ("constant", 0, 5, 0.0),
        ("constant", 3, 8, 0.0),
        ("linear", 0, 7, 0.0),
        ("linear", 3, 10, 0.0),
        ("linear", 10, 10, 0.0),
        ("cosine", 0, 7, 0.0),
        ("cosine", 4, 13, 0.0),
        ("cosine", 2, 9, 0.25),
        ("cosine", 1, 1, 0.0),
    ]
    for schedule, warmup, total, min_ratio in variants:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        cfg = {"schedule": schedule, "warmup_steps": warmup, "min_lr_ratio": min_ratio}
        sched = make_scheduler(opt, cfg, total)
        factors = []
        for _ in range(total + 1):
            factors.append(float(opt.param_groups[0]["lr"]))
            opt.step()
            sched.step()
        out.append({**cfg, "total_steps": total, "factors": factors})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/optim")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tensors = {}
    cases = [run_case(c, tensors) for c in CASES]
    meta = {
        "generator": "scripts/make_optim_fixture.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cases": cases,
        "schedules": schedule_table(),
    }
    assert all(math.isfinite(x) for c in cases for x in c["grad_norms"])
    assert any(any(c["clipped"]) and not all(c["clipped"]) for c in cases)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(args.out, "adamw.safetensors"))
    with open(os.path.join(args.out, "adamw.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {len(tensors)} tensors to {args.out}")


if __name__ == "__main__":
    main()
