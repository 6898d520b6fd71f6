#!/usr/bin/env python3
"""PyTorch side of the candle-vs-torch benchmark (CPU, float32, random init).

Builds a LlamaForCausalLM with the same shape as the Rust/candle model and times either a
full training step or sampling, then prints exactly one JSON line to stdout (everything
else, warnings included, goes to stderr).

    /work/pyenv/bin/python scripts/bench_torch.py --what train  --dim 256 --layers 4
    /work/pyenv/bin/python scripts/bench_torch.py --what sample --dim 512 --layers 8

Model: vocab 512, heads = dim // 64, kv heads = heads, SwiGLU hidden = llama2.c rule
(int(2 * 4 * dim / 3) rounded up to a multiple of 32; 704 for d=256, 1376 for d=512),
untied lm_head, rope_theta 1e4, rms_norm_eps 1e-5, attn_implementation "sdpa".

  train : forward on random ids [batch, seq], causal-LM cross-entropy (labels = ids, shifted
          inside HF: mean over batch * (seq - 1) targets), backward, AdamW step
          (lr 1e-4, weight_decay 0.01), zero_grad. Reports median seconds per step.
  lora  : as train with PEFT LoRA (r = --lora-r, alpha 2r, dropout 0) on all seven projections
          and the base frozen (requires_grad=False); AdamW over the adapters only. Also reports
          peak_rss_mb (ru_maxrss of this process, which includes torch itself).
  sample: model.generate(ids [batch, prompt_len], do_sample=True, temperature=1.0, top_k=0,
          top_p=1.0, max_new_tokens=N, min_new_tokens=N, use_cache=True, pad_token_id=0)
          under torch.inference_mode(). Reports median seconds per call and
          tokens_per_s = batch * N / median seconds.

  judge : the batched both-order judge on pre-tokenized judge prompts (--ids), batches of
          --batch, left-padded, head at the last position only; wall seconds and peak RSS.

Each measured run is preceded by `--warmup` untimed runs; `--repeats` runs are timed.
"""
import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings


