#!/usr/bin/env python3
"""Reference outputs of transformers' own GGUF loader for SmolLM2-135M-Instruct (Q4_1).

Usage (from the repository root):

    /work/pyenv/bin/python scripts/make_gguf_fixture.py [--out tests/fixtures/gguf]
    /work/pyenv/bin/python scripts/make_gguf_fixture.py --check-export DIR

The GGUF is read in place from ../shared/data/models/smollm2-135m-instruct/ (never copied).
transformers dequantizes it to float32 with `from_pretrained(folder, gguf_file=...)` (needs
the `gguf` package). Writes tests/fixtures/gguf/expected.json:

  logits     for each of a few short prompts: its ids (no BOS: this GGUF adds none), the
             logits of every position at ids [0, SLICE), and the top-TOPK ids and logits
             at the last position (all vocab rows would be 49152 floats per position)
  tokens     ids of >= 200 texts: HH-RLHF `chosen` transcripts (helpful-base then
             harmless-base test splits, the first N_HH rows of each) and TL;DR posts
             (comparisons_batch13.jsonl, the first N_TLDR rows), each cut to its first
             MAX_CHARS code points, plus texts with special tokens (rendered chat
             templates, a bare <|im_end|>); the texts themselves are not stored (the data
             stays in ../shared/data), only where they come from and their ids
             (add_special_tokens=False; the script checks that transformers adds no BOS
             to any of them, as the GGUF's add_bos_token = false says)
  greedy     three chat prompts rendered with the GGUF's chat template (generation prompt
             on), their ids, and the 16 greedy new tokens transformers' generate() picks

With --check-export DIR, loads the folder osp's `export --merge` wrote from the GGUF and
checks that transformers reads it (model and tokenizer) and gives the GGUF's logits.
"""
import argparse
import gzip
import json
import os
import sys

import torch

torch.set_num_threads(2)

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")
MODEL_DIR = os.path.join(DATA, "models", "smollm2-135m-instruct")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SLICE = 128
TOPK = 32
N_HH = 60  # per split
N_TLDR = 90
MAX_CHARS = 700
NEW_TOKENS = 16

LOGIT_PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in 1987, a robot named Zed",
]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Write a haiku about the sea.",
]
SPECIAL_TEXTS = [
    "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "<|im_end|>",
    "a<|endoftext|>b <|im_start|> c",
    "Numbers: 3.14159, 2024-06-01, 1,000,000 and x^2 + y_1",
    "Unicode: naïve café, 東京, emoji 🙂, tabs\tand\n\nnewlines   spaces",
]


def texts():
    out = []
    for split in ("helpful-base_test", "harmless-base_test"):
        with gzip.open(os.path.join(DATA, "hh-rlhf", f"{split}.jsonl.gz"), "rt") as f:
            for i, line in enumerate(f):
                if i >= N_HH:
                    break
                out.append(({"source": f"hh/{split}", "row": i}, json.loads(line)["chosen"]))
    with open(os.path.join(DATA, "tldr", "comparisons_batch13.jsonl")) as f:
        for i, line in enumerate(f):
            if i >= N_TLDR:
                break
            out.append(({"source": "tldr/batch13", "row": i}, json.loads(line)["info"]["post"]))
    return [(s, t[:MAX_CHARS]) for s, t in out]


def load():
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        MODEL_DIR, gguf_file=GGUF, torch_dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    return tok, model


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def check_export(folder):
    tok, model = load()
    tok2 = AutoTokenizer.from_pretrained(folder)
    model2 = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    model2.eval()
    worst = 0.0
    for p in LOGIT_PROMPTS:
        ids = tok(p, add_special_tokens=False).input_ids
        ids2 = tok2(p, add_special_tokens=False).input_ids
        assert ids == ids2, f"tokenizer of {folder} differs on {p!r}: {ids2} vs {ids}"
        worst = max(worst, (logits_of(model, ids) - logits_of(model2, ids)).abs().max().item())
    msgs = [{"role": "user", "content": CHAT_PROMPTS[0]}]
    a = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    b = tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert a == b, f"chat templates differ: {b!r} vs {a!r}"
    print(f"{folder}: transformers loads it; max |logit difference| vs the GGUF {worst:.2e}")
    assert worst < 1e-4, worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "gguf"))
    ap.add_argument("--check-export")
    args = ap.parse_args()
    if args.check_export:
        check_export(args.check_export)
        return
    tok, model = load()
    out = {
        "generator": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": GGUF,
        },
        "slice": SLICE,
        "topk": TOPK,
        "max_chars": MAX_CHARS,
    }
    rows = []
    for p in LOGIT_PROMPTS:
        ids = tok(p, add_special_tokens=False).input_ids
        lg = logits_of(model, ids)
        top = torch.topk(lg[-1], TOPK)
        rows.append({
            "text": p,
            "ids": ids,
            "slice_logits": lg[:, :SLICE].tolist(),
            "top_ids": top.indices.tolist(),
            "top_logits": top.values.tolist(),
        })
    out["logits"] = rows

    toks = []
    for src, t in texts():
        toks.append({**src, "ids": tok(t, add_special_tokens=False).input_ids})
    for t in SPECIAL_TEXTS:
        toks.append({"source": "inline", "text": t,
                     "ids": tok(t, add_special_tokens=False).input_ids})
    out["tokens"] = toks
    # This GGUF says add_bos_token = false: transformers adds nothing either (checked on
    # every text, so the fixture stores one list per text).
    for src, t in texts() + [(None, t) for t in SPECIAL_TEXTS]:
        assert tok(t).input_ids == tok(t, add_special_tokens=False).input_ids, t[:80]
    out["transformers_adds_bos"] = False

    greedy = []
    for p in CHAT_PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            g = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        new = g[0, len(ids):].tolist()
        greedy.append({"user": p, "rendered": text, "ids": ids, "new_ids": new,
                       "new_text": tok.decode(new)})
        print(repr(p), "->", repr(tok.decode(new)))
    out["greedy"] = greedy
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "expected.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print(f"wrote {path} ({os.path.getsize(path)} bytes, {len(toks)} tokenized texts)")


if __name__ == "__main__":
    main()
