#!/usr/bin/env python3
"""Reference values of TRL's PPO maths on fixed tensors, for the Rust parity test `tests/ppo.rs`
(osp::ppo).

Usage (from the repository root):

    /work/pyenv/bin/python scripts/make_ppo_fixture.py [--out tests/fixtures/ppo]

Where TRL's PPO lives. The installed TRL (1.16) ships no PPO trainer any more (neither under
`trl.trainer` nor `trl.experimental`); it keeps only two helpers PPO used, which this script
imports: `trl.trainer.utils.selective_log_softmax` and `trl.experimental.utils.first_true_indices`.
The newest TRL source with a PPO trainer available here is commit
f2cd57710ae345ea6428ae95363267fcf38a3dc8 (version 1.10.0.dev0), file
`trl/experimental/ppo/ppo_trainer.py`. Its maths is inlined in `PPOTrainer.train`, so the lines
are copied below verbatim (only the indentation changed), each block marked with the line
numbers it comes from ("ppo_trainer.py:L763-798"). `masked_mean`, `masked_var` and
`masked_whiten` are copied from the same file (L237-272). The optional early stop on a target
KL is not in that trainer; it is TRL 0.11.4's (`trl/trainer/ppo_trainer.py`: `policykl =
masked_mean(old_logprobs - logprobs, mask)` at L1256, and `policykl > 1.5 * target_kl` in
`_early_stop`, L916).

Writes
  rollout.json   cases of the rollout post-processing (missing-EOS penalty, masks, per-token
                 KL rewards plus the score, optional reward whitening, GAE, returns, whitened
                 advantages) and the rollout metrics, each case's config, inputs and outputs.
                 Computed in float64 (and checked against a float32 run to 1e-5).
  loss.json      the clipped policy and value losses of one mini-batch (float32, as TRL runs),
                 their gradients with respect to the policy's per-token log-probs and the value
                 predictions, the logged statistics, the entropy of temperature-scaled logits,
                 and selective_log_softmax of those logits.

Deterministic: fixed seed, CPU.
"""
import argparse
import json
import os
import warnings
from types import SimpleNamespace

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
torch.set_num_threads(2)

import trl  # noqa: E402
from trl.experimental.utils import first_true_indices  # noqa: E402
from trl.trainer.utils import selective_log_softmax  # noqa: E402

TRL_SOURCE = (
    "trl commit f2cd57710ae345ea6428ae95363267fcf38a3dc8 (1.10.0.dev0), "
    "trl/experimental/ppo/ppo_trainer.py"
)
INVALID_LOGPROB = 1.0  # ppo_trainer.py:L69
PAD, EOS = 0, 2


