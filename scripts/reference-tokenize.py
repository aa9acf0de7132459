#!/usr/bin/env python3
"""Record llama.cpp's tokenization of the tokenizer test corpus for each real model.

Usage: scripts/reference-tokenize.py LLAMA_BIN_DIR
Writes tests/reference/tokenize_<model>.json: [{"text": ..., "ids": [...]}, ...], using
llama-tokenize (special tokens parsed, BOS as the model says), from scripts/build-llamacpp.sh.
"""
import json, os, subprocess, sys, tempfile

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
bin_dir = sys.argv[1]
corpus = json.load(open(os.path.join(root, "tests/reference/tokenizer_corpus.json")))
models = {
    "SmolLM2-135M-Instruct.Q4_1": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5-coder-0.5b-instruct-q4_k_m": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "gemma-3-270m-q4_k_m": "gemma-3-270m-q4_k_m.gguf",
}
for name, file in models.items():
    out = []
    for text in corpus:
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
            f.write(text)
        res = subprocess.run(
            [os.path.join(bin_dir, "llama-tokenize"), "-m", os.path.join(root, "models", file),
             "-f", f.name, "--ids", "--log-disable"],
            capture_output=True, text=True, check=True)
        os.unlink(f.name)
        out.append({"text": text, "ids": json.loads(res.stdout.strip().splitlines()[-1])})
    path = os.path.join(root, "tests/reference", f"tokenize_{name}.json")
    json.dump(out, open(path, "w"), ensure_ascii=False, indent=1)
    print(path)
