#!/usr/bin/env python3
"""One OSP iteration written in PyTorch + transformers + PEFT: the comparison a user makes
with TRL. The PyTorch side of `cargo bench --bench osp_iteration`.

It mirrors `OnlineRun::iteration` in src/train/online.rs with osp's defaults:
  1. sample K responses per prompt with the LoRA policy (HF generate with its KV cache,
     do_sample, temperature 1, top-k off, top-p 1, exactly N new tokens: no EOS stop);
  2. ranked pairing (OSP.md §2): baseline = the first sample; the K-1 others are judged against
     it in both orders (batched, left-padded, the two answer tokens' logits at the last
     position only via logits_to_keep=1), sorted by strength, best paired with worst; each of
     the K//2 pairs gets a fresh both-order judgement (a second batched stage);
  3. log pi(y|x) of every pair's chosen and rejected responses under the policy (with grad) and
     pi_ref (adapters disabled, no grad), SPCE loss, backward, AdamW step on the adapters.
The judge is the current policy (osp's default, judge.model = "self").

Prints one JSON line: median seconds per iteration and the per-phase medians.

    /work/pyenv/bin/python scripts/bench_osp_torch.py --model-dir DIR --prompts FILE
"""
import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings

TEMPLATE = ("Which response to the prompt is better?\n\nPrompt: {prompt}\n\nResponse A: {a}\n\n"
            "Response B: {b}\n\nThe better response is Response")


def parse_args():
    ap = argparse.ArgumentParser(description="one OSP iteration in PyTorch")
    ap.add_argument("--model-dir", required=True, help="HF folder: config.json, model.safetensors")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json")
    ap.add_argument("--prompts", required=True, help="JSONL with {\"prompt\": ...}")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--judge-batch", type=int, default=16)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main():
    a = parse_args()
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        result = run(a)
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()


def run(a):
    warnings.simplefilter("ignore")
    import torch
    import torch.nn.functional as F
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(a.threads)
    except RuntimeError:
        pass
    transformers.logging.set_verbosity_error()
    torch.manual_seed(a.seed)

    tok = PreTrainedTokenizerFast(tokenizer_file=a.tokenizer)
    pad = tok.eos_token_id if tok.eos_token_id is not None else 0
    base = LlamaForCausalLM.from_pretrained(a.model_dir, torch_dtype=torch.float32,
                                            attn_implementation="sdpa")
    lcfg = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, lcfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr,
                            weight_decay=0.01)
    ans_a = tok.encode(" A", add_special_tokens=False)
    ans_b = tok.encode(" B", add_special_tokens=False)
    assert len(ans_a) == 1 and len(ans_b) == 1, "answer tokens must be single tokens"
    ans_a, ans_b = ans_a[0], ans_b[0]

    prompts = []
    with open(a.prompts) as f:
        for line in f:
            if line.strip():
                prompts.append(json.loads(line)["prompt"])
    prompts = prompts[: a.n_prompts]
    prompt_ids = [tok.encode(p, add_special_tokens=False) for p in prompts]

    def left_pad(seqs):
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, n - len(s):] = torch.tensor(s)
            mask[i, n - len(s):] = 1
        return ids, mask

    def p_ab(texts):
        out = []
        for i in range(0, len(texts), a.judge_batch):
            chunk = [tok.encode(t, add_special_tokens=False) for t in texts[i:i + a.judge_batch]]
            ids, mask = left_pad(chunk)
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
            d = logits[:, ans_a] - logits[:, ans_b]
            out.extend(torch.sigmoid(d).tolist())
        return out

    def judge(items):
        """items: (prompt, y1, y2) -> both-order strengths s(y1 > y2)."""
        texts = [TEMPLATE.format(prompt=x, a=y1, b=y2) for x, y1, y2 in items]
        texts += [TEMPLATE.format(prompt=x, a=y2, b=y1) for x, y1, y2 in items]
        p = p_ab(texts)
        n = len(items)
        return [0.5 * (p[i] + 1.0 - p[n + i]) for i in range(n)]

    def seq_logps(m, pairs_tokens):
        """Summed response log-probs of prompt+response sequences, right-padded batch."""
        seqs = [p + r for p, r in pairs_tokens]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), n), dtype=torch.long)
        lmask = torch.zeros((len(seqs), n), dtype=torch.float32)
        for i, (p, r) in enumerate(pairs_tokens):
            s = p + r
            ids[i, :len(s)] = torch.tensor(s)
            att[i, :len(s)] = 1
            lmask[i, len(p):len(s)] = 1.0
        logits = m(input_ids=ids, attention_mask=att).logits[:, :-1]
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (logp * lmask[:, 1:]).sum(-1)

    k, n_new = a.k, a.new_tokens
    g = torch.Generator().manual_seed(a.seed + 1)

    def iteration():
        phases = {}
        t0 = time.perf_counter()
        # 1. sample K per prompt (left-padded prompts, one generate call).
        model.eval()
        with torch.no_grad():
            ids, mask = left_pad(prompt_ids)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n_new,
                                 min_new_tokens=n_new, num_return_sequences=k, use_cache=True,
                                 pad_token_id=pad)
        gen = out[:, ids.shape[1]:].tolist()
        texts = [tok.decode(s, skip_special_tokens=True) for s in gen]
        t1 = time.perf_counter()
        phases["sampling"] = t1 - t0
        # 2. ranked pairing with a both-order self-judge, two batched stages.
        with torch.no_grad():
            stage1 = []
            for pi, x in enumerate(prompts):
                base = texts[pi * k]
                stage1 += [(x, texts[pi * k + j], base) for j in range(1, k)]
            c = judge(stage1)
            pairs = []  # (prompt index, chosen sample, rejected sample)
            for pi in range(len(prompts)):
                cs = c[pi * (k - 1):(pi + 1) * (k - 1)]
                order = sorted(range(1, k), key=lambda j: -cs[j - 1])
                for i in range(k // 2):
                    pairs.append((pi, pi * k + order[i], pi * k + order[-1 - i]))
            s = judge([(prompts[pi], texts[ci], texts[ri]) for pi, ci, ri in pairs])
        t2 = time.perf_counter()
        phases["judging"] = t2 - t1
        # 3. log-probs, SPCE, one AdamW step.
        model.train()
        chosen = [(prompt_ids[pi], gen[ci]) for pi, ci, _ in pairs]
        rejected = [(prompt_ids[pi], gen[ri]) for pi, _, ri in pairs]
        with torch.no_grad(), model.disable_adapter():
            ref = seq_logps(model, chosen + rejected)
        pol = seq_logps(model, chosen + rejected)
        n = len(pairs)
        h = a.beta * ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:]))
        st = torch.tensor(s, dtype=torch.float32)
        loss = -(st * F.logsigmoid(h) + (1 - st) * F.logsigmoid(-h)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        phases["training"] = t3 - t2
        phases["total"] = t3 - t0
        return phases, loss.item()

    for _ in range(a.warmup):
        iteration()
    runs = []
    for i in range(a.repeats):
        ph, loss = iteration()
        runs.append(ph)
        print(f"torch OSP iteration {i}: " + " ".join(f"{k}={v:.2f}s" for k, v in ph.items())
              + f" loss={loss:.4f}", file=sys.stderr)
    med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    return {
        "median_s": med["total"],
        "phases_median_s": med,
        "runs": runs,
        "prompts": len(prompts),
        "k": k,
        "new_tokens": n_new,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": a.threads,
    }


if __name__ == "__main__":
    main()
