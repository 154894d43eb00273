"""The decode step as one native call (rag/native/decode_step.c) on CPU.

A decode step reads every weight once for a few rows: its speed is how fast the weights
stream. Through PyTorch that is ~150 small oneDNN calls and ~1,000 other ops a step
(`rag.engine.decode_step`); the C step does the same work in one call, with the same guarantees
(each row computed on its own, in a fixed order, so Lookahead's draft rows are bitwise
equal to plain steps) and float32 activations throughout.

It is built on first use with the system C compiler (`cc -O3 -march=native -fopenmp`, ~1 s)
into a per-user cache keyed by the sources and the CPU, and shares PyTorch's OpenMP runtime.
It runs bf16 and float32 models on CPU (float32 where the CPU lacks native bf16); where
there is no compiler, on CUDA, or with KVRAG_NATIVE_DECODE=0, the PyTorch step runs instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from rag.engine.batch_row import BatchRow
from rag.engine.lookahead import tree_tails
from rag.model.kv_cache import KVCache
from rag.model.layers import rope_cos_sin
from rag.model.transformer import Transformer

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native") / "decode_step.c"  # includes decode_step_typed.h
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
ENTRY = {torch.bfloat16: "kvrag_decode_step_bf16", torch.float32: "kvrag_decode_step_f32"}
BATCH_ENTRY = {torch.bfloat16: "kvrag_decode_batch_bf16", torch.float32: "kvrag_decode_batch_f32"}


class _Model(ctypes.Structure):
    _fields_ = [
        ("n_layers", ctypes.c_int),
        ("dim", ctypes.c_int),
        ("ffn", ctypes.c_int),
        ("n_heads", ctypes.c_int),
        ("n_kv", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("vocab", ctypes.c_int),
        ("eps", ctypes.c_float),
        ("embed", ctypes.c_void_p),
        ("norm", ctypes.c_void_p),
        ("lm_head", ctypes.c_void_p),
        ("layers", ctypes.c_void_p),
    ]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


@cache
def library() -> ctypes.CDLL | None:
    """The compiled step, built once per source and CPU; None (with one warning) if it can't be."""
    if os.environ.get("KVRAG_NATIVE_DECODE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler: decoding runs the PyTorch step (slower)")
        return None
    sources = b"".join(p.read_bytes() for p in sorted(SOURCE.parent.glob("decode_step*")))
    key = hashlib.sha256(sources + " ".join(FLAGS).encode() + _cpu_flags().encode()).hexdigest()[
        :16
    ]
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvrag"
    lib = cache_dir / f"decode_step-{key}.so"
    if not lib.exists():
        tmp = None
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
            os.close(fd)
            run = subprocess.run(
                [compiler, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True
            )
            error = run.stderr[-500:] if run.returncode else None
            if error is None:
                os.replace(tmp, lib)  # atomic: concurrent builders agree on the file
        except OSError as e:  # no such compiler, a read-only cache directory
            error = str(e)
        if error is not None:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            log.warning(
                "building %s failed, decoding runs the PyTorch step: %s", SOURCE.name, error
            )
            return None
    dll = ctypes.CDLL(str(lib))
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    for fn in (dll.kvrag_decode_step_bf16, dll.kvrag_decode_step_f32):
        fn.restype = ctypes.c_int
        fn.argtypes = [p, p, p, i, p, p, p, p, i64, i64, i, i, p, p, i, p, i, p, i, i]
    for fn in (dll.kvrag_decode_batch_bf16, dll.kvrag_decode_batch_f32):
        fn.restype = ctypes.c_int
        fn.argtypes = [p, p, p, p, i, p, p, p, p, p, p, p, i, i, p, i]
    return dll


def supports(model: Transformer) -> bool:
    a = model.args
    return (
        model.device.type == "cpu"
        and model.dtype in ENTRY
        and a.head_dim == 64
        and a.dim % 32 == 0
        and a.ffn_dim % 32 == 0
        and a.n_heads % a.n_kv_heads == 0
        and a.q_per_kv <= 8
    )


def for_model(model: Transformer) -> NativeDecodeStep | None:
    if not supports(model) or (lib := library()) is None:
        return None
    return NativeDecodeStep(model, lib)


class NativeDecodeStep:
    """`rag.engine.decode_step.DecodeStep`'s interface, one C call a step."""

    # A step streams the weights once for all its rows, so a few draft rows cost little more
    # than one; more rows add compute without more accepted tokens (eval/RESULTS_decode.md).
    draft_budget = 2

    def __init__(self, model: Transformer, lib: ctypes.CDLL):
        a = model.args
        self.model, self.args = model, a
        self.run = getattr(lib, ENTRY[model.dtype])
        self.run_batch = getattr(lib, BATCH_ENTRY[model.dtype])
        self._keep = []  # tensors whose memory the C side points into

        def ptr(t: torch.Tensor | None) -> int:
            if t is None:
                return 0
            t = t.detach().contiguous()
            self._keep.append(t)
            return t.data_ptr()

        rows = []
        for layer in model.layers:
            rows.append(
                [
                    ptr(layer.attn_norm.weight),
                    ptr(layer.wqkv.weight),
                    ptr(layer.wqkv.bias),
                    ptr(layer.wo.weight),
                    ptr(layer.mlp_norm.weight),
                    ptr(layer.w_gate.weight),
                    ptr(layer.w_up.weight),
                    ptr(layer.w_down.weight),
                ]
            )
        self._layers = torch.tensor(rows, dtype=torch.int64)
        self._model = _Model(
            a.n_layers,
            a.dim,
            a.ffn_dim,
            a.n_heads,
            a.n_kv_heads,
            a.head_dim,
            a.vocab_size,
            a.norm_eps,
            ptr(model.embed.weight),
            ptr(model.norm.weight),
            ptr(model.lm_head.weight),
            self._layers.data_ptr(),
        )
        self._cos = self._sin = torch.empty(0, a.head_dim)

    def _rope_table(self, n: int) -> None:
        if self._cos.shape[0] < n:
            n = max(n, 2 * self._cos.shape[0], 256)
            cos, sin = rope_cos_sin(
                self.model.inv_freq.float().cpu(), torch.arange(n), self.args.rope_scale
            )
            self._cos, self._sin = cos.float().contiguous(), sin.float().contiguous()

    @torch.inference_mode()
    def __call__(
        self,
        ids: torch.Tensor,
        cache: KVCache,
        start: int,
        *,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        all_logits: bool = False,
        base: int | None = None,
    ) -> torch.Tensor:
        """As DecodeStep.__call__: tokens `ids` [T] into slots start..start+T, logits
        float32 [T or 1, V]."""
        a = self.args
        base = start if base is None else base
        t = ids.shape[0]
        end = start + t
        cache.ensure(end)
        self._check(cache)
        k, v = cache.k, cache.v
        pos = torch.arange(start, end) if positions is None else positions.to(torch.int64).cpu()
        self._rope_table(int(pos.max()) + 1)
        ids = ids.to(torch.int64).cpu().contiguous()
        pos = pos.contiguous()
        tail = tail_len = None
        width = end - base
        if mask is not None:
            tail, tail_len = (x.to(torch.int32).contiguous() for x in tree_tails(mask, base, start))
        scores_width = (end + 15) // 16 * 16
        scratch = self._scratch(t, scores_width, width)
        n_out = t if all_logits else 1
        logits = torch.empty(n_out, a.vocab_size, dtype=torch.float32)
        rc = self.run(
            ctypes.byref(self._model),
            ids.data_ptr(),
            pos.data_ptr(),
            t,
            self._cos.data_ptr(),
            self._sin.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            k.stride(0),
            k.stride(2),
            start,
            base,
            tail.data_ptr() if tail is not None else None,
            tail_len.data_ptr() if tail_len is not None else None,
            width,
            scratch.data_ptr(),
            scores_width,
            logits.data_ptr(),
            int(all_logits),
            torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"native decode step failed ({rc})")
        cache.length = max(cache.length, end)
        return logits

    @torch.inference_mode()
    def batch(self, rows: list[BatchRow]) -> torch.Tensor:
        """One token for each of several requests in one pass over the weights: row i's token
        into slot `pos` of its own buffer, attending to its prompt [0, base) and its tail
        base..pos. Returns float32 logits [len(rows), V], each bitwise what that request's
        plain step gives alone."""
        a = self.args
        t = len(rows)
        for r in rows:
            r.cache.ensure(r.pos + 1)
            self._check(r.cache)
        ids = torch.tensor([r.token for r in rows], dtype=torch.int64)
        pos = torch.tensor([r.pos for r in rows], dtype=torch.int64)
        base = torch.tensor([r.base for r in rows], dtype=torch.int32)
        self._rope_table(int(pos.max()) + 1)
        kp = torch.tensor([r.cache.k.data_ptr() for r in rows], dtype=torch.int64)
        vp = torch.tensor([r.cache.v.data_ptr() for r in rows], dtype=torch.int64)
        ls = torch.tensor([r.cache.k.stride(0) for r in rows], dtype=torch.int64)
        hs = torch.tensor([r.cache.k.stride(2) for r in rows], dtype=torch.int64)
        scores_width = (int(pos.max()) + 1 + 15) // 16 * 16
        tail_width = int((pos - base).max()) + 1
        scratch = self._scratch(t, scores_width, tail_width)
        logits = torch.empty(t, a.vocab_size, dtype=torch.float32)
        rc = self.run_batch(
            ctypes.byref(self._model),
            ids.data_ptr(),
            pos.data_ptr(),
            base.data_ptr(),
            t,
            self._cos.data_ptr(),
            self._sin.data_ptr(),
            kp.data_ptr(),
            vp.data_ptr(),
            ls.data_ptr(),
            hs.data_ptr(),
            scratch.data_ptr(),
            scores_width,
            tail_width,
            logits.data_ptr(),
            torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"native batched decode step failed ({rc})")
        for r in rows:
            r.cache.length = max(r.cache.length, r.pos + 1)
        return logits

    def _scratch(self, rows: int, scores_width: int, tail_width: int) -> torch.Tensor:
        """The C step's working memory: each row's activations, attention scores and tail."""
        a = self.args
        qkv_dim = (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
        per_row = (
            a.dim
            + 3 * a.ffn_dim
            + qkv_dim
            + a.n_heads * a.head_dim
            + a.n_heads * scores_width
            + a.n_heads
            + tail_width
            + 1
            + a.ffn_dim
        )
        return torch.empty(rows * per_row + 16, dtype=torch.float32)  # + 16: room to align

    def _check(self, cache: KVCache) -> None:
        a, k, v = self.args, cache.k, cache.v
        if (
            k.dtype != self.model.dtype
            or v.dtype != k.dtype
            or k.stride() != v.stride()
            or k.stride(4) != 1
            or k.stride(3) != a.head_dim
            or k.shape[1] != 1
        ):
            raise ValueError(
                "the native step needs batch-1 K/V buffers in the model's dtype with contiguous"
                " slots"
            )