# ---- ppo_trainer.py:L237-272, verbatim ---------------------------------------------------
def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: bool | None = None) -> torch.Tensor:
    """Compute mean of tensor with a masked values."""
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    else:
        return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Compute variance of tensor with masked values."""
    mean = masked_mean(values, mask)
    centered_values = values - mean
    variance = masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError(
                "The sum of the mask is zero, which can happen when `mini_batch_size=1`;"
                "try increase the `mini_batch_size` or `gradient_accumulation_steps`"
            )
        # note that if mask_sum == 1, then there is a division by zero issue
        # to avoid it you just need to use a larger minibatch_size
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten values with masked values."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


# ---- ppo_trainer.py:L168-188 (truncate_response), verbatim ---------------------------------
def truncate_response(stop_token_id: int, pad_token_id: int, responses: torch.Tensor) -> torch.Tensor:
    trunc_idxs = first_true_indices(responses == stop_token_id).unsqueeze(-1)
    new_size = [1] * (len(responses.size()) - 1) + [responses.shape[1]]
    idxs = torch.arange(responses.shape[1], device=responses.device).view(*new_size)
    postprocessed_responses = torch.masked_fill(responses, idxs > trunc_idxs, pad_token_id)
    return postprocessed_responses


def trl_rollout(args, responses, logprobs, ref_logprobs, values, scores):
    """PPOTrainer.train's post-processing of one rollout (`self.args` is `args`)."""
    processing_class = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    self = SimpleNamespace(args=args, processing_class=processing_class, stop_token_id=EOS)
    scores = scores.clone()
    # ppo_trainer.py:L719-727 (per forward chunk; here one chunk)
    postprocessed_response = responses
    if self.stop_token_id is not None:  # handle the edge case when stop_token_id exists but is 0
        postprocessed_response = truncate_response(self.stop_token_id, processing_class.pad_token_id, responses)
    sequence_length = first_true_indices(postprocessed_response == processing_class.pad_token_id) - 1
    postprocessed_responses = postprocessed_response
    sequence_lengths = sequence_length
    # ppo_trainer.py:L757-798, verbatim
    contain_eos_token = torch.any(postprocessed_responses == self.processing_class.eos_token_id, dim=-1)
    if self.args.missing_eos_penalty is not None:
        scores[~contain_eos_token] -= self.args.missing_eos_penalty
    response_idxs = torch.arange(responses.shape[1], device=responses.device).repeat(responses.shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)

    # 4. compute rewards
    # Formula used by http://joschu.net/blog/kl-approx.html for the k1 and k3 estimators
    logr = ref_logprobs - logprobs
    kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr  # Else statement is k3
    non_score_reward = -args.kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores

    # 5. whiten rewards
    if args.whiten_rewards:
        rewards = masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)

    # 6. compute advantages and returns
    lastgaelam = 0
    advantages_reversed = []
    gen_length = responses.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + args.gamma * nextvalues - values[:, t]
        lastgaelam = delta + args.gamma * args.lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)

    # ppo_trainer.py:L882-885 and L889-895, L904 (rollout metrics)
    mean_kl = kl.sum(1).mean()
    mean_entropy = (-logprobs).sum(1).mean()
    mean_non_score_reward = non_score_reward.sum(1).mean()
    rlhf_reward = mean_non_score_reward + scores.mean()
    metrics = {
        "objective/kl": mean_kl.item(),
        # TRL sums -logprobs over the padding slots too, where they hold INVALID_LOGPROB = 1;
        # osp sums over response tokens only (see "objective/entropy (response tokens)").
        "objective/entropy (trl, padding included)": mean_entropy.item(),
        "objective/entropy (response tokens)": ((-logprobs) * (~padding_mask)).sum(1).mean().item(),
        "objective/non_score_reward": mean_non_score_reward.item(),
        "objective/rlhf_reward": rlhf_reward.item(),
        "objective/scores": scores.mean().item(),
        "val/num_eos_tokens": (responses == processing_class.eos_token_id).sum().item(),
    }
    return {
        "sequence_lengths": sequence_lengths,
        "contain_eos": contain_eos_token,
        "scores": scores,
        "padding_mask": padding_mask,
        "padding_mask_p1": padding_mask_p1,
        "logprobs": logprobs,
        "ref_logprobs": ref_logprobs,
        "values": values,
        "kl": kl,
        "non_score_reward": non_score_reward,
        "rewards": rewards,
        "advantages": advantages,
        "returns": returns,
    }, metrics


def trl_minibatch_loss(args, new_logprobs_raw, vpred_raw, mb):
    """One micro-batch of PPOTrainer.train's update (ppo_trainer.py:L824-857, verbatim but for
    the forward pass, whose outputs `new_logprobs_raw` / `vpred_raw` are given)."""
    padding_mask, padding_mask_p1 = mb["padding_mask"], mb["padding_mask_p1"]
    mb_logprobs, mb_values = mb["logprobs"], mb["values"]
    mb_return, mb_advantage = mb["returns"], mb["advantages"]
    micro_batch_inds = slice(None)
    new_logprobs = torch.masked_fill(new_logprobs_raw, padding_mask[micro_batch_inds], INVALID_LOGPROB)
    vpred = torch.masked_fill(vpred_raw, padding_mask_p1[micro_batch_inds], 0)
    vpredclipped = torch.clamp(
        vpred,
        mb_values - args.cliprange_value,
        mb_values + args.cliprange_value,
    )
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * masked_mean(vf_loss_max, ~padding_mask_p1[micro_batch_inds])
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1[micro_batch_inds])
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = masked_mean(pg_loss_max, ~padding_mask[micro_batch_inds])
    loss = pg_loss + args.vf_coef * vf_loss
    with torch.no_grad():
        pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask[micro_batch_inds])
        approxkl = 0.5 * (logprobs_diff**2).mean()
        # TRL 0.11.4 trl/trainer/ppo_trainer.py:L1256 (the early-stop statistic)
        policykl = masked_mean(mb_logprobs - new_logprobs, ~padding_mask)
    stats = {
        "loss": loss.item(),
        "pg_loss": pg_loss.item(),
        "vf_loss": vf_loss.item(),
        "pg_clipfrac": pg_clipfrac.item(),
        "vf_clipfrac": vf_clipfrac.item(),
        "approxkl": approxkl.item(),
        "policykl": policykl.item(),
        "ratio_mean": ratio.mean().item(),
    }
    return loss, stats


