"""`mixture_kd_loss` and `fused_linear_mixture_kd`: distilling a mixture of teachers
(docs/design.md 1.4; the specification is modkern/ops/kd_reference.py).

Both walk the rows that count in chunks. Per chunk: the student's and teachers' logits
(given, or one torch matmul each for a (hidden, weight) source), then an engine computes
each row's loss and writes its gradient with respect to the student logits, in place over
the chunk's own logits where they are a fresh buffer: modkern/ops/kd_torch.py on the CPU,
one Triton kernel per chunk (modkern.kernels.mixture_kd) on the GPU. The fused form then
folds the chunk's gradient into hidden, weight and bias by two matmuls, so no one's full
[N, V] logits (or softmax) exist at once. The gradients are computed with the loss, in the
forward (only those asked for), and scaled by the incoming gradient in the backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from . import kd_torch
from ..backends import engine_module
from .kd_inputs import (LogitsSource, check_devices, check_options, check_weights,
                        common_width, kept_rows, linear_source, logits_source,
                        teacher_sources)
from .kd_reference import compute_dtype

# Elements of one chunk's [rows, V] logits (student's, and each teacher's): 128 MB of
# float32, about 220 rows of a 152K vocabulary. Smaller chunks make slower matmuls on a CPU
# and rewrite the [V, H] weight gradient more often; larger ones hold more memory.
CHUNK_ELEMENTS = 1 << 25
MAX_TRITON_K = 16


def mixture_kd_loss(student_logits: torch.Tensor, teacher_logits, weights, *,
                    temperature: float = 1.0, kind: str = "forward_kl", mask=None,
                    ignore_index: int = -100, scale_t2: bool = False, vocab: str = "common",
                    backend: str = "auto", chunk_rows: int | None = None) -> torch.Tensor:
    """Distillation loss of student logits towards a mixture of teachers (a scalar).

    p = sum_k weights[k] * softmax(teacher_k / T) (no gradient to the teachers),
    log q = log_softmax(student / T); per row kind="forward_kl": sum p (log p - log q),
    "reverse_kl": sum q (log q - log p), "jsd": (KL(p||m) + KL(q||m)) / 2 with
    m = (p + q) / 2; the loss is the mean over the rows that count (times T^2 when
    scale_t2). No row counts: 0. A column masked (-inf) in every teacher of non-zero
    weight is out of every sum, the student's softmax included.

    Args:
        student_logits: [..., V] (bf16, fp16, fp32; fp64 on the torch backend); the
            gradient flows to it.
        teacher_logits: K teachers, each logits [..., V_k] with the student's leading dims,
            or a (hidden [..., H_k], weight [V_k, H_k][, bias [V_k]]) tuple whose logits are
            computed a chunk of rows at a time.
        weights: K numbers (or a 1-D tensor) in [0, 1] summing to 1.
        temperature: T > 0, applied to student and teachers.
        kind: "forward_kl", "reverse_kl" or "jsd".
        mask: which rows count: bool of the leading shape (True counts), or integer labels
            whose rows equal to ignore_index do not count (labels == -100 style).
        scale_t2: multiply the loss by T^2 (Hinton's convention; off by default).
        vocab: "common" (default) keeps the first min(V, V_k) columns of every tensor when
            widths differ (padded heads), as mix_logits(vocab="common"); "strict" raises
            ShapeMismatchError.
        backend: "auto" (Triton for CUDA tensors, torch otherwise), "torch" or "triton".
        chunk_rows: rows per chunk (default: 2**25 logits per chunk, 220 rows of 152K).

    Returns the loss, float32 (float64 for float64 input).
    """
    student = logits_source("student_logits", student_logits, None)
    run = _Run.build(student, teacher_logits, weights, student_logits.shape[:-1],
                     dict(temperature=temperature, kind=kind, mask=mask,
                          ignore_index=ignore_index, scale_t2=scale_t2, vocab=vocab,
                          backend=backend, chunk_rows=chunk_rows))
    return _KDFunction.apply(run, student_logits)


def fused_linear_mixture_kd(hidden: torch.Tensor, weight: torch.Tensor, teacher_logits,
                            weights, *, bias: torch.Tensor | None = None,
                            temperature: float = 1.0, kind: str = "forward_kl", mask=None,
                            ignore_index: int = -100, scale_t2: bool = False,
                            vocab: str = "common", backend: str = "auto",
                            chunk_rows: int | None = None) -> torch.Tensor:
    """`mixture_kd_loss` for student logits = hidden @ weight.T (+ bias), never held whole.

    hidden [..., H] (e.g. the student's last hidden states), weight [V, H] (its lm_head),
    bias [V] or None; gradients flow to all three. The logits, their softmax and their
    gradient exist one chunk of rows at a time (chunk_rows, default 2**25 logits per
    chunk); give the teachers as (hidden, weight) tuples for the same on their side.
    Every other argument as in `mixture_kd_loss`.
    """
    student = linear_source("student", hidden, weight, bias, None)
    run = _Run.build(student, teacher_logits, weights, hidden.shape[:-1],
                     dict(temperature=temperature, kind=kind, mask=mask,
                          ignore_index=ignore_index, scale_t2=scale_t2, vocab=vocab,
                          backend=backend, chunk_rows=chunk_rows))
    return _KDFunction.apply(run, hidden, weight, bias)


def _engine(backend: str, tensors: list[torch.Tensor], K: int):
    """kd_torch, or the Triton kernels ("auto": for CUDA tensors they can take)."""
    return engine_module(backend, tensors, K, MAX_TRITON_K, kd_torch, "mixture_kd", "teachers")


@dataclass
class _Run:
    """One evaluation of the loss: the checked inputs and how to walk them."""

    student: LogitsSource
    teachers: list[LogitsSource]
    weights: tuple[float, ...]
    temperature: float
    kind: str
    factor: float              # T^2 or 1
    V: int                     # the common vocabulary width
    rows: torch.Tensor | None  # indices of the rows that count (None: all)
    step: int                  # rows per chunk
    engine: object
    grad_enabled: bool

    @classmethod
    def build(cls, student: LogitsSource, teacher_logits, weights, lead: torch.Size,
              opts: dict) -> "_Run":
        T = check_options(opts["temperature"], opts["kind"], opts["chunk_rows"])
        teachers = teacher_sources(teacher_logits, lead)
        ws = check_weights(weights, len(teachers))
        mask = opts["mask"]
        check_devices([student, *teachers], [mask] if isinstance(mask, torch.Tensor) else [])
        V = common_width([student, *teachers], opts["vocab"])
        rows = kept_rows(mask, lead, opts["ignore_index"])
        tensors = [t for src in (student, *teachers) for t in src.tensors]
        engine = _engine(opts["backend"], tensors, len(teachers))
        n = lead.numel() if rows is None else rows.numel()
        step = opts["chunk_rows"] or max(1, CHUNK_ELEMENTS // V)
        return cls(student, teachers, ws, T, opts["kind"],
                   T * T if opts["scale_t2"] else 1.0, V, rows, max(1, min(step, n)),
                   engine, torch.is_grad_enabled())

    @property
    def n(self) -> int:
        return self.student.tensors[0].shape[0] if self.rows is None else self.rows.numel()

    def execute(self, need: tuple[bool, ...]):
        """(loss, gradients of the differentiable inputs, None where not needed)."""
        need = tuple(n and self.grad_enabled for n in need)
        fused = self.student.logits is None
        grads = _Grads(self, need) if fused else None
        logits_grad = None
        if not fused and need[0]:
            x = self.student.logits
            logits_grad = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        n, sources = self.n, (self.student, *self.teachers)
        cd = compute_dtype(*(t for src in sources for t in src.tensors))
        scale = self.factor / max(n, 1)
        total = torch.zeros((), dtype=cd, device=self.student.tensors[0].device)
        buffers = _ChunkBuffers(self)
        for r0 in range(0, n, self.step):
            r1 = min(n, r0 + self.step)
            sel = slice(r0, r1) if self.rows is None else self.rows[r0:r1]
            s = buffers.student(sel, r1 - r0)
            into = None
            if fused and any(need):
                into = s  # a fresh matmul result: its gradient overwrites it
            elif logits_grad is not None:  # a gathered chunk is a fresh copy: write over it
                into = logits_grad[sel, :self.V] if self.rows is None else s
            rows_loss = self.engine.chunk_loss(s, buffers.teachers(sel, r1 - r0),
                                               self.weights, self.temperature, self.kind,
                                               into, scale)
            total += rows_loss.sum().to(cd)
            if fused and any(need):
                grads.add(sel, into)
            elif into is not None and self.rows is not None:
                logits_grad[:, :self.V].index_copy_(0, sel, into)
        return total * scale, (grads.result() if fused else (logits_grad,))


class _ChunkBuffers:
    """Where a chunk's logits come from: views of given logits where they can be, else
    buffers of [rows per chunk, V] allocated once and reused chunk after chunk (computed
    logits, and for a stacked engine every teacher's, copied or computed into [K, ...])."""

    def __init__(self, run: _Run):
        self.run = run
        self.device = run.student.tensors[0].device
        self.own: dict = {}
        self.stack = None
        if run.engine.STACKED:
            dtypes = {t.dtype for t in run.teachers}
            dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
            self.stack = torch.empty(len(run.teachers), run.step, run.V, dtype=dtype,
                                     device=self.device)

    def _out(self, key, src: LogitsSource, rows: int) -> torch.Tensor | None:
        if src.logits is not None:
            return None
        if key not in self.own:
            self.own[key] = torch.empty(self.run.step, self.run.V, dtype=src.dtype,
                                        device=self.device)
        return self.own[key][:rows]

    def student(self, sel, rows: int) -> torch.Tensor:
        src = self.run.student
        s = src.rows(sel, self.run.V, out=self._out("student", src, rows))
        if self.run.engine is not kd_torch and s.stride(-1) != 1:
            s = s.contiguous()
        return s

    def teachers(self, sel, rows: int):
        V, teachers = self.run.V, self.run.teachers
        if self.stack is None:
            return [t.rows(sel, V, out=self._out(k, t, rows)) for k, t in enumerate(teachers)]
        for k, t in enumerate(teachers):
            t.rows(sel, V, out=self.stack[k, :rows])
        return self.stack[:, :rows]


class _Grads:
    """Gradients of hidden, weight and bias, accumulated chunk by chunk from the chunk's
    gradient with respect to its logits (float32 accumulators for low-precision weights)."""

    def __init__(self, run: _Run, need: tuple[bool, ...]):
        src, self.V = run.student, run.V
        self.src, self.need = src, need
        self.hidden = (torch.zeros(src.hidden.shape, dtype=src.hidden.dtype,
                                   device=src.hidden.device) if need[0] else None)
        acc = torch.float64 if src.weight.dtype == torch.float64 else torch.float32
        self.weight = (torch.zeros(src.weight.shape, dtype=acc, device=src.weight.device)
                       if need[1] else None)
        self.bias = (torch.zeros(src.bias.shape, dtype=acc, device=src.bias.device)
                     if need[2] else None)

    def add(self, sel, g: torch.Tensor) -> None:
        """Fold in the gradient g [rows, V] of the logits of rows `sel`."""
        V, src = self.V, self.src
        if self.hidden is not None:
            self.hidden[sel] = g @ src.weight[:V]
        if self.weight is not None:
            h = src.hidden[sel]
            if g.dtype == self.weight.dtype:
                self.weight[:V].addmm_(g.T, h)
            else:
                self.weight[:V].add_(g.T @ h)
        if self.bias is not None:
            self.bias[:V].add_(g.sum(0, dtype=self.bias.dtype))

    def result(self):
        src = self.src
        weight = None if self.weight is None else self.weight.to(src.weight.dtype)
        bias = None if self.bias is None else self.bias.to(src.bias.dtype)
        return self.hidden, weight, bias


def _scaled(grad: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor | None:
    if grad is None:
        return None
    if g.device.type == "cpu" and float(g) == 1.0:
        return grad
    return grad * g.to(grad.dtype)


class _KDFunction(torch.autograd.Function):
    """The loss of a _Run; its gradients are computed in the forward, with the loss.

    They are kept by save_for_backward, which autograd releases as soon as the backward
    has run (unless retain_graph): the returned gradient is then the only reference, and
    autograd takes it as .grad itself instead of copying it (for the unfused form a
    second [N, V] tensor)."""

    @staticmethod
    def forward(ctx, run: _Run, *inputs):
        need = tuple(ctx.needs_input_grad[1:1 + len(inputs)])
        loss, grads = run.execute(need)
        ctx.save_for_backward(*(None if gr is None else gr.view(x.shape)
                                for gr, x in zip(grads, inputs)))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        return (None, *(_scaled(gr, g) for gr in ctx.saved_tensors))
