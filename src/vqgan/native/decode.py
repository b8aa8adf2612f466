"""The C sampling step (decode_step.c) bound to one GPT's weights and one KV cache's buffers."""
from __future__ import annotations

import ctypes
from functools import cache

import torch

from . import load, threads

_F = ctypes.POINTER(ctypes.c_float)
_MATRICES = (0, 2, 8, 10)  # in GPT._next_position's per-layer weight tuple: qkv, proj, fc1, fc2


class _Layer(ctypes.Structure):
    _fields_ = [(name, _F) for name in ("w_qkv", "b_qkv", "w_proj", "b_proj", "ln1_w", "ln1_b", "ln2_w", "ln2_b",
                                        "w_fc1", "b_fc1", "w_fc2", "b_fc2", "keys", "values")]


class _Model(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_int32) for name in ("n_layer", "n_head", "n_embd", "hidden", "vocab", "capacity")),
                ("eps", ctypes.c_float),
                *((name, _F) for name in ("tok_emb", "pos_emb", "lnf_w", "lnf_b", "head")),
                ("layers", ctypes.POINTER(_Layer))]


def _ptr(t: torch.Tensor):
    return ctypes.cast(t.data_ptr(), _F)


@cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel with its two functions' signatures declared once."""
    lib = load("decode_step")
    if lib is not None:
        lib.vqgan_decode_step.restype = ctypes.c_int
        lib.vqgan_decode_step.argtypes = [ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        lib.vqgan_pack.restype = None
        lib.vqgan_pack.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return lib


def _pack(lib: ctypes.CDLL, w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    out = torch.empty((n + 15) // 16 * 16 * k)
    lib.vqgan_pack(ctypes.c_void_p(w.data_ptr()), n, k, ctypes.c_void_p(out.data_ptr()))
    return out


def _packed(lib: ctypes.CDLL, gpt, weights: list[tuple[torch.Tensor, ...]]) -> list[list[torch.Tensor]]:
    """The per-layer weights with the matrices packed, kept on the model while no parameter changes (sliding
    windows start a new cache at almost every position)."""
    try:
        stamp = tuple((p.data_ptr(), p._version) for p in gpt.parameters())
    except RuntimeError:  # parameters made under inference_mode have no version: pack again every time
        stamp = None
    kept = getattr(gpt, "_native_packed", None)
    if kept is None or stamp is None or kept[0] != stamp:
        layers = [[_pack(lib, t) if i in _MATRICES else t for i, t in enumerate(w)] for w in weights]
        kept = (stamp, layers, _pack(lib, gpt.head.weight))
        gpt._native_packed = kept
    return kept[1:]


class DecodeStep:
    """Called with token ids (B,) and their position: the logits (B, vocab) there, as `GPT.forward(idx, cache)`
    computes them up to float rounding; their keys and values join the cache. Holds the tensors it points at.
    The packed weights stay on the model (one extra copy of its matrices) until a parameter changes."""

    def __init__(self, lib: ctypes.CDLL, gpt, weights: list[tuple[torch.Tensor, ...]], keys: list[torch.Tensor],
                 values: list[torch.Tensor], batch: int):
        cfg = gpt.config
        self._fn = lib.vqgan_decode_step
        layers, head = _packed(lib, gpt, weights)
        hidden = weights[0][8].shape[0]
        self._keep = [layers, head, keys, values, gpt.tok_emb.weight, gpt.pos_emb, gpt.ln_f.weight, gpt.ln_f.bias]
        self._layers = (_Layer * cfg.n_layer)(*(
            _Layer(*(_ptr(t) for t in w), _ptr(k), _ptr(v)) for w, k, v in zip(layers, keys, values)))
        self._model = _Model(cfg.n_layer, cfg.n_head, cfg.n_embd, hidden, cfg.vocab_size, keys[0].shape[2],
                             gpt.ln_f.eps, _ptr(gpt.tok_emb.weight), _ptr(gpt.pos_emb), _ptr(gpt.ln_f.weight),
                             _ptr(gpt.ln_f.bias), _ptr(head), self._layers)
        self.batch = batch
        self._scratch = torch.empty(batch * (6 * cfg.n_embd + hidden))
        self._threads = threads()

    def __call__(self, idx: torch.Tensor, pos: int) -> torch.Tensor:
        idx = idx.contiguous()
        logits = torch.empty(self.batch, self._model.vocab)
        status = self._fn(ctypes.byref(self._model), idx.data_ptr(), self.batch, pos, logits.data_ptr(),
                          self._scratch.data_ptr(), self._threads)
        if status == -1:
            raise IndexError(f"token id out of range [0, {self._model.vocab}) in {idx.tolist()}")
        if status:
            raise ValueError(f"position {pos} is past the KV cache's {self._model.capacity} positions")
        return logits


def decode_step(gpt, weights: list[tuple[torch.Tensor, ...]], cache, batch: int) -> DecodeStep | None:
    """The C step for this model and cache, or None where it does not apply: the library cannot be built here,
    or the tensors are not contiguous float32 on the CPU. Allocates the cache's buffers if it has none yet."""
    lib = _library()
    if lib is None:
        return None
    cfg = gpt.config
    tensors = [t for w in weights for t in w] + [gpt.tok_emb.weight, gpt.pos_emb, gpt.ln_f.weight, gpt.ln_f.bias,
                                                 gpt.head.weight]
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        return None
    shape = (batch, cfg.n_head, cache.capacity, cfg.n_embd // cfg.n_head)
    for i in range(cfg.n_layer):
        if cache.keys[i] is None:
            cache.keys[i] = torch.empty(shape)
            cache.values[i] = torch.empty(shape)
    if any(t.shape != shape or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()
           for t in cache.keys + cache.values):
        return None
    return DecodeStep(lib, gpt, weights, cache.keys, cache.values, batch)
