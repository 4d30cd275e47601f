"""The catalogue of hostile tensors for the Python select API (run by test_hostile_tensors.py):
every kind of tensor torch can make that the select cannot take as it is.

A REFUSED case builds (t1, t2) and names the ModkernError subclass every form of the select
must raise, and the words its message must hold besides the key and the model (what the
tensor is and what was expected). FORMS_IN_PLACE cases are refused only by the forms that
write into t1. WORKS cases must give the numpy oracle's result in every form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from modkern import DTypeError, ShapeMismatchError

N = 4100  # a size that is not a multiple of the block size, two blocks


def base(n: int = N) -> torch.Tensor:
    """t1: distinct finite values, so the select has work to do."""
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, generator=g, dtype=torch.float64).float() * 0.02


def other(n: int = N) -> torch.Tensor:
    return base(n + 1)[:n].clone() + 1.0


@dataclass
class Refused:
    build: Callable[[], tuple]       # -> (t1, t2)
    error: type                      # the ModkernError subclass
    model: str                       # "model 1" or "model 2": whose tensor is wrong
    words: tuple[str, ...]           # besides the key and the model
    in_place_only: bool = False      # refused only where t1 is written


def _sparse(t):
    return t.to_sparse()


def _csr(t):
    return t.view(2, -1).to_sparse_csr()


def _nested(t):
    return torch.nested.nested_tensor([t[:5], t[5:12]])


def _quantized(t):
    return torch.quantize_per_tensor(t, 0.001, 0, torch.qint8)


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _overlapping(t):
    """An as_strided view whose rows overlap (row i starts at element i of t)."""
    return t.as_strided((8, 16), (1, 1))


REFUSED: dict[str, Refused] = {
    "sparse-coo-t1": Refused(lambda: (_sparse(base()), other()), DTypeError, "model 1",
                             ("sparse tensor", "sparse_coo", "expected a dense")),
    "sparse-coo-t2": Refused(lambda: (base(), _sparse(other())), DTypeError, "model 2",
                             ("sparse tensor", "expected a dense")),
    "sparse-csr-t1": Refused(lambda: (_csr(base()), other().view(2, -1)), DTypeError,
                             "model 1", ("sparse tensor", "sparse_csr", "expected a dense")),
    "nested-t1": Refused(lambda: (_nested(base()), other()), DTypeError, "model 1",
                         ("nested tensor", "expected a dense")),
    "nested-t2": Refused(lambda: (base(), _nested(other())), DTypeError, "model 2",
                         ("nested tensor", "expected a dense")),
    "meta-t1": Refused(lambda: (_meta(base()), other()), DTypeError, "model 1",
                       ("meta tensor", "expected a tensor with data")),
    "meta-t2": Refused(lambda: (base(), _meta(other())), DTypeError, "model 2",
                       ("meta tensor", "expected a tensor with data")),
    "meta-both": Refused(lambda: (_meta(base()), _meta(other())), DTypeError, "model 1",
                         ("meta tensor", "expected a tensor with data")),
    "quantized-t1": Refused(lambda: (_quantized(base()), other()), DTypeError, "model 1",
                            ("qint8", "quantized", "dequantize", "expected one of")),
    "quantized-t2": Refused(lambda: (base(), _quantized(other())), DTypeError, "model 2",
                            ("qint8", "quantized", "expected one of")),
    "quantized-both": Refused(lambda: (_quantized(base()), _quantized(other())), DTypeError,
                              "model 1", ("quantized", "expected one of")),
    "complex-t2": Refused(lambda: (base(), other().to(torch.complex64)), DTypeError,
                          "model 2", ("complex64", "complex", "expected one of")),
    "bool-t2": Refused(lambda: (base(), other() > 1.0), DTypeError, "model 2",
                       ("torch.bool", "not floating point", "expected one of")),
    "expanded-t1-in-place": Refused(lambda: (torch.tensor([0.5]).expand(N), other()),
                                    DTypeError, "model 1",
                                    ("share memory", "strides [0]", "expected a tensor whose"),
                                    in_place_only=True),
    "expanded-2d-t1-in-place": Refused(
        lambda: (base(16).view(1, 16).expand(8, 16), other(128).view(8, 16)), DTypeError,
        "model 1", ("share memory", "strides [0, 1]"), in_place_only=True),
    "overlapping-strides-t1-in-place": Refused(
        lambda: (_overlapping(base(200)), other(128).view(8, 16)), DTypeError, "model 1",
        ("share memory", "strides [1, 1]"), in_place_only=True),
    "t1-on-another-gpu": Refused(
        lambda: (base().to("cuda"), other()), ShapeMismatchError, "model 1",
        ("devices differ", "cuda", "cpu", "expected both on one device")),
}

if torch.backends.mkldnn.is_available():
    REFUSED["mkldnn-t1"] = Refused(lambda: (base().to_mkldnn(), other()), DTypeError,
                                   "model 1", ("opaque tensor", "_mkldnn", "expected a dense"))


def needs_cuda(name: str) -> bool:
    return "gpu" in name


@dataclass
class Works:
    build: Callable[[], tuple]       # -> (t1, t2), the oracle sees their values
    note: str


def _expanded_t2() -> tuple:
    return base(), torch.tensor([1.5]).expand(N)


def _expanded_t1() -> tuple:
    return torch.linspace(-1, 1, 16).view(1, 16).expand(8, 16), other(128).view(8, 16)


WORKS: dict[str, Works] = {
    "expanded-t2": Works(_expanded_t2, "t2 read where selected, any strides"),
    "expanded-t1-out-of-place": Works(_expanded_t1, "out of place: t1 is only read"),
    "zero-dim": Works(lambda: (torch.tensor(0.25), torch.tensor(2.0)), "a 0-dim pair"),
    "transposed-t2": Works(lambda: (base(4096).view(64, 64), other(4096).view(64, 64).t()),
                           "a strided t2"),
}
