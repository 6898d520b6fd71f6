#!/usr/bin/env python3
"""Checks the real-model outputs with the Hugging Face stack (README, "A real model"):
transformers loads `osp export --merge`'s folder (GGUF base + augmented judge adapter), PEFT
loads osp's adapter on top of the GGUF base, and both give osp's greedy continuation.

    /work/pyenv/bin/python scripts/check_real_export.py runs/real/aug-seed2 \
        runs/real/judge-seed2/adapter "$(osp generate --model GGUF --adapter ADAPTER --chat \
        --prompt "What is the capital of France?" --temperature 0 --max-new-tokens 16)"

The last argument is osp's greedy answer (its text; special tokens are not printed).
"""
import os
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "..", "shared", "data", "models", "smollm2-135m-instruct")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "What is the capital of France?"


def greedy(model, tok):
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main():
    merged, adapter, want = sys.argv[1], sys.argv[2], sys.argv[3].strip()
    tok = AutoTokenizer.from_pretrained(merged)
    m = AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32)
    a = greedy(m, tok)
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=GGUF, torch_dtype=torch.float32)
    p = PeftModel.from_pretrained(base, adapter)
    b = greedy(p, tok)
    print("osp        ", repr(want))
    print("merged     ", repr(a))
    print("gguf + peft", repr(b))
    ok = a == want and b == want
    print("equal" if ok else "DIFFERENT")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
