#!/usr/bin/env python3
"""Reference values and gradients of the preference losses, for the Rust parity test
`tests/loss.rs` (osp::loss::preference_loss).

Usage (from the repository root):

    /work/pyenv/bin/python scripts/make_loss_fixture.py [--out tests/fixtures/loss]

Writes
  loss.safetensors   float32 tensors:
                       inputs/policy_chosen, inputs/policy_rejected,
                       inputs/ref_chosen, inputs/ref_rejected   [6] summed response log-probs
                       inputs/strength                          [6] SPCE strengths in [0, 1]
                       <case>/grad_policy_chosen                [6] d loss / d policy_chosen
                       <case>/grad_policy_rejected              [6] d loss / d policy_rejected
                       <case>/per_pair_loss                     [6] the loss of each pair
  loss.json          versions, the inputs again (as JSON numbers) and per case: kind,
                     beta, label_smoothing, the loss (mean over pairs), where the value came
                     from, and TRL's logged metrics ("rewards/chosen", ...), plus
                     "strength/mean" for SPCE.

Where the numbers come from (see tests/fixtures/loss/README.md for the quoted TRL lines):
  dpo, ipo, hinge  the installed TRL's own loss and metric code: DPOTrainer._compute_loss
                   (TRL 1.16 has no standalone dpo_loss), called unbound with a small
                   stand-in for `self` and a stand-in model whose per-token log-probs are the
                   summed log-probs (one completion token per sequence, so TRL's IPO length
                   normalisation divides by 1), loss_type "sigmoid" / "ipo" / "hinge".
  cdpo             TRL 1.16's "sigmoid" no longer takes label_smoothing, so cDPO is
                   re-implemented from TRL 0.11.4's dpo_loss lines (quoted in the README) and
                   cross-checked against TRL 1.16's own "aot" loss run one pair at a time
                   (with a single pair its sorts are the identity and it is the same
                   expression).
  spce             torch, from OSP.md section 3: -[s logsigmoid(h) + (1 - s) logsigmoid(-h)];
                   the strengths s come from the section 1 judge formula on random logits.
Every loss is also recomputed in float64 from the plain formulas and must agree.

Deterministic: fixed seed, float32, CPU.
"""
import argparse
import json
import os
from collections import defaultdict
from types import SimpleNamespace

import torch
import torch.nn.functional as F

torch.set_num_threads(2)

import trl  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402

N = 6
BETAS = [0.1, 0.5]
CDPO_EPS = [0.1, 0.3]


def make_inputs():
    g = torch.Generator().manual_seed(20240523)
    u = lambda: -5.0 - 15.0 * torch.rand(N, generator=g, dtype=torch.float64)  # noqa: E731
    pc, pr, rc, rr = u(), u(), u(), u()
    # Pair 0: policy == reference, so h = 0 exactly (a LoRA run's first step).
    pc[0], pr[0] = rc[0], rr[0]
    # Pair 4: log-ratio difference +500 (h = 50 at beta 0.1, 250 at beta 0.5).
    pc[4], rc[4], pr[4], rr[4] = -6.0, -13.0, -505.0, -12.0
    # Pair 5: log-ratio difference -500.
    pc[5], rc[5], pr[5], rr[5] = -507.0, -9.0, -8.0, -10.0
    # Strengths from the OSP judge formula, s = 1/2 [p_AB(y1, y2) + 1 - p_AB(y2, y1)],
    # p_AB = exp(lA) / (exp(lA) + exp(lB)), with random answer-token logits.
    logits_12 = 2.0 * torch.randn(N, 2, generator=g, dtype=torch.float64)
    logits_21 = 2.0 * torch.randn(N, 2, generator=g, dtype=torch.float64)
    p_ab_12 = torch.softmax(logits_12, dim=-1)[:, 0]
    p_ab_21 = torch.softmax(logits_21, dim=-1)[:, 0]
    s = 0.5 * (p_ab_12 + (1.0 - p_ab_21))
    f32 = lambda t: t.to(torch.float32)  # noqa: E731
    return {
        "policy_chosen": f32(pc),
        "policy_rejected": f32(pr),
        "ref_chosen": f32(rc),
        "ref_rejected": f32(rr),
        "strength": f32(s),
    }


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def gather(x):
        return x


