"""The project's C kernel for NF4 on CPU (quant/nf4_kernel.c), compiled on first use and loaded with ctypes.

Why C: torch has no CPU kernel for a weight stored as indices into a 16-value code. Through torch ops
a decode-step product dequantizes the whole matrix first (a byte-pair gather, ~1.8 ms for a
2816 x 1024 weight, 11x a bfloat16 matmul of it); the kernel reads each 32-byte block once, looks
its 64 values up in a register (one AVX-512 vpermps per 16 values) and multiplies them with every
row of x: 0.16 ms for that weight at one row, single-threaded, as fast as bfloat16's F.linear on two
threads. (bitsandbytes' CPU backend was measured 10-30x slower than float32 for such products.)
Measured on a 2-core AVX-512 VM, 8 bench blocks per product round: 5.5 ms for one row against
bfloat16's 13 ms; splitting the rows over two threads started per call was slower (8.2 ms).

Why compiled here: `-march=native` picks the vector instructions this CPU has (AVX-512, AVX2 with
FMA, or plain C elsewhere). The library is kept in cache_dir()/native/, named by a hash of the
source, the compiler and the CPU's feature flags, so a copied cache never runs on a CPU it was not
built for. Processes that start together each compile into a file of their own and rename it
(atomic), so none loads a half-written library. The kernel is checked against the torch path at load.

Without a C compiler (`$CC` or `cc`), with a failed build or check, or with PETALS_LIKE_NATIVE=0,
callers keep their torch paths and the log says why, once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from petals_like.quant.nf4_code import BLOCK_SIZE, NF4_CODE
from petals_like.utils.cache import cache_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("nf4_kernel.c")
_P = ctypes.c_void_p
_I64 = ctypes.c_int64


class NF4Kernel:
    """The loaded library: products of a few rows with an NF4 weight, and dequantization."""

    def __init__(self, library: ctypes.CDLL):
        self._lib = library
        library.nf4_isa.restype = ctypes.c_char_p
        library.nf4_max_rows.restype = ctypes.c_int
        library.nf4_linear.restype = ctypes.c_int
        library.nf4_linear.argtypes = [_P, _P, _I64, _I64, _P, _P, _P, _I64, _I64, _I64]
        library.nf4_dequantize.restype = None
        library.nf4_dequantize.argtypes = [_P, _P, _I64, _P]
        self.isa: str = library.nf4_isa().decode()  # "avx512", "avx2" or "c"
        self.max_rows: int = library.nf4_max_rows()

    def linear(self, x: Tensor, packed: Tensor, absmax: Tensor, out_features: int) -> Tensor:
        """x [rows, in] (float32, rows <= max_rows, in % 64 == 0) @ W.T -> [rows, out] float32, where W
        [out, in] is packed / absmax in quant/nf4.py's layout; all tensors contiguous, on CPU."""
        rows, in_features = x.shape
        even, odd = x[:, 0::2].contiguous(), x[:, 1::2].contiguous()
        out = torch.empty(rows, out_features, dtype=torch.float32)
        status = self._lib.nf4_linear(
            even.data_ptr(), odd.data_ptr(), rows, in_features, packed.data_ptr(), absmax.data_ptr(),
            out.data_ptr(), out_features, 0, out_features,
        )  # fmt: skip
        if status:
            raise ValueError(f"nf4_linear refused x {tuple(x.shape)} for a weight of {out_features} rows")
        return out

    def dequantize(self, packed: Tensor, absmax: Tensor, first_block: int, count: int) -> Tensor:
        """Blocks [first_block, first_block + count) as float32 [count * 64]."""
        out = torch.empty(count * 64, dtype=torch.float32)
        if count:
            blocks_at, absmax_at = packed.data_ptr() + first_block * 32, absmax.data_ptr() + first_block * 4
            self._lib.nf4_dequantize(blocks_at, absmax_at, count, out.data_ptr())
        return out


@functools.lru_cache(maxsize=None)
def nf4_kernel() -> Optional[NF4Kernel]:
    """The compiled kernel, or None where it cannot be had (the reason is logged once)."""
    if os.environ.get("PETALS_LIKE_NATIVE", "1") == "0":
        logger.info("PETALS_LIKE_NATIVE=0: NF4 products on CPU use torch ops (slower)")
        return None
    try:
        kernel = load(build(cache_dir() / "native"))
    except Exception as e:
        logger.warning(f"NF4 products on CPU use torch ops (slower): the C kernel is unavailable: {e}")
        return None
    logger.debug(f"NF4 C kernel loaded ({kernel.isa})")
    return kernel


def load(path: Path) -> NF4Kernel:
    """The library at `path`, checked against the torch path."""
    kernel = NF4Kernel(ctypes.CDLL(str(path)))
    _check(kernel)
    return kernel


def build(directory: Path, flags: tuple[str, ...] = ("-march=native",)) -> Path:
    """The library compiled with `flags` in `directory` (kept there: a second call finds it). Without
    -march=native, the compiler's baseline instructions (on x86-64: the plain C path)."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC', 'cc')!r} not found; install gcc or set CC)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b" ".join([source, compiler.encode(), _cpu_identity().encode(), *map(str.encode, flags)])).hexdigest()
    target = directory / f"nf4_kernel-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=target.stem, suffix=".so.partial", dir=target.parent)
    os.close(fd)
    try:
        command = [compiler, "-O3", *flags, "-shared", "-fPIC", "-o", partial, str(SOURCE)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
        os.replace(partial, target)
        return target
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _cpu_identity() -> str:
    """The machine and its CPU feature flags (x86 `flags`, Arm `Features`), as /proc/cpuinfo gives them."""
    features = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                features = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux: the processor's name stands in
        features = platform.processor()
    return f"{platform.machine()} {features}"


def _check(kernel: NF4Kernel) -> None:
    """The kernel's values and products against the NF4 code looked up by torch indexing, on random bytes."""
    generator = torch.Generator().manual_seed(0)
    rows, columns = 48, 192
    packed = torch.randint(0, 256, (rows * columns // 2,), dtype=torch.uint8, generator=generator)
    absmax = torch.rand(rows * columns // BLOCK_SIZE, generator=generator) + 0.5
    code = torch.tensor(NF4_CODE)
    values = torch.stack([code[(packed >> 4).long()], code[(packed & 15).long()]], dim=1).view(-1, BLOCK_SIZE)
    expected = (values * absmax[:, None]).view(-1)
    if not torch.equal(kernel.dequantize(packed, absmax, 0, absmax.numel()), expected):
        raise RuntimeError("its dequantized values differ from the NF4 code's")
    x = torch.randn(kernel.max_rows, columns, generator=generator)
    for count in (1, kernel.max_rows):
        got = kernel.linear(x[:count].contiguous(), packed, absmax, rows)
        if not torch.allclose(got, x[:count] @ expected.view(rows, columns).T, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"its product of {count} rows differs from torch's")
