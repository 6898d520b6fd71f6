#!/usr/bin/env python3
"""Check a LoRA adapter (e.g. one written by osp) against transformers + PEFT.

Usage (from the repository root):

    /work/pyenv/bin/python scripts/check_peft_roundtrip.py ADAPTER_DIR BASE_DIR \\
        [--merged MERGED_DIR] [--expect-logits FILE] [--tol 1e-4] [--logits-key logits]

Steps:
  1. Load BASE_DIR with AutoModelForCausalLM (float32, eager attention, CPU) and apply
     ADAPTER_DIR with PeftModel.from_pretrained.
  2. Strict key check: every tensor in ADAPTER_DIR/adapter_model.safetensors (or .bin)
     must map onto a LoRA parameter of the model and every LoRA parameter of the model
     must come from the file with the same value (PEFT itself only warns about
     missing/unexpected adapter keys, and a missing lora_B silently stays zero).
  3. Compute logits: for the `input_ids` in --expect-logits (a safetensors file with
     `input_ids` [B, T] and `logits` [B, T, V]), else for fixed random ids (seed 0,
     [2, 9]). With --expect-logits, assert max |peft - expected| < tol.
  4. With --merged, load MERGED_DIR as a plain AutoModelForCausalLM and assert its
     logits equal the PEFT model's (< tol); it must not contain LoRA tensors.
  5. Report how much the adapter moves the logits vs. the base model (info; a warning,
     not a failure, when the adapter is a no-op).

Prints one line per check and a final `PASS` or `FAIL: ...` line; exits 0 on PASS,
1 on FAIL, 2 on usage/loading errors.
"""
import argparse
import json
import os
import sys
import traceback

import torch

torch.set_num_threads(2)

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def load_causal_lm(path):
    m = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    return m.eval()


def fmt(x):
    return f"{x:.3e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("adapter_dir")
    ap.add_argument("base_dir")
    ap.add_argument("--merged", help="a merged checkpoint folder (plain HF model) to compare")
    ap.add_argument("--expect-logits", help="safetensors file with input_ids and logits")
    ap.add_argument("--logits-key", default="logits", help="tensor name of the expected logits")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    failures = []

    def check(name, ok, detail):
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}")
        if not ok:
            failures.append(name)

    try:
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict, load_peft_weights

        with open(os.path.join(args.adapter_dir, "adapter_config.json")) as f:
            acfg = json.load(f)
        print(
            "adapter_config: "
            + ", ".join(
                f"{k}={acfg.get(k)!r}"
                for k in ("peft_type", "r", "lora_alpha", "use_rslora", "target_modules",
                          "bias", "use_dora", "fan_in_fan_out", "modules_to_save")
            )
        )
        base = load_causal_lm(args.base_dir)
        model = PeftModel.from_pretrained(base, args.adapter_dir).eval()
        file_sd = load_peft_weights(args.adapter_dir, device="cpu")
    except Exception as e:  # loading problems are usage errors, not numeric failures
        traceback.print_exc()
        print(f"FAIL: could not load adapter/base: {type(e).__name__}: {e}")
        return 2

    # --- 2. strict key/value check ---------------------------------------------------
    model_sd = get_peft_model_state_dict(model)  # names as PEFT's save_pretrained writes them
    fkeys, mkeys = set(file_sd), set(model_sd)
    unexpected = sorted(fkeys - mkeys)
    missing = sorted(mkeys - fkeys)
    # Names that carry the adapter name (`...lora_A.default.weight`) are not what
    # save_pretrained writes; some PEFT versions tolerate them, other loaders do not.
    canon = {k: k.replace(".default.", ".") for k in unexpected}
    with_name = [k for k, c in canon.items() if c in mkeys]
    detail = f"{len(fkeys)} in file, {len(mkeys)} expected by PEFT"
    if with_name:
        detail += (f"; {len(with_name)} non-canonical names containing the adapter name, "
                   f"e.g. {with_name[:2]} (save_pretrained writes e.g. {canon[with_name[0]]!r})")
    other = [k for k in unexpected if k not in with_name]
    if other:
        detail += f"; unexpected e.g. {other[:4]}"
    missing_strict = [k for k in missing if k not in set(canon.values())]
    if missing_strict:
        detail += f"; missing (left at PEFT init: lora_A random, lora_B zero) e.g. {missing_strict[:4]}"
    check("adapter keys", not unexpected and not missing and len(fkeys) > 0, detail)
    worst, bad_shape, compared = 0.0, [], 0
    for fk in sorted(fkeys):
        k = fk if fk in mkeys else canon.get(fk)
        if k not in mkeys:
            continue
        a, b = file_sd[fk].float(), model_sd[k].float()
        if a.shape != b.shape:
            bad_shape.append(f"{k} {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        worst = max(worst, (a - b).abs().max().item())
        compared += 1
    check("adapter values loaded", not bad_shape and worst == 0.0 and compared > 0,
          f"{compared} tensors compared, max |file - loaded| = {fmt(worst)}"
          + (f"; shape mismatch {bad_shape[:3]}" if bad_shape else ""))
    dtypes = sorted({str(v.dtype) for v in file_sd.values()})
    print(f"adapter tensor dtypes in file: {dtypes}")

    # --- 3. logits --------------------------------------------------------------------
    expected = None
    if args.expect_logits:
        ex = load_file(args.expect_logits)
        if "input_ids" not in ex or args.logits_key not in ex:
            print(f"FAIL: {args.expect_logits} needs `input_ids` and `{args.logits_key}`; "
                  f"has {sorted(ex)}")
            return 2
        input_ids = ex["input_ids"].to(torch.int64)
        expected = ex[args.logits_key].float()
    else:
        g = torch.Generator().manual_seed(0)
        input_ids = torch.randint(1, model.config.vocab_size, (2, 9), generator=g, dtype=torch.int64)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    print(f"input_ids: shape {tuple(input_ids.shape)}")

    with torch.no_grad():
        logits = model(input_ids).logits.float()
        with model.disable_adapter():
            base_logits = model(input_ids).logits.float()

    if expected is not None:
        if expected.shape != logits.shape:
            check("expected logits", False, f"shape {tuple(expected.shape)} != {tuple(logits.shape)}")
        else:
            d = (logits - expected).abs().max().item()
            check("expected logits", d < args.tol, f"max |peft - expected| = {fmt(d)} (tol {args.tol:g})")

    moved = (logits - base_logits).abs()
    print(f"adapter effect: max |peft - base| = {fmt(moved.max().item())}, "
          f"mean = {fmt(moved.mean().item())}")
    if moved.max().item() == 0.0:
        print("WARNING: the adapter does not change the logits (all lora_B zero?)")

    # --- 4. merged checkpoint --------------------------------------------------------
    if args.merged:
        try:
            merged = load_causal_lm(args.merged)
        except Exception as e:
            traceback.print_exc()
            print(f"FAIL: could not load merged model: {type(e).__name__}: {e}")
            return 2
        lora_names = [n for n, _ in merged.named_parameters() if "lora_" in n]
        check("merged has no LoRA tensors", not lora_names, f"{len(lora_names)} lora params")
        with torch.no_grad():
            mlog = merged(input_ids).logits.float()
        if mlog.shape != logits.shape:
            check("merged logits", False, f"shape {tuple(mlog.shape)} != {tuple(logits.shape)}")
        else:
            d = (mlog - logits).abs().max().item()
            check("merged logits", d < args.tol, f"max |merged - peft| = {fmt(d)} (tol {args.tol:g})")

    if failures:
        print(f"FAIL: {', '.join(failures)}")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