def trl_compute_loss(inp, loss_type, beta, label_smoothing=0.0):
    """Run TRL's DPOTrainer._compute_loss on summed log-probs; returns (loss, grads, metrics)."""
    pc = inp["policy_chosen"].clone().requires_grad_(True)
    pr = inp["policy_rejected"].clone().requires_grad_(True)
    n = pc.shape[0]

    class _Model:
        training = False

        def __call__(self, **kwargs):
            assert kwargs["fused_lm_head"] is True
            rows = kwargs["input_ids"].shape[0]
            # One completion token per sequence whose log-prob is the summed log-prob.
            log_probs = torch.cat([pc, pr]).unsqueeze(1)
            return SimpleNamespace(
                log_probs=log_probs,
                entropy=torch.zeros(rows, 1),
                mean_logits=torch.zeros(rows, 1),
                is_top1=torch.zeros(rows, 1, dtype=torch.bool),
                aux_loss=None,
            )

    model = _Model()
    this = SimpleNamespace(
        model=model,
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2 * n, 2, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, 2, dtype=torch.long),
        # Prompt token then one completion token: shift_completion_mask is [2n, 1] of ones.
        "completion_mask": torch.tensor([[0, 1]] * (2 * n), dtype=torch.long),
        "ref_chosen_logps": inp["ref_chosen"].clone(),
        "ref_rejected_logps": inp["ref_rejected"].clone(),
    }
    loss = DPOTrainer._compute_loss(this, model, inputs, return_outputs=False)
    loss.backward()
    metrics = {
        k: v[-1] for k, v in this._metrics["eval"].items() if k.split("/")[0] in ("rewards", "logps")
    }
    return loss.detach(), pc.grad.detach(), pr.grad.detach(), metrics


def torch_loss(inp, fn):
    """fn(h_unscaled_logits) -> per-pair loss, on float32 leaves; returns (loss, grads, per_pair)."""
    pc = inp["policy_chosen"].clone().requires_grad_(True)
    pr = inp["policy_rejected"].clone().requires_grad_(True)
    logits = (pc - pr) - (inp["ref_chosen"] - inp["ref_rejected"])
    per_pair = fn(logits)
    loss = per_pair.mean()
    loss.backward()
    return loss.detach(), pc.grad.detach(), pr.grad.detach(), per_pair.detach()


def cdpo_trl_0_11_4(beta, label_smoothing):
    """TRL 0.11.4 DPOTrainer.dpo_loss, loss_type == "sigmoid" (logits = pi_logratios - ref_logratios)."""

    def per_pair(logits):
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
        return losses

    return per_pair


def trl_aot_one_pair_at_a_time(inp, beta, label_smoothing):
    """TRL 1.16's "aot" loss, one pair per call; returns the mean loss and its gradients."""
    losses, gcs, grs = [], [], []
    for i in range(N):
        one = {k: v[i : i + 1] for k, v in inp.items()}
        loss, gc, gr, _ = trl_compute_loss(one, "aot", beta, label_smoothing)
        losses.append(loss)
        gcs.append(gc)
        grs.append(gr)
    return torch.stack(losses).mean(), torch.cat(gcs) / N, torch.cat(grs) / N


