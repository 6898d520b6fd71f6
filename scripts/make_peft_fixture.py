#!/usr/bin/env python3
"""Generate tiny PEFT LoRA adapters for tests/fixtures/llama_gqa + expected logits.

Usage (from the repository root):

    /work/pyenv/bin/python scripts/make_peft_fixture.py [--out tests/fixtures/peft_llama]

Writes:

  peft_llama/adapter/          LoRA r=4, alpha=8 (scaling 2.0) on q,k,v,o,gate,up,down_proj
                               (adapter_config.json + adapter_model.safetensors)
  peft_llama/adapter_rslora/   LoRA r=8, alpha=16, use_rslora=True (scaling 16/sqrt(8)),
                               on q_proj, v_proj only
  peft_llama/expected.safetensors
      input_ids      int64 [2, 9]       random ids in [1, vocab)
      logits         f32   [2, 9, V]    PeftModel (adapter/) logits, eval mode
      base_logits    f32   [2, 9, V]    same model under `with model.disable_adapter():`
      rslora_logits  f32   [2, 9, V]    PeftModel (adapter_rslora/) logits, eval mode

The base model is tests/fixtures/llama_gqa (made by scripts/make_fixtures.py); it is
not copied. After get_peft_model (which initialises lora_B to zero) every lora_A and
lora_B is redrawn from a fixed seed so the adapter is not a no-op:
  lora_A ~ N(0,1)/sqrt(in_features),  lora_B ~ B_SCALE * N(0,1)/sqrt(r).
Deterministic: fixed seeds, float32, CPU, eager attention, 2 threads.

The script checks, before finishing, that reloading each adapter with
PeftModel.from_pretrained reproduces the logits exactly, that merge_and_unload() gives
the same logits (< 1e-4), and that the adapter moves the logits by a noticeable amount.
PEFT's auto-generated model card (README.md in each adapter folder) is deleted, and
`target_modules` in adapter_config.json is sorted (PEFT writes it in set order, which
varies between processes).
"""
import argparse
import json
import os
import shutil
import sys

import torch

torch.set_num_threads(2)

import peft  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

BASE = os.path.join("tests", "fixtures", "llama_gqa")
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ = 9
BATCH = 2
B_SCALE = {"adapter": 0.2, "adapter_rslora": 0.12}


def load_base(base_dir):
    m = AutoModelForCausalLM.from_pretrained(
        base_dir, attn_implementation="eager", dtype=torch.float32
    )
    return m.eval()