def rows(t):
    return [[float(x) for x in r] for r in t.tolist()]


def f32_exact(t):
    """Round to float32 so that both sides start from the same numbers."""
    return t.to(torch.float32).to(torch.float64)


B, T = 5, 7
LENGTHS = [7, 3, 5, 1, 6]  # real response tokens per row; row 0 fills the width
HAS_EOS = [False, True, True, True, False]


def make_rollout_inputs(g):
    responses = torch.randint(3, 30, (B, T), generator=g)
    for i, (n, eos) in enumerate(zip(LENGTHS, HAS_EOS)):
        responses[i, n:] = PAD
        if eos:
            responses[i, n - 1] = EOS
    logprobs = f32_exact(-0.2 - 3.0 * torch.rand(B, T, generator=g, dtype=torch.float64))
    ref_logprobs = f32_exact(logprobs - 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64))
    values = f32_exact(0.5 * torch.randn(B, T, generator=g, dtype=torch.float64))
    scores = f32_exact(1.5 * torch.randn(B, generator=g, dtype=torch.float64))
    return responses, logprobs, ref_logprobs, values, scores


ROLLOUT_CASES = [
    ("defaults", dict(kl_coef=0.05, kl_estimator="k1", whiten_rewards=False, missing_eos_penalty=None, gamma=1.0, lam=0.95)),
    ("k3_whiten_penalty", dict(kl_coef=0.2, kl_estimator="k3", whiten_rewards=True, missing_eos_penalty=1.0, gamma=0.99, lam=0.9)),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/ppo")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    g = torch.Generator().manual_seed(20240601)
    responses, logprobs, ref_logprobs, values, scores = make_rollout_inputs(g)

    cases = []
    processed_defaults = None
    for name, cfg in ROLLOUT_CASES:
        args = SimpleNamespace(**cfg)
        out, metrics = trl_rollout(args, responses, logprobs, ref_logprobs, values, scores)
        out32, metrics32 = trl_rollout(
            args, responses, logprobs.float(), ref_logprobs.float(), values.float(), scores.float()
        )
        for k in ("rewards", "advantages", "returns"):
            assert torch.allclose(out[k], out32[k].double(), atol=1e-5, rtol=1e-5), (name, k)
        assert out["sequence_lengths"].tolist() == [n - 1 for n in LENGTHS]
        assert out["contain_eos"].tolist() == HAS_EOS
        if name == "defaults":
            processed_defaults = out
        cases.append(
            {
                "name": name,
                "config": cfg,
                "outputs": {
                    "scores": [float(x) for x in out["scores"]],
                    "response_mask": (~out["padding_mask"]).tolist(),
                    "value_mask": (~out["padding_mask_p1"]).tolist(),
                    **{
                        k: rows(out[k])
                        for k in (
                            "logprobs",
                            "ref_logprobs",
                            "values",
                            "kl",
                            "non_score_reward",
                            "rewards",
                            "advantages",
                            "returns",
                        )
                    },
                },
                "metrics": metrics,
            }
        )
    rollout = {
        "source": TRL_SOURCE + ", PPOTrainer.train L719-798 and L882-904 (copied verbatim)",
        "trl_installed": trl.__version__,
        "torch_version": torch.__version__,
        "dtype": "float64",
        "pad_token_id": PAD,
        "eos_token_id": EOS,
        "inputs": {
            "responses": responses.tolist(),
            "lengths": LENGTHS,
            "contains_eos": HAS_EOS,
            "logprobs": rows(logprobs),
            "ref_logprobs": rows(ref_logprobs),
            "values": rows(values),
            "scores": [float(x) for x in scores],
        },
        "cases": cases,
    }
    with open(os.path.join(a.out, "rollout.json"), "w") as f:
        json.dump(rollout, f, indent=1)
        f.write("\n")

    # ---- one mini-batch update, float32 as TRL trains --------------------------------------
    p = processed_defaults
    mb = {
        k: p[k].float() if p[k].dtype == torch.float64 else p[k]
        for k in ("logprobs", "values", "returns", "advantages", "padding_mask", "padding_mask_p1")
    }
    args = SimpleNamespace(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    # The current policy's per-token log-probs and value predictions after some updates: far
    # enough from the rollout's that some ratios and values are clipped. The raw tensors hold
    # arbitrary numbers at padded positions (as a forward pass over padding does).
    raw_lp = (logprobs + 0.45 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    raw_v = (values + 0.35 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    new_lp = raw_lp.clone().requires_grad_(True)
    vpred = raw_v.clone().requires_grad_(True)
    loss, stats = trl_minibatch_loss(args, new_lp, vpred, mb)
    loss.backward()
    assert 0 < stats["pg_clipfrac"] < 1 and 0 < stats["vf_clipfrac"] < 1, stats
    # At the start of a rollout's first epoch the policy equals the rollout's (ratio 1, vpred
    # = values): every pair of clipped / unclipped terms ties, and torch.max splits the
    # gradient between them.
    lp0 = torch.masked_fill(mb["logprobs"], mb["padding_mask"], -7.0).clone().requires_grad_(True)
    v0 = mb["values"].clone().requires_grad_(True)
    loss0, stats0 = trl_minibatch_loss(args, lp0, v0, mb)
    loss0.backward()

    # Entropy and log-probs of temperature-scaled logits (L821-823, L855-856).
    V = 11
    temperature = 0.7
    logits_raw = (2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).float()
    tokens = torch.randint(0, V, (B, T), generator=g)
    logits = logits_raw.clone()
    logits /= temperature + 1e-7
    token_logps = selective_log_softmax(logits, tokens)
    prob_dist = torch.nn.functional.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)
    # The same lines in float64 on the same (float32) logits: f32 cancellation in
    # logsumexp - sum(p * l) costs TRL's own figure about 1e-6.
    logits64 = logits_raw.double() / (temperature + 1e-7)
    prob64 = torch.nn.functional.softmax(logits64, dim=-1)
    entropy64 = torch.logsumexp(logits64, dim=-1) - torch.sum(prob64 * logits64, dim=-1)

    loss_fixture = {
        "source": TRL_SOURCE + ", PPOTrainer.train L821-857 (copied verbatim); policykl from "
        "TRL 0.11.4 trl/trainer/ppo_trainer.py L1256; selective_log_softmax from trl "
        + trl.__version__,
        "dtype": "float32",
        "config": {"cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1},
        "minibatch": {
            "old_logprobs": rows(mb["logprobs"]),
            "old_values": rows(mb["values"]),
            "returns": rows(mb["returns"]),
            "advantages": rows(mb["advantages"]),
            "response_mask": (~mb["padding_mask"]).tolist(),
            "value_mask": (~mb["padding_mask_p1"]).tolist(),
        },
        "cases": [
            {
                "name": "after_updates",
                "new_logprobs": rows(raw_lp),
                "vpred": rows(raw_v),
                "stats": stats,
                "grad_new_logprobs": rows(new_lp.grad),
                "grad_vpred": rows(vpred.grad),
            },
            {
                "name": "first_epoch_ties",
                "new_logprobs": rows(lp0.detach()),
                "vpred": rows(v0.detach()),
                "stats": stats0,
                "grad_new_logprobs": rows(lp0.grad),
                "grad_vpred": rows(v0.grad),
            },
        ],
        "logits": {
            "temperature": temperature,
            "vocab": V,
            "logits": [rows(x) for x in logits_raw],
            "tokens": tokens.tolist(),
            "token_logps": rows(token_logps),
            "entropy": rows(entropy),
            "entropy_f64": rows(entropy64),
        },
    }
    with open(os.path.join(a.out, "loss.json"), "w") as f:
        json.dump(loss_fixture, f, indent=1)
        f.write("\n")
    for c in loss_fixture["cases"]:
        print(c["name"], {k: round(v, 6) for k, v in c["stats"].items()})
    for c in cases:
        print(c["name"], {k: round(v, 6) for k, v in c["metrics"].items()})


if __name__ == "__main__":
    main()
