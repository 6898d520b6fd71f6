#!/usr/bin/env python3
"""Generate tiny random Hugging Face checkpoints + expected logits for Rust parity tests.

Usage (from the repository root):

    /work/pyenv/bin/python scripts/make_fixtures.py [--out tests/fixtures]

Writes one folder per fixture under tests/fixtures/:

  llama_gqa/      LlamaForCausalLM, 4 heads / 2 kv heads, untied lm_head, rope_theta 1e4
  llama_sharded/  same config as llama_gqa (different seed), saved with a tiny
                  max_shard_size -> model.safetensors.index.json + several shards
  qwen2_tied/     Qwen2ForCausalLM, non-zero q/k/v biases, tied embeddings (no
                  lm_head.weight in the file), rope_theta 1e6, no sliding window
  mistral/        MistralForCausalLM, sliding_window null, 4 heads / 2 kv heads,
                  explicit head_dim (16) != hidden_size / heads (12)

Each folder holds config.json + model.safetensors (or shards), written by
`save_pretrained(..., safe_serialization=True)` in float32, and expected.safetensors:

  input_ids              int64 [2, 9]      random ids in [1, vocab)
  logits                 f32   [2, 9, V]   model(input_ids).logits (eval mode)
  padded_input_ids       int64 [2, 9]      row 0 left-padded with 3 pad ids (0), row 1 unpadded
  padded_attention_mask  int64 [2, 9]
  padded_logits          f32   [2, 9, V]   model(padded_input_ids, attention_mask=mask,
                                           position_ids=(mask.cumsum(-1)-1).clamp(min=0)).logits
                                           (the HF generate convention). Logits at padded
                                           positions are whatever HF computes there; compare
                                           only positions where the mask is 1.

Weights are random but deliberately non-trivial: after init every linear/embedding
weight is redrawn (embeddings ~ N(0,1), or 2/sqrt(hidden) when tied; projections
1.5/sqrt(fan_in)) so that logits are far from uniform (std ~1.5-2), every bias is
N(0, 0.1^2) (non-zero), and RMSNorm weights are 1 + 0.1*randn.

Everything is created from random init (no hub downloads), and generation is
deterministic (torch.manual_seed, eager attention, float32, CPU).

Compatibility note: transformers >= 5 stores rope settings as `rope_parameters`
({"rope_type": "default", "rope_theta": ...}) instead of a top-level `rope_theta`.
This script keeps config.json exactly as save_pretrained wrote it, so the fixtures test
the spelling current transformers writes; osp's parser reads both.
"""
import argparse
import json
import os
import shutil
import sys

import torch

torch.set_num_threads(2)

import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SEQ = 9
BATCH = 2
PAD_ID = 0
N_PAD = 3


def rope_kwargs(theta):
    """rope_theta spelled the way the installed transformers expects."""
    major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": float(theta)}}
    return {"rope_theta": float(theta)}


def common(vocab=112, hidden=48, inter=80, layers=2, heads=4, kv=2, theta=10000.0, eps=1e-5):
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=64,
        rms_norm_eps=eps,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD_ID,
        **rope_kwargs(theta),
    )


