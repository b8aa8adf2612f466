"""keep_freed_memory: freed activation-sized blocks are reused, not mapped and zeroed again."""
import os
import subprocess
import sys

import pytest

from vqgan.native.malloc import keep_freed_memory

PROBE = """
import resource, torch
from vqgan.tokenizers import VQModel
from vqgan.config import quantizer_config, VQGANConfig
from vqgan.native.malloc import keep_freed_memory
applied = keep_freed_memory()
torch.set_num_threads(1)
model = VQModel(VQGANConfig(resolution=64, ch=64, ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[16],
                            z_channels=64, quantizer=quantizer_config(n_embed=64, embed_dim=16))).eval()
x = torch.randn(8, 3, 64, 64)
with torch.no_grad():
    for _ in range(2):  # warm-up: the heap reaches its steady size and layout
        model.decode(model.encode(x))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        model.decode(model.encode(x))
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(setting: str) -> tuple[bool, int]:
    # PyTorch's own convolutions: the Winograd kernel's multi-MiB scratch blocks, freed early, raise glibc's
    # dynamic mmap threshold by themselves, which hides what the setting does for everything else
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "VQGAN_MALLOC": setting, "VQGAN_WINOGRAD": "0"}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_repeated_passes_reuse_their_pages():
    """Three encode+decode passes of a small model at batch 8: glibc's default maps and zeroes ~50k pages again
    (its heap is trimmed and its large blocks unmapped between passes); kept, next to none."""
    applied, faults = probe("1")
    off, faults_off = probe("0")
    assert applied and not off
    assert faults_off > 5000
    assert faults < faults_off / 10


def test_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("VQGAN_MALLOC", "0")
    assert keep_freed_memory() is False