def llama2c_hidden(dim, multiple_of=32):
    h = int(2 * (4 * dim) / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def parse_args():
    ap = argparse.ArgumentParser(description="PyTorch Llama benchmark (train step / sampling)")
    ap.add_argument("--what", choices=["train", "lora", "sample", "judge"], required=True)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=None, help="default: dim // 64")
    ap.add_argument("--kv-heads", type=int, default=None, help="default: heads")
    ap.add_argument("--hidden", type=int, default=None,
                    help="SwiGLU hidden size; default: llama2.c rule (int(8*dim/3) rounded up to 32)")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tied", type=int, default=0, help="1: tie the LM head to the embedding")
    ap.add_argument("--num-return-sequences", type=int, default=1,
                    help="sample: K samples per prompt (generate's num_return_sequences)")
    ap.add_argument("--ids", default=None,
                    help='judge: JSON {"ids": [[...], ...], "answers": [a, b]} of judge prompts')
    a = ap.parse_args()
    if a.heads is None:
        a.heads = max(1, a.dim // 64)
    if a.kv_heads is None:
        a.kv_heads = a.heads
    if a.hidden is None:
        a.hidden = llama2c_hidden(a.dim)
    if a.dim % a.heads != 0:
        ap.error(f"--heads {a.heads} does not divide --dim {a.dim}")
    if a.heads % a.kv_heads != 0:
        ap.error(f"--kv-heads {a.kv_heads} does not divide --heads {a.heads}")
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    return a


def main():
    a = parse_args()
    # Keep stdout for the single JSON line: anything printed by libraries goes to stderr.
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        result = run(a)
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()


def run(a):
    warnings.simplefilter("default")
    import torch

    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(a.threads)
    except RuntimeError:
        pass
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    torch.manual_seed(a.seed)

    max_pos = max(2048, a.seq, a.prompt_len + a.new_tokens)
    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.dim,
        intermediate_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=bool(a.tied),
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        **rope_kwargs(transformers.__version__, 10000.0),
    )
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    model.to(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: dim={a.dim} layers={a.layers} heads={a.heads} kv={a.kv_heads} hidden={a.hidden} "
          f"vocab={a.vocab} params={params} attn={model.config._attn_implementation}", file=sys.stderr)

    runs = []
    if a.what == "judge":
        return judge(a, model, torch, params, transformers)
    if a.what == "lora":
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(
            r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"]))
    if a.what in ("train", "lora"):
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
        g = torch.Generator().manual_seed(a.seed + 1)

        def step():
            ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
            t0 = time.perf_counter()
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            return dt, out.loss.item()

        for _ in range(a.warmup):
            step()
        losses = []
        for i in range(a.repeats):
            dt, loss = step()
            runs.append(dt)
            losses.append(loss)
            print(f"train step {i}: {dt:.4f}s loss={loss:.4f}", file=sys.stderr)
        med = statistics.median(runs)
        import resource

        extra = {"loss_first": losses[0], "loss_last": losses[-1],
                 "tokens_per_s": a.batch * a.seq / med,
                 "trainable": sum(p.numel() for p in trainable),
                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    else:
        model.eval()
        g = torch.Generator().manual_seed(a.seed + 1)
        n = a.new_tokens

        def sample():
            ids = torch.randint(1, a.vocab, (a.batch, a.prompt_len), generator=g)
            mask = torch.ones_like(ids)
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = model.generate(
                    ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                    max_new_tokens=n, min_new_tokens=n, use_cache=True, pad_token_id=0,
                    num_return_sequences=a.num_return_sequences,
                )
                dt = time.perf_counter() - t0
            rows = a.batch * a.num_return_sequences
            assert out.shape == (rows, a.prompt_len + n), tuple(out.shape)
            return dt

        for _ in range(a.warmup):
            sample()
        for i in range(a.repeats):
            dt = sample()
            runs.append(dt)
            rows = a.batch * a.num_return_sequences
            print(f"sample run {i}: {dt:.4f}s ({rows * n / dt:.1f} tok/s)", file=sys.stderr)
        med = statistics.median(runs)
        rows = a.batch * a.num_return_sequences
        extra = {"tokens_per_s": rows * n / med, "new_tokens": n, "prompt_len": a.prompt_len,
                 "num_return_sequences": a.num_return_sequences}

    result = {
        "what": a.what,
        "dim": a.dim,
        "layers": a.layers,
        "heads": a.heads,
        "kv_heads": a.kv_heads,
        "hidden": a.hidden,
        "vocab": a.vocab,
        "batch": a.batch,
        "seq": a.seq,
        "median_s": med,
        "runs_s": runs,
        "params": params,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": a.threads,
    }
    result.update(extra)
    return result


def judge(a, model, torch, params, transformers):
    """The batched both-order judge: judge prompts (token ids from --ids, in their order) in
    batches of --batch, left-padded, logits at the last position only (logits_to_keep=1),
    p_AB = sigmoid(l_A - l_B). One timed pass (the model's first use, as for `osp judge`);
    reports wall seconds and the process's peak RSS."""
    import resource

    with open(a.ids) as f:
        spec = json.load(f)
    prompts, (ans_a, ans_b) = spec["ids"], spec["answers"]
    model.eval()
    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), a.batch):
            chunk = prompts[i:i + a.batch]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
            out.extend(torch.sigmoid(logits[:, ans_a] - logits[:, ans_b]).tolist())
    dt = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    assert len(out) == len(prompts)
    return {"what": "judge", "median_s": dt, "runs_s": [dt], "peak_rss_mb": peak_mb,
            "prompts": len(prompts), "tokens": sum(len(p) for p in prompts), "params": params,
            "batch": a.batch, "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": a.threads}


def rope_kwargs(version, theta):
    if int(version.split(".")[0]) >= 5:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": float(theta)}}
    return {"rope_theta": float(theta)}


if __name__ == "__main__":
    main()
