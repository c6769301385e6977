"""The compiled kernels in ``kernels.c``, built with the system's C compiler at first use.

The source is plain C (no torch headers): compiling it takes about a second, and the library
is kept under ``~/.cache/sae_nb/kernels`` (``$SAE_NB_CACHE``), named by a hash of the source,
the flags, the compiler and this CPU's features, so a change of any of them builds it again.
Without a compiler (or with ``SAE_NB_KERNELS=0``) :func:`library` returns None and the callers
use torch's own ops: the same results, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-fopenmp-simd", "-fPIC", "-shared", "-std=c11"]
NATIVE = ["-march=native"]  # the CPU's own vector units (the cache key holds its features)

_loaded: dict[str, object] = {}

_p, _i64, _f32, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    "sae_round_rows": [_p, _p, _i64, _i64, _p, _p, _p, _p, _p, _int],
    "sae_screen_topk": [_p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _f32, _f32, _p, _p,
                        _p, _p, _int],
    "sae_row_topk": [_p, _i64, _i64, _i64, _p, _p, _p, _int],
}


def cache_dir() -> Path:
    root = os.environ.get("SAE_NB_CACHE") or Path.home() / ".cache" / "sae_nb"
    return Path(root) / "kernels"


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def amx() -> bool:
    """Whether this CPU has AMX's bfloat16 tiles (Intel Sapphire Rapids and later), where the
    bfloat16 product runs ~9x faster than float32's."""
    if "amx" not in _loaded:
        _loaded["amx"] = "amx_bf16" in _cpu_features().split()
    return bool(_loaded["amx"])


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def _build(target: Path) -> str | None:
    """Compile the source to ``target`` (atomically); the compiler's complaint, or None."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError as err:
        return f"cannot write {str(target.parent)!r} ({err}); set SAE_NB_CACHE to a writable folder"
    os.close(fd)
    errors = []
    try:
        for flags in (FLAGS + NATIVE, FLAGS):  # a compiler without -march=native: portable
            cmd = [_compiler(), *flags, "-o", tmp, str(SOURCE), "-lpthread", "-lm"]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as err:
                errors.append(f"{cmd[0]}: {err}")
                break
            if done.returncode == 0:
                os.replace(tmp, target)
                return None
            errors.append(done.stderr.strip()[-500:])
        return "; ".join(errors) or "the compiler failed"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> ctypes.CDLL | None:
    """The loaded kernels, compiled first if this machine has none yet; None where they
    cannot be had (no C compiler, a cache that cannot be written, ``SAE_NB_KERNELS=0``)."""
    if os.environ.get("SAE_NB_KERNELS", "1") == "0":
        return None
    if "lib" in _loaded:
        return _loaded["lib"]
    source = SOURCE.read_bytes()
    compiler = _compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = None
    lib = None
    if version is None:
        warnings.warn(f"No C compiler ({compiler!r}) for sae_nb's training kernels: TopK "
                      "training uses torch's ops instead (the same results, slower). Install "
                      "one (Debian: apt-get install gcc) or set CC.", stacklevel=2)
    else:
        digest = hashlib.sha256(b"\0".join([source, " ".join(FLAGS + NATIVE).encode(),
                                            version.encode(), _cpu_features().encode()]))
        target = cache_dir() / f"sae_nb_kernels-{digest.hexdigest()[:16]}.so"
        problem = None if target.exists() else _build(target)
        if not problem:
            try:
                lib = ctypes.CDLL(str(target))
            except OSError:  # a damaged file where the library was kept: build it again
                problem = _build(target)
                lib = None if problem else ctypes.CDLL(str(target))
        if problem:
            warnings.warn(f"sae_nb's training kernels did not compile ({problem}); TopK "
                          "training uses torch's ops instead (the same results, slower).",
                          stacklevel=2)
        else:
            for name, args in SIGNATURES.items():
                getattr(lib, name).argtypes = args
                getattr(lib, name).restype = ctypes.c_int
    _loaded["lib"] = lib
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def round_rows(x: torch.Tensor, shift: torch.Tensor | None = None):
    """``(x - shift)`` in float32 and rounded to bfloat16, with per-row norms:
    ``(shifted, rounded, norm, error_norm, rounded_norm)``. ``x`` (rows, cols) float32 on the
    CPU; the kernels must be loaded."""
    lib = library()
    x = x.contiguous()
    rows, cols = x.shape
    shifted = torch.empty_like(x) if shift is not None else None
    rounded = torch.empty((rows, cols), dtype=torch.bfloat16)
    norms = torch.empty((3, rows), dtype=torch.float32)
    shift = None if shift is None else shift.detach().contiguous()
    lib.sae_round_rows(_ptr(x), _ptr(shift), rows, cols, _ptr(shifted), _ptr(rounded),
                       _ptr(norms[0]), _ptr(norms[1]), _ptr(norms[2]), torch.get_num_threads())
    return (x if shifted is None else shifted), rounded, norms[0], norms[1], norms[2]


def screen_topk(screen: torch.Tensor, x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor,
                slack: torch.Tensor, k: int, m: int, c3: float, bias_max: float):
    """See ``sae_screen_topk`` in kernels.c: ``(values, indices, certified, dots)``, the rows
    not certified left unwritten."""
    lib = library()
    B, F_ = screen.shape
    vals = torch.empty((B, k), dtype=torch.float32)
    idx = torch.empty((B, k), dtype=torch.long)
    ok = torch.empty(B, dtype=torch.uint8)
    dots = torch.zeros(B, dtype=torch.long)
    code = lib.sae_screen_topk(_ptr(screen), _ptr(x), _ptr(W), _ptr(bias), _ptr(slack), B, F_,
                               x.shape[1], k, m, c3, bias_max, _ptr(vals), _ptr(idx), _ptr(ok),
                               _ptr(dots), torch.get_num_threads())
    if code:
        raise ValueError(f"sae_screen_topk refused k={k}, m={m} for {F_} columns")
    return vals, idx, ok.bool(), int(dots.sum())


def row_topk(pre: torch.Tensor, k: int):
    """See ``sae_row_topk`` in kernels.c: ``(values, indices, done)`` for ``pre`` (B, F)
    float32, contiguous, on the CPU; the rows not done (NaN, inf, many ties) left unwritten."""
    lib = library()
    B, F_ = pre.shape
    vals = torch.empty((B, k), dtype=torch.float32)
    idx = torch.empty((B, k), dtype=torch.long)
    ok = torch.empty(B, dtype=torch.uint8)
    code = lib.sae_row_topk(_ptr(pre), B, F_, k, _ptr(vals), _ptr(idx), _ptr(ok),
                            torch.get_num_threads())
    if code:
        raise ValueError(f"sae_row_topk refused k={k} for {F_} columns")
    return vals, idx, ok.bool()
