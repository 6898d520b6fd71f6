#!/usr/bin/env python3
"""Checks osp's reward models against transformers, PEFT and TRL (run by hand).

    cargo run --example reward_export -- OUT
    /work/pyenv/bin/python scripts/check_reward_model.py OUT

OUT (written by examples/reward_export.rs) holds a Hugging Face base model, a LoRA reward model
trained by osp (`run/reward_model`, PEFT layout with the head under modules_to_save), its merged
export (`run/reward_model_merged`, LlamaForSequenceClassification) and `rewards.json`: token ids
of a few (prompt, response) texts and osp's rewards for them. This script computes the same
rewards four ways and fails when any differs from osp's by more than 1e-4:

  merged        AutoModelForSequenceClassification.from_pretrained(merged), one text at a time
  merged/batch  the same, all texts in one right-padded batch (pooling by pad_token_id)
  peft          PeftModel.from_pretrained(AutoModelForSequenceClassification(base), adapter)
  trl           trl.experimental.utils.get_reward (what TRL's PPO scores responses with) on
                the merged model, prompt as the context
"""
import argparse
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402
from trl.experimental.utils import get_reward  # noqa: E402

TOL = 1e-4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    a = ap.parse_args()
    data = json.load(open(os.path.join(a.out, "rewards.json")))
    pad = data["pad_token_id"]
    items = data["items"]
    merged_dir = os.path.join(a.out, "run", "reward_model_merged")
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == pad
    base = AutoModelForSequenceClassification.from_pretrained(
        os.path.join(a.out, "base"), num_labels=1, pad_token_id=pad, dtype=torch.float32
    )
    peft = PeftModel.from_pretrained(base, os.path.join(a.out, "run", "reward_model")).eval()

    worst = {}
    rows = []
    with torch.no_grad():
        one = lambda m, ids: m(input_ids=torch.tensor([ids])).logits[0, 0].item()  # noqa: E731
        width = max(len(i["ids"]) for i in items)
        batch = torch.tensor([i["ids"] + [pad] * (width - len(i["ids"])) for i in items])
        mask = (batch != pad).long()
        batched = merged(input_ids=batch, attention_mask=mask).logits[:, 0].tolist()
        for k, it in enumerate(items):
            ids, ctx = it["ids"], it["prompt_len"]
            _, trl_score, _ = get_reward(merged, torch.tensor([ids]), pad, ctx)
            got = {
                "merged": one(merged, ids),
                "merged/batch": batched[k],
                "peft": one(peft, ids),
                "trl": trl_score.item(),
            }
            for name, v in got.items():
                for ref in ("osp_lora", "osp_merged"):
                    d = abs(v - it[ref])
                    worst[(name, ref)] = max(worst.get((name, ref), 0.0), d)
            rows.append((it["prompt"], it["response"], it["osp_lora"], got))
    for prompt, resp, osp_r, got in rows:
        print(f"{prompt!r:>24} {resp!r:<28} osp {osp_r:+.6f}  " + "  ".join(f"{k} {v:+.6f}" for k, v in got.items()))
    osp_batched = data["osp_lora_batched"]
    d_batch = max(abs(x - i["osp_lora"]) for x, i in zip(osp_batched, items))
    print(f"osp batched vs one at a time: max |diff| {d_batch:.2e}")
    ok = d_batch <= TOL
    for (name, ref), d in sorted(worst.items()):
        print(f"max |{name} - {ref}| = {d:.2e}")
        ok &= d <= TOL
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
