#!/usr/bin/env python
"""Stage-2 benchmark: sampling a 16x16 token grid (256 tokens) at batch 4 from a 4-layer, 256-wide GPT with a
1024-code vocabulary, top-k 100, temperature 1: our KV-cached sampler against the reference's two samplers
(`Net2NetTransformer.sample`, which recomputes the whole prefix every step, and the cached
`sample_with_past` of its sample_fast.py), timed by ../shared/reference/taming_bench.py in the same run.
Ours twice: with the C sampling step (vqgan.native, the default on CPU) and with VQGAN_NATIVE=0 (PyTorch ops).
Also our transformer training throughput (tokens/s) on the same model.

    python bench/bench_stage2.py [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF_DIR = Path(os.environ.get("TAMING_BENCH_DIR", ROOT.parent / "shared" / "reference"))
REF_PYTHON = os.environ.get("REF_PYTHON", "/tmp/ref-venv/bin/python")
OUR_PYTHON = os.environ.get("OUR_PYTHON", str(ROOT / ".venv-bench" / "bin" / "python"))
GPT = {"vocab_size": 1024, "block_size": 512, "n_layer": 4, "n_head": 4, "n_embd": 256}
BATCH, STEPS, TOP_K = 4, 256, 100


def child(kind: str, iters: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from vqgan.native.malloc import keep_freed_memory
    from vqgan.priors import GPT as Model
    from vqgan.priors import GPTConfig, sample

    keep_freed_memory()  # as the vqgan command does at start
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = Model(GPTConfig(**GPT))
    times = []
    if kind == "sample":
        model.eval()
        prefix = torch.zeros(BATCH, 1, dtype=torch.long)
        sample(model, prefix, 8, top_k=TOP_K)  # warm-up
        for _ in range(iters):
            g = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            sample(model, prefix, STEPS, temperature=1.0, top_k=TOP_K, generator=g)
            times.append(time.perf_counter() - t0)
        from vqgan.native import load
        step = "C step (vqgan.native)" if load("decode_step") is not None else "PyTorch step"
        return {"seconds": statistics.median(times), "tokens_per_s": BATCH * STEPS / statistics.median(times),
                "step": step}
    return time_training(model, iters)


def time_training(model, iters: int, logits_of=lambda out: out) -> dict:
    """Median seconds of one step (forward, cross-entropy, backward, AdamW) on 16 x 256 random tokens; the
    same loop times both sides (`logits_of` unwraps the reference's (logits, loss) output)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 1024, (16, 257))
    times = []
    for i in range(iters + 2):
        t0 = time.perf_counter()
        logits = logits_of(model(x[:, :-1]))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 1024), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "tokens_per_s": 16 * 256 / statistics.median(times)}


REF_TRAIN = """
import json, sys
sys.path[:0] = [{ref_dir!r}, {bench_dir!r}]
import taming_bench
taming_bench.install_shims()
import torch
from taming.modules.transformer.mingpt import GPT
from bench_stage2 import time_training
torch.set_num_threads({threads})
torch.manual_seed(0)
print(json.dumps(time_training(GPT(**{gpt!r}), {iters}, logits_of=lambda out: out[0])))
"""


def run_reference_train(iters: int) -> dict:
    """The reference's minGPT, same config, batch, optimiser step (timed here: its bench script has no
    transformer-training benchmark)."""
    if not Path(REF_PYTHON).is_file():
        return {"error": "reference not set up"}
    code = REF_TRAIN.format(ref_dir=str(REF_DIR), bench_dir=str(Path(__file__).parent), threads=os.cpu_count() or 1,
                            gpt=GPT, iters=iters)
    proc = subprocess.run([REF_PYTHON, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_ours(kind: str, iters: int, native: bool = True) -> dict:
    python = OUR_PYTHON if Path(OUR_PYTHON).is_file() else sys.executable
    env = {**os.environ, "VQGAN_NATIVE": "1" if native else "0"}
    proc = subprocess.run([python, __file__, "--child", kind, "--iters", str(iters)], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_reference(kind: str, iters: int) -> dict:
    script = REF_DIR / "taming_bench.py"
    if not Path(REF_PYTHON).is_file() or not script.is_file():
        return {"error": "reference not set up"}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cfg.json"
        cfg.write_text(json.dumps({"gpt": GPT, "sample": {"batch": BATCH, "steps": STEPS, "top_k": TOP_K,
                                                          "temperature": 1.0, "sos_token": 0}}))
        out = Path(tmp) / "out.json"
        proc = subprocess.run([REF_PYTHON, str(script), kind, "--config", str(cfg), "--iters", str(iters), "--warmup",
                               "1", "--json", str(out)], capture_output=True, text=True)
        if proc.returncode or not out.is_file():
            return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
        r = json.loads(out.read_text())["results"][kind]
    if "error" in r or not r.get("available", True):
        return {"error": r.get("error", "unavailable")}
    return {"seconds": r["run"]["median_s"], "tokens_per_s": r["tokens_per_s"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.iters)))
        return 0
    best = lambda runs: min((r for r in runs if "error" not in r), key=lambda r: r["seconds"], default=runs[0])  # noqa: E731
    ours, ours_torch, ref_full, ref_cached, train, ref_train = [], [], [], [], [], []
    for _ in range(args.rounds):
        ours.append(run_ours("sample", args.iters))
        ours_torch.append(run_ours("sample", args.iters, native=False))
        ref_full.append(run_reference("sample", args.iters))
        ref_cached.append(run_reference("sample-cached", args.iters))
        train.append(run_ours("train", 5))
        ref_train.append(run_reference_train(5))
    rf, rc, tr, rt = best(ref_full), best(ref_cached), best(train), best(ref_train)
    print(f"\nsampling {STEPS} tokens (16x16 grid), batch {BATCH}, top-k {TOP_K}, GPT {GPT}; best of {args.rounds}\n")
    print("| what | our step | ours (s) | reference (s) | speed-up |\n|---|---|---|---|---|")
    for o in (best(ours), best(ours_torch)):
        for name, r in (("vs Net2NetTransformer.sample (no cache)", rf), ("vs sample_with_past (cached)", rc)):
            if "error" in o or "error" in r:
                print(f"| {name} | {o.get('step', 'n/a')} | {o.get('seconds', o.get('error'))} | "
                      f"{r.get('error', r.get('seconds'))} | n/a |")
            else:
                print(f"| {name} | {o['step']} | {o['seconds']:.3f} | {r['seconds']:.3f} | "
                      f"{r['seconds'] / o['seconds']:.1f}x |")
    print("\ntransformer training, batch 16 x 256 tokens, AdamW step included\n")
    print("| what | ours | reference | ratio |\n|---|---|---|---|")
    if "error" in tr or "error" in rt:
        print(f"| tokens/s | {tr.get('tokens_per_s', tr.get('error'))} | {rt.get('tokens_per_s', rt.get('error'))} | n/a |")
    else:
        print(f"| tokens/s | {tr['tokens_per_s']:.0f} | {rt['tokens_per_s']:.0f} | "
              f"{tr['tokens_per_s'] / rt['tokens_per_s']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