@torch.no_grad()
def randomize(model, seed):
    """Redraw all parameters so activations/logits are well away from trivial."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1 and "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1:  # biases
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name and model.config.tie_word_embeddings:
            # Also the lm_head: keep logits ~ N(0, 2^2) rather than N(0, hidden).
            p.copy_(2.0 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        elif "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            fan_in = p.shape[1]
            # ~1/sqrt(fan_in) keeps the residual stream O(1); 1.5x gives peaky logits.
            p.copy_(1.5 * torch.randn(p.shape, generator=g) / fan_in**0.5)


def make_inputs(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (BATCH, SEQ), generator=g, dtype=torch.int64)
    padded = torch.randint(1, vocab, (BATCH, SEQ), generator=g, dtype=torch.int64)
    mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    padded[0, :N_PAD] = PAD_ID
    mask[0, :N_PAD] = 0
    return input_ids, padded, mask


def fix_config_json(path, theta):
    with open(path) as f:
        cfg = json.load(f)
    # Kept as written; `theta` is only checked, so a silent change of spelling is caught.
    rope = cfg.get("rope_parameters") or {}
    assert float(cfg.get("rope_theta", rope.get("rope_theta"))) == float(theta), path
    return cfg


def build(name, cls, cfg_cls, cfg_kwargs, seed, theta, out_root, max_shard_size=None, check=None):
    torch.manual_seed(seed)
    cfg = cfg_cls(**cfg_kwargs)
    cfg._attn_implementation = "eager"
    model = cls(cfg)
    model.to(torch.float32)
    randomize(model, seed + 1000)
    if cfg.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.eval()

    out = os.path.join(out_root, name)
    if os.path.exists(out):
        shutil.rmtree(out)
    kw = {"safe_serialization": True}
    if max_shard_size is not None:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kw)
    # save_pretrained may also write generation_config.json; keep it (harmless, tiny).
    saved_cfg = fix_config_json(os.path.join(out, "config.json"), theta)

    input_ids, padded, mask = make_inputs(cfg.vocab_size, seed + 2000)
    with torch.no_grad():
        logits = model(input_ids).logits.float()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        padded_logits = model(padded, attention_mask=mask, position_ids=pos).logits.float()
    save_file(
        {
            "input_ids": input_ids.contiguous(),
            "logits": logits.contiguous(),
            "padded_input_ids": padded.contiguous(),
            "padded_attention_mask": mask.contiguous(),
            "padded_logits": padded_logits.contiguous(),
        },
        os.path.join(out, "expected.safetensors"),
    )

    # --- sanity checks on what was written ---
    files = sorted(os.listdir(out))
    tensors = {}
    for fn in files:
        if fn.endswith(".safetensors") and fn != "expected.safetensors":
            tensors.update(load_file(os.path.join(out, fn)))
    for k, v in tensors.items():
        assert v.dtype == torch.float32, (k, v.dtype)
    # The reloaded model must reproduce the logits (also validates sharded loading).
    reloaded = cls.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        err = (reloaded(input_ids).logits - logits).abs().max().item()
    assert err < 1e-5, (name, err)
    # Row 1 of the padded batch is unpadded: must match an unbatched run.
    with torch.no_grad():
        solo = model(padded[1:]).logits
        err1 = (solo - padded_logits[1:]).abs().max().item()
        # Row 0 (valid part) must equal running the unpadded suffix on its own.
        solo0 = model(padded[0:1, N_PAD:]).logits
        err0 = (solo0 - padded_logits[0:1, N_PAD:]).abs().max().item()
    assert err1 < 1e-4 and err0 < 1e-4, (name, err0, err1)
    probs = logits.softmax(-1)
    if check is not None:
        check(tensors, saved_cfg)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    print(
        f"{name:14s} params={sum(t.numel() for t in tensors.values()):7d} "
        f"files={files} bytes={size} "
        f"logit_std={logits.std().item():.3f} max_prob={probs.max().item():.3f} "
        f"mean_max_prob={probs.max(-1).values.mean().item():.3f} "
        f"pad_err0={err0:.2e} pad_err1={err1:.2e}",
        file=sys.stderr,
    )
    return size


def check_sharded(tensors, cfg):
    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("tests", "fixtures"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    total = 0

    llama_kwargs = common(vocab=112, hidden=48, inter=80, heads=4, kv=2, theta=10000.0)
    llama_kwargs.update(attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
    total += build("llama_gqa", LlamaForCausalLM, LlamaConfig, llama_kwargs, 1, 10000.0, args.out)

    def check_shards(tensors, cfg):
        d = os.path.join(args.out, "llama_sharded")
        names = os.listdir(d)
        shards = [n for n in names if n.startswith("model-") and n.endswith(".safetensors")]
        assert "model.safetensors.index.json" in names, names
        assert "model.safetensors" not in names, names
        assert len(shards) >= 2, shards
        with open(os.path.join(d, "model.safetensors.index.json")) as f:
            idx = json.load(f)
        assert set(idx["weight_map"]) == set(tensors), "index does not cover all tensors"

    total += build(
        "llama_sharded", LlamaForCausalLM, LlamaConfig, llama_kwargs, 2, 10000.0, args.out,
        max_shard_size="40KB", check=check_shards,
    )

    def check_tied(tensors, cfg):
        assert "lm_head.weight" not in tensors, "tied checkpoint must not store lm_head.weight"
        assert cfg.get("tie_word_embeddings") is True, cfg.get("tie_word_embeddings")
        for k in ("q_proj", "k_proj", "v_proj"):
            b = tensors[f"model.layers.0.self_attn.{k}.bias"]
            assert b.abs().min() > 0, k
        assert "model.layers.0.self_attn.o_proj.bias" not in tensors

    qwen_kwargs = common(vocab=128, hidden=64, inter=96, heads=4, kv=2, theta=1000000.0, eps=1e-6)
    qwen_kwargs.update(tie_word_embeddings=True, use_sliding_window=False, max_window_layers=2)
    total += build(
        "qwen2_tied", Qwen2ForCausalLM, Qwen2Config, qwen_kwargs, 3, 1000000.0, args.out,
        check=check_tied,
    )

    def check_mistral(tensors, cfg):
        assert cfg.get("sliding_window", "missing") is None, cfg.get("sliding_window")
        assert cfg.get("head_dim") == 16, cfg.get("head_dim")
        assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (64, 48)
        assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 48)

    mistral_kwargs = common(vocab=96, hidden=48, inter=64, heads=4, kv=2, theta=10000.0)
    mistral_kwargs.update(sliding_window=None, head_dim=16, tie_word_embeddings=False)
    total += build(
        "mistral", MistralForCausalLM, MistralConfig, mistral_kwargs, 4, 10000.0, args.out,
        check=check_mistral,
    )

    print(
        f"total {total} bytes; torch {torch.__version__}, transformers {transformers.__version__}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
