#!/usr/bin/env python3
"""Fixed-seed splits of ../shared/data for the real-model runs (README, "A real model").

Standard library only. Writes into OUT (default runs/real/data):
  hh_judge_eval.jsonl      150 HH helpful-base pairs: the judge's held-out test (never trained on)
  hh_harmless_eval.jsonl   100 HH harmless-base pairs: the same, out of domain for the seed
  hh_seed2.jsonl           2% of helpful-base (47 pairs): the seed of human preferences
  hh_seed10.jsonl          10% (235 pairs; contains the 2% seed)
  hh_prompts.jsonl         prompts for online training, from pairs in none of the above
  hh_prompts_eval.jsonl    held-out prompts for win rates (never trained on)
  tldr_judge_eval.jsonl    150 TL;DR comparisons (with confidence) for the base judge
  tldr_prompts.jsonl       200 TL;DR posts as prompts (self-improvement run)
  tldr_prompts_eval.jsonl  32 further posts, held out

Records keep the data's own layouts (HH transcripts, TL;DR comparisons; prompts as TRL
{"prompt": text} in the layout osp's loaders give them), so `--format hh`/`tldr` read them.
Only pairs whose transcripts are at most MAX_CHARS characters are used, to keep a judge
prompt (task prompt and two responses) near 600 tokens on a 2-core machine; the accuracies
are therefore on the shorter part of each split.
"""
import gzip
import json
import random
import sys
from pathlib import Path

MAX_CHARS = 1200
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def hh_pairs(name):
    with gzip.open(DATA / "hh-rlhf" / name, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    total = len(rows)
    keep = [
        r
        for r in rows
        if len(r["chosen"]) <= MAX_CHARS
        and len(r["rejected"]) <= MAX_CHARS
        and r["chosen"] != r["rejected"]
    ]
    return total, keep


def hh_prompt(pair):
    t = pair["chosen"]
    cut = t.rfind("\n\nAssistant:")
    return t[: cut + len("\n\nAssistant:")]


def tldr_query(info):
    return (
        f"SUBREDDIT: r/{info['subreddit']}\n\nTITLE: {info['title']}\n\n"
        f"POST: {info['post']}\n\nTL;DR:"
    )


def write(out, name, rows):
    with open(out / name, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{name}: {len(rows)}")


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/real/data")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)

    total, helpful = hh_pairs("helpful-base_test.jsonl.gz")
    print(f"helpful-base: {len(helpful)} of {total} pairs within {MAX_CHARS} characters")
    rng.shuffle(helpful)
    n2, n10 = round(0.02 * total), round(0.10 * total)
    judge_eval, pool = helpful[:150], helpful[150:]
    write(out, "hh_judge_eval.jsonl", judge_eval)
    write(out, "hh_seed2.jsonl", pool[:n2])
    write(out, "hh_seed10.jsonl", pool[:n10])
    seen, prompts = set(), []
    for p in pool[n10:]:
        q = hh_prompt(p)
        if q not in seen:
            seen.add(q)
            prompts.append({"prompt": q})
    write(out, "hh_prompts.jsonl", prompts[:256])
    write(out, "hh_prompts_eval.jsonl", prompts[256:288])

    total, harmless = hh_pairs("harmless-base_test.jsonl.gz")
    rng.shuffle(harmless)
    write(out, "hh_harmless_eval.jsonl", harmless[:100])

    with open(DATA / "tldr" / "comparisons_batch13.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if len(r["info"]["post"]) <= MAX_CHARS]
    rng.shuffle(rows)
    write(out, "tldr_judge_eval.jsonl", rows[:150])
    posts, seen = [], set()
    for r in rows[150:]:
        q = tldr_query(r["info"])
        if q not in seen:
            seen.add(q)
            posts.append({"prompt": q})
    write(out, "tldr_prompts.jsonl", posts[:200])
    write(out, "tldr_prompts_eval.jsonl", posts[200:232])


if __name__ == "__main__":
    main()