@torch.no_grad()
def randomize_lora(model, seed, b_scale):
    g = torch.Generator().manual_seed(seed)
    n = 0
    # named_parameters order is deterministic (module registration order).
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            n += 1
        elif ".lora_B." in name:
            p.copy_(b_scale * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            n += 1
    return n


def make_adapter(base_dir, out_dir, cfg, seed, b_scale, input_ids):
    torch.manual_seed(seed)
    base = load_base(base_dir)
    model = get_peft_model(base, cfg)
    n = randomize_lora(model, seed + 1000, b_scale)
    assert n > 0
    model.eval()
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    card = os.path.join(out_dir, "README.md")
    if os.path.exists(card):
        os.remove(card)
    # PEFT stores target_modules from a Python set, so its order depends on the string
    # hash seed of the process; sort it so re-running gives identical bytes.
    cpath = os.path.join(out_dir, "adapter_config.json")
    with open(cpath) as f:
        saved = json.load(f)
    if isinstance(saved.get("target_modules"), list):
        saved["target_modules"] = sorted(saved["target_modules"])
        with open(cpath, "w") as f:
            f.write(json.dumps(saved, indent=2, sort_keys=True))  # same format as PEFT
    with torch.no_grad():
        logits = model(input_ids).logits.float()
        with model.disable_adapter():
            base_logits = model(input_ids).logits.float()
        # Logits a loader would get with a wrong scaling: plain alpha/r (ignoring
        # use_rslora) and 1.0 (ignoring alpha entirely). Reported so tests know the
        # fixture can tell them apart.
        wrong = {}
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        orig = [m.scaling["default"] for m in layers]
        for label, val in (("alpha/r", cfg.lora_alpha / cfg.r), ("1.0", 1.0)):
            for m in layers:
                m.scaling["default"] = val
            wrong[label] = (model(input_ids).logits.float() - logits).abs().max().item()
        for m, o in zip(layers, orig):
            m.scaling["default"] = o
        assert torch.equal(model(input_ids).logits.float(), logits)
        print(f"{os.path.basename(out_dir)}: scaling={orig[0]:.4f}; max|logits diff| with "
              f"wrong scaling: " + ", ".join(f"{k}: {v:.3f}" for k, v in wrong.items()),
              file=sys.stderr)
        merged = model.merge_and_unload()
        merged_logits = merged(input_ids).logits.float()
    err_merge = (merged_logits - logits).abs().max().item()
    assert err_merge < 1e-4, ("merge_and_unload differs", err_merge)

    # Reload from disk the way a user would.
    re = PeftModel.from_pretrained(load_base(base_dir), out_dir).eval()
    with torch.no_grad():
        err_reload = (re(input_ids).logits - logits).abs().max().item()
    assert err_reload < 1e-6, ("reload differs", err_reload)
    return logits, base_logits, err_merge, err_reload


def describe(out_dir, label):
    lines = []
    with open(os.path.join(out_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    with safe_open(os.path.join(out_dir, "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        meta = f.metadata()
        shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in keys}
    print(f"--- {label}: {len(keys)} tensors, metadata={meta}", file=sys.stderr)
    for k in keys:
        print(f"  {k}  {shapes[k][0]}  {shapes[k][1]}", file=sys.stderr)
    print(f"  adapter_config.json keys: {sorted(cfg)}", file=sys.stderr)
    print(f"  adapter_config.json: {json.dumps(cfg, sort_keys=True)}", file=sys.stderr)
    return keys, shapes, cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("tests", "fixtures", "peft_llama"))
    ap.add_argument("--base", default=BASE)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    vocab = load_base(args.base).config.vocab_size
    g = torch.Generator().manual_seed(4242)
    input_ids = torch.randint(1, vocab, (BATCH, SEQ), generator=g, dtype=torch.int64)

    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(ALL_TARGETS),
        bias="none", task_type="CAUSAL_LM",
    )
    logits, base_logits, em, er = make_adapter(
        args.base, os.path.join(args.out, "adapter"), lora, 11, B_SCALE["adapter"], input_ids
    )
    rs = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
        bias="none", task_type="CAUSAL_LM", use_rslora=True,
    )
    rs_logits, rs_base, em2, er2 = make_adapter(
        args.base, os.path.join(args.out, "adapter_rslora"), rs, 12, B_SCALE["adapter_rslora"],
        input_ids,
    )
    assert torch.equal(base_logits, rs_base)

    # base_logits must equal the llama_gqa fixture's own model on these ids.
    with torch.no_grad():
        plain = load_base(args.base)(input_ids).logits.float()
    assert (plain - base_logits).abs().max().item() < 1e-6

    save_file(
        {
            "input_ids": input_ids.contiguous(),
            "logits": logits.contiguous(),
            "base_logits": base_logits.contiguous(),
            "rslora_logits": rs_logits.contiguous(),
        },
        os.path.join(args.out, "expected.safetensors"),
    )

    describe(os.path.join(args.out, "adapter"), "adapter")
    describe(os.path.join(args.out, "adapter_rslora"), "adapter_rslora")
    for label, lg, m, r in (("adapter", logits, em, er), ("adapter_rslora", rs_logits, em2, er2)):
        d = (lg - base_logits).abs()
        print(
            f"{label:15s} |logits-base| max={d.max().item():.3f} mean={d.mean().item():.3f}; "
            f"argmax changed at {(lg.argmax(-1) != base_logits.argmax(-1)).sum().item()}/"
            f"{BATCH * SEQ} positions; merge err={m:.2e} reload err={r:.2e}",
            file=sys.stderr,
        )
    total = 0
    for root, _, files in os.walk(args.out):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    print(
        f"total {total} bytes; peft {peft.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, safetensors {safetensors.__version__}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
