#!/usr/bin/env python
"""Where a training step's time goes, on the device it trains on: a tokenizer's, or a prior's (`*-prior` presets).

Meant for a GPU. On an H200 the small preset at batch 32 took ~60 ms a step, bf16 no faster than fp32, where its
arithmetic needs a few milliseconds; f16-1024 at 256 px, too, ran at one speed in both precisions. This says
which part of the step is the host's: for each setting it prints the wall time per step, the part of it spent
waiting for the next batch, the device's busy time per step (kernel and copy time summed; CUDA only), kernels
launched and device-to-host copies (each one a wait for the device) per step, and the kernels and CPU-side
operations that took the most time. `--cudnn-benchmark both` measures cuDNN's autotuning off, on, off, on (the
tokenizers' convolutions; a prior has none). `--channels-last` then measures the tokenizer with its weights,
optimizer state and images in channels-last layout (on the H200, cuDNN's layout transposes nchwToNhwc /
nhwcToNchw took 14 of f16-1024's 75 busy ms a step at 256 px; autotuning, measured after, read 102 -> 128 ms).

    python bench/step_profile.py PRESET [section.key=value ...] [--steps 20] [--warmup 10]
    python bench/step_profile.py small-cpu train.batch_size=32 train.precision=bf16 --cudnn-benchmark both
    python bench/step_profile.py f16-1024 model.resolution=256 train.batch_size=8 --channels-last
    python bench/step_profile.py demo-prior data.tokens=STORE train.precision=bf16
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from vqgan.config import TokenizerTrainConfig, load_config
from vqgan.presets import resolve_config_path
from vqgan.train.stage1 import TokenizerTrainer
from vqgan.train.stage2 import PriorTrainer, TransformerTrainConfig


def device_time(e) -> float:
    """Microseconds an event kept the device busy (the attribute's name changed across torch releases)."""
    name = "self_device_time_total" if hasattr(e, "self_device_time_total") else "self_cuda_time_total"
    return float(getattr(e, name, 0.0) or 0.0)  # not both: reading the old name warns on new releases


def is_device_event(e) -> bool:
    return str(getattr(e, "device_type", "")).endswith("CUDA")


def measure(trainer: TokenizerTrainer | PriorTrainer, batches, start: int, warmup: int, steps: int, profiled: int) -> dict:
    cuda = trainer.rt.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step = start
    for _ in range(warmup):
        trainer.step = step
        trainer.train_step(next(batches))
        step += 1
    sync()
    waiting, t0 = 0.0, time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(batches)
        waiting += time.perf_counter() - t
        trainer.step = step
        trainer.train_step(batch)
        step += 1
    sync()
    wall = (time.perf_counter() - t0) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(profiled):
            trainer.step = step
            trainer.train_step(next(batches))
            step += 1
        sync()
    events = prof.events()
    device = [e for e in events if is_device_event(e)]
    host = Counter()
    for e in prof.key_averages():
        if not is_device_event(e) and e.key.startswith("aten::"):
            host[e.key] += e.self_cpu_time_total
    kernels = Counter()
    for e in device:
        kernels[e.name[:90]] += device_time(e)
    return {"step": step, "wall_ms": 1e3 * wall, "waiting_ms": 1e3 * waiting / steps,
            "busy_ms": sum(kernels.values()) / 1e3 / profiled if cuda else None,
            "kernels": len(device) / profiled if cuda else None,
            "to_host": sum("DtoH" in e.name for e in device) / profiled if cuda else None,
            "top_kernels": [(k, v / 1e3 / profiled) for k, v in kernels.most_common(8)],
            "top_host": [(k, v / 1e3 / profiled) for k, v in host.most_common(8)]}


def to_channels_last(trainer: TokenizerTrainer) -> None:
    """The tokenizer's and its loss's 4-D weights, their optimizer state, in channels-last layout (in place)."""
    for module in (trainer.model, trainer.loss):
        module.to(memory_format=torch.channels_last)
    for optimizer in (trainer.opt_ae, trainer.opt_d):
        for state in optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() == 4:
                    state[key] = value.contiguous(memory_format=torch.channels_last)


def channels_last_images(batches):
    for micro_batches in batches:
        yield [{**b, "image": b["image"].contiguous(memory_format=torch.channels_last)} for b in micro_batches]


def report(label: str, r: dict) -> None:
    busy = ("n/a (no CUDA)" if r["busy_ms"] is None
            else f"{r['busy_ms']:.1f} ms ({100 * r['busy_ms'] / r['wall_ms']:.0f}%)")
    print(f"\n== {label}: {r['wall_ms']:.1f} ms a step ({1e3 / r['wall_ms']:.1f} it/s), waiting for data "
          f"{r['waiting_ms']:.1f} ms, device busy {busy}")
    if r["kernels"] is not None:
        print(f"   {r['kernels']:.0f} kernels and copies a step, {r['to_host']:.1f} device-to-host copies a step")
    for title, rows in (("kernels, ms a step", r["top_kernels"]),
                        ("CPU-side ops (self time), ms a step", r["top_host"])):
        if rows:
            print(f"   {title}:")
            for name, ms in rows:
                print(f"     {ms:8.2f}  {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset")
    p.add_argument("overrides", nargs="*", help="section.key=value (a tokenizer's data.path defaults to "
                   "builtin:scenes; a prior needs data.tokens=STORE)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotuning happens here)")
    p.add_argument("--profiled", type=int, default=5, help="steps under the profiler")
    p.add_argument("--cudnn-benchmark", choices=("off", "on", "both"), default="off")
    p.add_argument("--channels-last", action="store_true",
                   help="then once more with weights and images channels-last (tokenizers), autotuning as last set")
    args = p.parse_args()
    prior = args.preset.endswith("-prior")
    overrides = [*([] if prior else ["data.path=builtin:scenes"]), "train.log_every=1000000",
                 "train.eval_every=1000000", f"train.out_dir={tempfile.mkdtemp(prefix='step_profile_')}",
                 *args.overrides]
    if prior:
        cfg = load_config(TransformerTrainConfig, resolve_config_path(args.preset), overrides)
        trainer, loading = PriorTrainer(cfg, progress=False), "rows read in the training process"
    else:
        cfg = load_config(TokenizerTrainConfig, resolve_config_path(args.preset), overrides)
        trainer = TokenizerTrainer(cfg, progress=False)
        loading = f"{trainer.workers} loader processes"
    print(f"{args.preset} {' '.join(args.overrides)}: on {trainer.rt.device}, precision {trainer.dtype}, batch "
          f"{cfg.train.batch_size}, {loading}, torch {torch.__version__}")
    batches, step = trainer.batches(), 0
    # both: off, on, off, on, so that drift along the run (the first H200 profile measured on 13 ms slower than
    # off, run after it, with the same kernels) shows as a difference between the two rounds
    settings = ("-",) if prior else ("off", "on") * 2 if args.cudnn_benchmark == "both" else (args.cudnn_benchmark,)
    for setting in settings:
        torch.backends.cudnn.benchmark = setting == "on"
        r = measure(trainer, batches, step, args.warmup, args.steps, args.profiled)
        step = r["step"]
        report("the prior's step" if prior else f"cuDNN autotuning {setting}", r)
    if args.channels_last and not prior:
        to_channels_last(trainer)
        r = measure(trainer, channels_last_images(batches), step, args.warmup, args.steps, args.profiled)
        report(f"channels-last, cuDNN autotuning {settings[-1]}", r)


if __name__ == "__main__":
    main()
