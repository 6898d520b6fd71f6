#!/usr/bin/env bash
# Seeds fuzz/corpus/<target>/ with small samples of ../shared/data and tests/fixtures, each
# prefixed with the selector byte(s) its target reads. fuzz/corpus is git-ignored: samples
# of ../shared/data are never committed. Needs jq, gzip, xxd.
set -eu  # no pipefail: `zcat | head` ends zcat with SIGPIPE
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
data=${OSP_DATA:-$root/../shared/data}
fixtures=$root/tests/fixtures
corpus=$here/corpus
[ -d "$data" ] || { echo "no data folder at $data (set OSP_DATA)" >&2; exit 1; }
mkdir -p "$corpus"/{data_formats,config_toml,safetensors_header,llama2c,tokenizer_json}
# seed TARGET SELECTOR-HEX [FILE]: writes the selector bytes, then FILE (or stdin).
# Named by content hash, as libFuzzer names its inputs (seed runs in pipeline subshells).
seed() {
  local target=$1 sel=$2 src=${3:--} tmp
  tmp=$(mktemp "$corpus/$target/.seed.XXXXXX")
  { printf '%s' "$sel" | xxd -r -p; cat "$src"; } > "$tmp"
  mv "$tmp" "$corpus/$target/$(sha1sum < "$tmp" | cut -c1-40)"
}

# data_formats: selector low 3 bits = reader, 0x80 = abort on malformed, bits 3..6 = SFT max_len.
hh=$data/hh-rlhf/helpful-base_test.jsonl.gz
tldr=$data/tldr/comparisons_batch13.jsonl
panda=$data/pandalm/testset-v1.json
for abort in 00 80; do
  zcat "$hh" | head -n 2 | seed data_formats "$(printf '%02x' $((0x$abort | 3)))"
  zcat "$hh" | head -n 2 | gzip -c | seed data_formats "$(printf '%02x' $((0x$abort | 3)))"
  head -n 2 "$tldr" | seed data_formats "$(printf '%02x' $((0x$abort | 4)))"
  jq -c '.[:2]' "$panda" | seed data_formats "$(printf '%02x' $((0x$abort | 5)))"
  jq '.[:1]' "$panda" | seed data_formats "$(printf '%02x' $((0x$abort | 5)))"
done
head -n 3 "$data/tldr/comparisons_edit_b2_eval_test.jsonl" | seed data_formats 00
printf '%s\n' '{"prompt": "the cat", "chosen": " sat .", "rejected": " on", "strength": 0.8}' \
  '{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yo"}], "rejected": [{"role": "assistant", "content": "no"}]}' \
  | seed data_formats 02
printf '%s\n' '{"prompt": "the cat"}' '{"prompt": [{"role": "user", "content": "the mat"}]}' '' '{"prompt": 1}' \
  | seed data_formats 01
printf '%s\n' '{"prompt": "the cat", "completion": " sat on the mat ."}' '{"text": "the cat sat"}' \
  '{"messages": [{"role": "user", "content": "the"}, {"role": "assistant", "content": "cat"}]}' \
  | seed data_formats 1e
printf '[{"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": "d\\u00e9", "chosen": "e", "rejected": "f", "strength": null}]\n' \
  | seed data_formats 82

# config_toml: selector low 3 bits = command (sft, train, train --method dpo, judge-train,
# rm-train, demo budget), 0x80 = overrides only; the TOML, a line ---, then overrides.
cmd=0
for f in sft train train judge_train rm; do
  { cat "$root/configs/$f.toml"; printf '\n---\ntrain.steps=3\nlora.r=2\n'; } | seed config_toml "0$cmd"
  cmd=$((cmd + 1))
done
printf '\n---\npa_steps=2\neval_every=1\nk=2\n' | seed config_toml 05
printf '\n---\nmodel.path="m"\ndata.train="t.jsonl"\ntrain.out=o\noptim.lr=1e-3\n' | seed config_toml 80

# safetensors_header: selector = file (0 model.safetensors, 1 adapter, 2 config.json, 3 adapter_config.json).
tiny_st() { # one f32 tensor "w" of shape [2] (8 bytes of data)
  local hdr='{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"format":"pt"}}'
  printf '%016x' ${#hdr} | fold -w2 | tac | tr -d '\n' | xxd -r -p
  printf '%s' "$hdr"; printf '\x00\x00\x80\x3f\x00\x00\x00\x40'
}
tiny_st | seed safetensors_header 00
tiny_st | seed safetensors_header 01
head -c 3000 "$fixtures/llama_gqa/model.safetensors" | seed safetensors_header 00
head -c 3000 "$fixtures/peft_llama/adapter/adapter_model.safetensors" | seed safetensors_header 01
for c in llama_gqa mistral qwen2_tied; do seed safetensors_header 02 "$fixtures/$c/config.json"; done
for a in adapter adapter_rslora; do seed safetensors_header 03 "$fixtures/peft_llama/$a/adapter_config.json"; done

# llama2c: selector 00 = checkpoint (header and the start of the weights), 01 = tokenizer.bin
# after a 2-byte little-endian vocabulary size.
head -c 2048 "$data/models/stories260K/stories260K.bin" | seed llama2c 00
head -c 28 "$data/models/stories260K/stories260K.bin" | seed llama2c 00
seed llama2c 010002 "$data/models/stories260K/tok512.bin"
head -c 1200 "$data/models/stories260K/tok512.bin" | seed llama2c 014000

# tokenizer_json: a bare tokenizer.json, or tokenizer.json, a line =====, tokenizer_config.json.
gpt2=$data/models/gpt2-tokenizer
small_gpt2() { jq -c '.model.vocab |= (to_entries | .[:300] | from_entries) | .model.merges |= .[:50]' "$gpt2/tokenizer.json"; }
small_gpt2 | seed tokenizer_json ''
{ small_gpt2; printf '\n=====\n'; cat "$gpt2/tokenizer_config.json"; } | seed tokenizer_json ''
{ small_gpt2; printf '\n=====\n'; printf '%s' '{"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "chat_template": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"}'; } \
  | seed tokenizer_json ''
printf '%s' '{"version":"1.0","added_tokens":[{"id":0,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"<s>":0,"hello":1,"world":2,"<unk>":3},"unk_token":"<unk>"}}' \
  | seed tokenizer_json ''
for d in "$corpus"/*; do echo "$(ls "$d" | wc -l) seeds in $d"; done