def f64_reference(inp, kind, beta, eps):
    d = {k: v.to(torch.float64) for k, v in inp.items()}
    logits = (d["policy_chosen"] - d["policy_rejected"]) - (d["ref_chosen"] - d["ref_rejected"])
    h = beta * logits
    if kind == "dpo":
        per = -F.logsigmoid(h)
    elif kind == "cdpo":
        per = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    elif kind == "spce":
        s = d["strength"]
        per = -(s * F.logsigmoid(h) + (1 - s) * F.logsigmoid(-h))
    elif kind == "ipo":
        per = (h / beta - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        per = torch.relu(1 - h)
    else:
        raise ValueError(kind)
    return per.mean().item(), per


def close(a, b, tol=2e-6):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return bool(((a - b).abs() <= tol * (1 + b.abs())).all())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/loss")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    inp = make_inputs()
    tensors = {f"inputs/{k}": v.contiguous() for k, v in inp.items()}
    cases = []

    def add(name, kind, beta, eps, loss, gc, gr, per_pair, source, metrics):
        ref, per64 = f64_reference(inp, kind, beta, eps)
        assert close(loss, ref), (name, float(loss), ref)
        assert close(per_pair, per64), (name, per_pair, per64)
        assert torch.isfinite(gc).all() and torch.isfinite(gr).all(), name
        tensors[f"{name}/grad_policy_chosen"] = gc.contiguous()
        tensors[f"{name}/grad_policy_rejected"] = gr.contiguous()
        tensors[f"{name}/per_pair_loss"] = per_pair.to(torch.float32).contiguous()
        cases.append(
            {
                "name": name,
                "config": {"kind": kind, "beta": beta, "label_smoothing": eps},
                "loss": float(loss),
                "loss_f64": ref,
                "source": source,
                "metrics": metrics,
            }
        )

    for beta in BETAS:
        b = f"beta{beta}"
        trl_metrics = None
        for kind, loss_type in [("dpo", "sigmoid"), ("ipo", "ipo"), ("hinge", "hinge")]:
            loss, gc, gr, metrics = trl_compute_loss(inp, loss_type, beta)
            trl_metrics = metrics
            # Same loss from the plain formula on float32 leaves: values and gradients agree.
            fn = {
                "dpo": lambda lg: -F.logsigmoid(beta * lg),
                "ipo": lambda lg: (lg - 1 / (2 * beta)) ** 2,
                "hinge": lambda lg: torch.relu(1 - beta * lg),
            }[kind]
            l2, gc2, gr2, per_pair = torch_loss(inp, fn)
            assert close(loss, l2) and close(gc, gc2) and close(gr, gr2), kind
            add(
                f"{kind}_{b}",
                kind,
                beta,
                0.0,
                loss,
                gc,
                gr,
                per_pair,
                f"trl {trl.__version__} DPOTrainer._compute_loss, loss_type={loss_type!r}",
                metrics,
            )
        for eps in CDPO_EPS:
            loss, gc, gr, per_pair = torch_loss(inp, cdpo_trl_0_11_4(beta, eps))
            la, gca, gra = trl_aot_one_pair_at_a_time(inp, beta, eps)
            assert close(loss, la) and close(gc, gca) and close(gr, gra), ("cdpo vs aot", eps)
            add(
                f"cdpo_eps{eps}_{b}",
                "cdpo",
                beta,
                eps,
                loss,
                gc,
                gr,
                per_pair,
                "TRL 0.11.4 dpo_loss sigmoid lines with label_smoothing (re-implemented); "
                f"equal to trl {trl.__version__} loss_type='aot' run one pair at a time",
                trl_metrics,
            )
        s = inp["strength"]
        loss, gc, gr, per_pair = torch_loss(
            inp,
            lambda lg: -(s * F.logsigmoid(beta * lg) + (1 - s) * F.logsigmoid(-beta * lg)),
        )
        metrics = dict(trl_metrics)
        metrics["strength/mean"] = float(s.to(torch.float64).mean())
        add(f"spce_{b}", "spce", beta, 0.0, loss, gc, gr, per_pair, "torch, OSP.md section 3", metrics)

    save_file(tensors, os.path.join(args.out, "loss.safetensors"))
    meta = {
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "n_pairs": N,
        "inputs": {k: [float(x) for x in v] for k, v in inp.items()},
        "cases": cases,
    }
    with open(os.path.join(args.out, "loss.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    for c in cases:
        print(f"{c['name']:>22}  loss {c['loss']:.8g}")


if __name__ == "__main__":
    main()
