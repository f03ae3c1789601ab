"""Serve a model over HTTP with continuous batching and query it like OpenAI's API.

    pip install -e ".[serve]"
    python examples/serve_and_query.py [--model DIR]

Without ``--model`` a tiny random InternLM2 and a small tokenizer trained on the example corpus are
written to a temporary folder (offline; a real checkpoint brings its own tokenizer.model). The script
starts ``internlm-jax serve`` on a free port, sends a chat request, a streamed completion and a few
concurrent requests (they share the batch), and stops the server with SIGTERM (it drains first). Any
OpenAI client works the same way: ``openai.OpenAI(base_url="http://127.0.0.1:PORT/v1", api_key="none")``.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

here = Path(__file__).resolve().parent


def tiny_model(folder: Path) -> Path:
    import internlm_jax as ij

    texts = (here / "data" / "tiny_corpus.txt").read_text().splitlines()
    tok = ij.Tokenizer.train(texts, folder / "tokenizer.model", vocab_size=400)
    cfg = ij.InternLM2Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return ij.InternLM2(cfg, seed=0).save_pretrained(folder / "tiny-chat", extra_files=[tok.model_file])


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="an HF or Orbax folder (default: a tiny random model)")
    args = ap.parse_args()
    folder = Path(args.model) if args.model else tiny_model(Path(tempfile.mkdtemp()))
    name = folder.name
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "internlm_jax", "serve", "--model", str(folder), "--port",
                               str(port), "--max-batch", "4", "--max-len", "512", "--quiet"],
                              env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        print("models:", [m["id"] for m in json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"]])

        reply = post(url + "/v1/chat/completions", {"model": name, "max_tokens": 24, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "Tell me a story."}]})
        print("chat:", repr(reply["choices"][0]["message"]["content"]), reply["usage"])

        req = urllib.request.Request(url + "/v1/completions", json.dumps(
            {"model": name, "prompt": "The river", "max_tokens": 16, "stream": True}).encode(),
            {"Content-Type": "application/json"})
        pieces = []
        with urllib.request.urlopen(req, timeout=300) as r:  # server-sent events, one chunk per line
            for line in r:
                line = line.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    pieces += [c["text"] for c in json.loads(line[6:])["choices"]]
        print(f"streamed {len(pieces)} chunks:", repr("".join(pieces)))

        prompts = [f"The {w} morning" for w in ("cold", "long", "bright", "quiet", "slow", "grey")]
        start = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:  # these join and leave one running batch
            outs = list(pool.map(lambda p: post(url + "/v1/completions", {"model": name, "prompt": p,
                                                                          "max_tokens": 20, "seed": 1}), prompts))
        tokens = sum(o["usage"]["completion_tokens"] for o in outs)
        print(f"{len(prompts)} concurrent requests: {tokens} tokens in {time.perf_counter() - start:.2f} s")
    finally:
        server.send_signal(signal.SIGTERM)  # drains running requests, then exits
        server.wait(120)
    print("server stopped")


if __name__ == "__main__":
    main()
