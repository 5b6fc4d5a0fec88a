"""Weight formats for inference: the big matrices in fp32, bf16, fp16, int8 or int4.

``quantize(model, fmt)`` swaps the large ``nn.Linear`` modules (att receptance/key/value/output, ffn
key/value, head) for modules that compute the same ``x @ W.T`` from a compact weight. Everything else
(embedding, LayerNorms, token-shift mixes, the w/a/v/g LoRAs, the WKV state) keeps the model's dtype, and
model.py is not touched: the math has one copy, and a quantized model is still an ``RWKV7``.

- ``fp32``/``bf16``/``fp16``: the weight in that dtype; activations are cast to it and back (so an fp32
  model can read bf16 weights). On a CPU with AVX-512 an fp32 or fp16 weight lives in the native kernels'
  "panels" layout (``to_panels``: 16 output rows' values of each input side by side; fp16 widened to fp32 as it
  is loaded), and so does a bf16 one where the CPU has bf16 dot products (inputs in pairs, multiplied in bf16
  with the activations rounded to bf16): one kernel, ``linear_panels``, then serves every row count without
  autograd, decoding, batched decoding and prefill (measured on L12-D768's matrices against the ``[out, in]``
  kernels: fp32 at 16 rows 0.76-0.84x the time, bf16 0.74x; one row 0.96x and 0.81x; 1024 rows as fast as
  oneDNN's GEMM). Elsewhere fp32 products run on ``goose.ops.matmul``'s CPU kernels, like the plain model's,
  bf16 ones on the ``[out, in]`` native kernels (decoding) or torch, fp16 ones widened block by block.
- ``int8``: symmetric, one scale per output channel (``w = q * scale``, ``q`` in [-127, 127]).
- ``int4``: asymmetric, one (scale, zero) pair per group of ``group_size`` input channels
  (``w = (q - 8) * scale + zero``, ``q`` in [0, 15], the range of each group mapped onto the 16 levels):
  the "Q4_1"-style format, not the symmetric "Q4_0" that broke RWKV in rwkv.cpp.

Kernels. On CPU, int8 with up to 64 rows (decoding, batched decoding) runs on goose's native kernels
(``ops/csrc/decode.cpp``): where the CPU has AVX512-VNNI, the int8 weight is multiplied in integers with the
activations quantized per row to int16 (each off by at most 1/65534 of its row's largest value), the weight
kept in memory in those kernels' "pairs" layout (``to_panels(q, 2)``: 16 output rows' pairs of inputs side by side,
so one vector of weights serves every activation row without sums across lanes; measured at 16 rows, the 73 int8
matrices of L12-D768: 5.9 ms against 8.9 in the [out, in] layout and 21.6 for torch's packed kernel, which rounds
the activations to bf16); elsewhere with fp32 activations in fp32, the weight as [out, in]. int4 with up to 64
rows runs there too where the CPU has AVX512-VNNI, in a pairs layout of its own (``int4_to_pairs``): the
nibbles multiplied in integers with the same int16 activations, each group's sums scaled once (measured, the 73
int4 matrices of L12-D768: one row 3.7 ms, as fast as torch's packed kernel called alone; 16 rows 7.4 ms against
10.4 for goose's former bf16 kernel and 14.9 for torch's; 64 rows 27.0 against 32.1 and 69.0). Logits against
fp32: tests/test_quant.py. Otherwise torch's weight-only kernels (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``) run a few rows fast with bf16 activations, but degrade sharply above a few rows
(measured numbers in docs/PERFORMANCE.md), so each class uses them up to ``packed_max_rows`` rows. Every other
case (prefill, big batches, other devices, a torch without those ops) uses the plain-torch fallback: dequantize a
block of output rows to the activation's dtype (bf16 activations on CPU for large inputs) and call ``F.linear``;
blocks keep the temporary below ``DEQUANT_BLOCK_BYTES``. Both paths use the same stored numbers.

Scales are rounded to bf16 *before* the weights are quantized, so the bf16 scales the CPU kernels take
are exact, and the fast path and the fallback compute with identical weights.

Files: ``save_quantized`` writes a safetensors file with the same tensor names as the official layout
(``...key.weight`` holds int8 or packed int4; ``...key.scale``/``.zero`` are new), and ``load_quantized``
reads it back; ``is_quantized_file`` tells such files apart.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import own_copy
from .ops import linear, native, native_rows
from .ops.gemm import NativeProduct, call_on_rows, weight_product

FORMATS = ("fp32", "bf16", "fp16", "int8", "int4")
DENSE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value", "head")
DEQUANT_BLOCK_BYTES = 16 << 20    # largest temporary weight block of the fallback (see the allocator note)
_FILE_FORMAT = "goose.quant.v1"

_HAS_INT8_MM = hasattr(torch.ops.aten, "_weight_int8pack_mm")
_HAS_INT4_MM = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
    hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


# int8 and int4 products up to this many rows (batched decoding) run on goose's kernels, which beat torch's
# packed kernels and the dequantize + GEMM fallback there (measured, the 73 int8 matrices of L12-D768 at 32 / 64
# rows: 16.7 / 30.6 ms against 25.5 / 46.8 for the fallback; int4 below); more rows (prefill) take the fallback
NATIVE_QUANT_MAX_ROWS = 64


def _packed_path(x: Tensor, rows: int, max_rows: int) -> bool:
    """Whether torch's packed CPU kernels serve this call (they have no autograd formula)."""
    return x.device.type == "cpu" and rows <= max_rows and not (x.requires_grad and torch.is_grad_enabled())


def _blocked_linear(x: Tensor, out_features: int, dequant_rows, row_bytes: int) -> Tensor:
    """``x @ W.T`` with W built block by block: ``dequant_rows(lo, hi)`` returns rows lo:hi of W in x's dtype."""
    block = max(16, DEQUANT_BLOCK_BYTES // max(1, row_bytes))
    if block >= out_features:
        return F.linear(x, dequant_rows(0, out_features))
    return torch.cat([F.linear(x, dequant_rows(lo, min(lo + block, out_features)))
                      for lo in range(0, out_features, block)], dim=-1)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Activation dtype of the fallback GEMM: bf16 on CPU for fp32 inputs (int8/int4 values are exact in
    bf16, and the bf16 GEMM is ~3x the fp32 one on CPUs with bf16 units), the input's dtype elsewhere."""
    return torch.bfloat16 if x.device.type == "cpu" and x.dtype == torch.float32 else x.dtype


class _KernelLayout(nn.Module):
    """A module whose buffers live in memory in a native kernel's own layout where that kernel takes them
    (``arranged`` True: fp32, fp16 and bf16 panels, int8 and int4 pairs) and in their plain layout everywhere
    else: in ``state_dict()`` (so files keep the plain layout), while loading one, and while being moved
    (``.to()``; arranged again on CPU afterwards)."""

    arranged = False

    def _takes_layout(self) -> bool:
        """Whether the native kernels take this module's weights in their layout."""
        raise NotImplementedError

    def _kernel_buffers(self) -> dict[str, Tensor]:
        """The plain-layout buffers rearranged into the kernel's layout."""
        raise NotImplementedError

    def _plain_buffers(self) -> dict[str, Tensor]:
        """The kernel-layout buffers back in the plain layout."""
        raise NotImplementedError

    def _settle(self) -> None:
        """A new module's buffers in memory of its own, on huge pages (``own_copy``), as loaders leave weights:
        rearranged into the kernel's layout, which ``_kernel_buffers`` writes there, or copied as they are."""
        self._arrange()
        if not self.arranged:
            for name, t in self._buffers.items():
                setattr(self, name, own_copy(t, t.device, t.dtype))

    def _arrange(self) -> None:
        if not self.arranged and self._takes_layout():
            for name, t in self._kernel_buffers().items():
                setattr(self, name, t)
            self.arranged = True

    def _standard(self) -> None:
        if self.arranged:
            for name, t in self._plain_buffers().items():
                setattr(self, name, t.contiguous())
            self.arranged = False

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.arranged:
            destination.update({prefix + name: t for name, t in self._plain_buffers().items()})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._standard()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._arrange()

    def _apply(self, fn, recurse=True):
        self._standard()
        out = super()._apply(fn, recurse)
        self._arrange()
        return out

    def native_product(self) -> NativeProduct | None:
        """The native kernel that computes this module's product when decoding, with its operands, if any."""
        raise NotImplementedError

    def _kernel_product(self, x: Tensor) -> Tensor | None:
        """``x @ W.T`` on ``native_product()``'s kernel if it takes this call (any activation dtype, taken as
        fp32), else None."""
        product = self.native_product()
        if product is None:
            return None
        x32 = x if x.dtype == torch.float32 else x.float()      # each skipped no-op conversion saves ~0.5 us
        rows = native_rows(x32, product.max_rows)
        if not rows:
            return None
        out = call_on_rows(_decode_op(product.op), x32, rows, *product.operands, *product.args)
        return out if x32 is x else out.to(x.dtype)


class DenseLinear(_KernelLayout):
    """``x @ W.T`` with W in ``dtype``, whatever the activation dtype.

    An fp32 or fp16 weight, or a bf16 one with an even number of inputs, on a CPU whose native kernels take it
    lives in their panels layout (``to_panels``; ``arranged`` is then True) and every product without autograd
    runs on ``linear_panels``; ``state_dict()`` and files hold ``[out, in]``, and ``rows()`` gives it.
    """

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, lin: nn.Linear, dtype: torch.dtype) -> DenseLinear:
        return cls.from_weight(lin.weight, dtype)

    @classmethod
    def from_weight(cls, weight: Tensor, dtype: torch.dtype) -> DenseLinear:
        """The module for an ``[out, in]`` weight, converted to ``dtype``."""
        m = cls(weight.shape[1], weight.shape[0], dtype, weight.device)
        m.weight = weight.detach().to(dtype)
        m._settle()        # a copy of its own, on huge pages (decoding reads it), or rearranged into panels
        return m

    def _takes_layout(self) -> bool:
        if not self.weight.is_cpu:
            return False
        if self.weight.dtype == torch.bfloat16:
            return self.in_features % 2 == 0 and native_can("bf16_dot")
        # fp32, and fp16 widened to fp32 as it is loaded
        return self.weight.dtype in (torch.float32, torch.float16) and native_can("fp32_panels")

    def _inputs(self) -> int:
        """Inputs per lane of a step of the panels layout: pairs for bf16 (multiplied in pairs), else 1."""
        return 2 if self.weight.dtype == torch.bfloat16 else 1

    def _kernel_buffers(self) -> dict[str, Tensor]:
        return {"weight": to_panels(self.weight, self._inputs())}

    def _plain_buffers(self) -> dict[str, Tensor]:
        return {"weight": self.rows()}

    def rows(self) -> Tensor:
        """The weight as ``[out, in]``, whatever the layout in memory (a copy when arranged in panels)."""
        if not self.arranged:
            return self.weight
        return _from_panels(self.weight, self.in_features, self._inputs())[:self.out_features]

    def native_product(self) -> NativeProduct | None:
        if self.arranged:
            return NativeProduct("linear_panels", (self.weight,), (self.out_features,), max_rows=sys.maxsize)
        return weight_product(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.arranged:
            out = self._kernel_product(x)
            if out is not None:
                return out
            return F.linear(x, self.rows().to(x.dtype))    # autograd, autocast: rare, so the copy is fine
        if w.dtype == torch.float16 and x.device.type == "cpu" and x.numel() > self.in_features:
            # CPUs without fp16 arithmetic run fp16 GEMMs on a slow path (only the matrix-vector one is
            # fast): widen the weight block by block and multiply in fp32 instead
            out = _blocked_linear(x.float(), self.out_features, lambda lo, hi: w[lo:hi].float(), self.in_features * 4)
            return out.to(x.dtype)
        return linear(x, w)          # in w's dtype; up to 16 fp32 rows against bf16 on the native kernels

    def extra_repr(self) -> str:
        layout = ", panels layout" if self.arranged else ""
        return f"in={self.in_features}, out={self.out_features}, weight={self.weight.dtype}{layout}"


class Int8Linear(_KernelLayout):
    """Weight-only int8 with per-output-channel scales: ``W = weight * scale[:, None]``.

    ``state_dict()`` and files hold ``weight`` as ``[out, in]``. On a CPU whose native kernels multiply int8 in
    int16 pairs, the module keeps it in those kernels' "pairs" layout instead (``to_panels(q, 2)``; ``arranged``
    is then True): same bytes, rearranged, converted back wherever the ``[out, in]`` form is needed.
    """

    packed_max_rows = 16     # measured: beyond, dequantize + bf16 GEMM is as fast (`goose bench kernels`)

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.bfloat16, device=device))

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        w = lin.weight.detach().float()
        m = cls(lin.in_features, lin.out_features, w.device)
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
        scale = _round_up_to_bf16(scale)                # exact in bf16, and never below absmax / 127
        m.weight = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        m.scale = scale.to(torch.bfloat16)              # exact: the kernel's bf16 scales lose nothing
        m._settle()
        return m

    def _takes_layout(self) -> bool:
        return self.weight.is_cpu and self.in_features % 2 == 0 and native_can("int16_dot")

    def _kernel_buffers(self) -> dict[str, Tensor]:
        return {"weight": to_panels(self.weight, 2)}

    def _plain_buffers(self) -> dict[str, Tensor]:
        return {"weight": self.rows()}

    def rows(self, lo: int = 0, hi: int | None = None) -> Tensor:
        """Rows ``lo:hi`` of the int8 weight as ``[out, in]``, whatever the layout in memory."""
        if not self.arranged:
            return self.weight[lo:hi]
        g0, g1, rows = _pair_groups(lo, hi, self.out_features)
        return native.ops("decode").int8_pairs_rows(self.weight, g0, g1)[rows]

    def dequantize(self, lo: int = 0, hi: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.rows(lo, hi).to(dtype) * self.scale[lo:hi, None].to(dtype)

    def native_product(self) -> NativeProduct | None:
        if not self.weight.is_cpu:
            return None
        op = "linear_int8_pairs" if self.arranged else "linear_int8"     # fp32 activations without VNNI
        return NativeProduct(op, (self.weight, self.scale), max_rows=NATIVE_QUANT_MAX_ROWS)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        out = self._kernel_product(x)
        if out is not None:
            return out
        if _HAS_INT8_MM and not self.arranged and _packed_path(x, rows, self.packed_max_rows):
            x2 = x.reshape(rows, self.in_features).to(torch.bfloat16)
            out = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale)
            return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        dt = _compute_dtype(x)
        # int8 values are exact in bf16/fp16/fp32: scale the output once instead of every weight
        out = _blocked_linear(x.to(dt), self.out_features, lambda lo, hi: self.rows(lo, hi).to(dt),
                              self.in_features * torch.finfo(dt).bits // 8)
        return (out.float() * self.scale.float()).to(x.dtype)

    def extra_repr(self) -> str:
        layout = ", pairs layout" if self.arranged else ""
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel{layout}"


PAIR_GROUP = 16    # output rows per group of the pairs layout (csrc/decode.cpp)


def _padded_rows(t: Tensor) -> Tensor:
    """``t`` with zero rows appended up to a whole number of groups of 16 (``t`` itself if it has them)."""
    missing = -t.shape[0] % PAIR_GROUP
    return t if missing == 0 else torch.cat([t, t.new_zeros(missing, *t.shape[1:])])


def _pair_groups(lo: int, hi: int | None, N: int) -> tuple[int, int, slice]:
    """The groups of 16 rows ``[g0, g1)`` that hold rows ``lo:hi`` of ``N``, and where those rows lie in them."""
    hi = N if hi is None else min(hi, N)
    g0, g1 = lo // PAIR_GROUP, -(-hi // PAIR_GROUP)
    return g0, g1, slice(lo - g0 * PAIR_GROUP, hi - g0 * PAIR_GROUP)


def _materialized(view: Tensor) -> Tensor:
    """A rearranging view written once, into memory of its own on huge pages (``own_copy``; a tensor too small
    for them is copied keeping the view's strides, hence ``contiguous``)."""
    return own_copy(view, view.device, view.dtype).contiguous()


def to_panels(w: Tensor, inputs: int) -> Tensor:
    """An ``[N, K]`` weight in the native kernels' panels layout ``[ceil(N / 16), 16 K]``: groups of 16 output rows
    (zero rows pad the last), in each the inputs in steps of ``inputs`` (1 for fp32; pairs for bf16 and for int8,
    which the kernels widen to int16) with the 16 rows' steps side by side (``[group, K / inputs, 16, inputs]``),
    so that one vector load holds 16 outputs' next step."""
    padded = _padded_rows(w)
    groups, K = padded.shape[0] // PAIR_GROUP, padded.shape[1]
    return _materialized(padded.view(groups, PAIR_GROUP, K // inputs, inputs).transpose(1, 2)).view(groups, -1)


def _from_panels(panels: Tensor, K: int, inputs: int) -> Tensor:
    """Groups of rows in the panels layout (``to_panels``; any shape with the groups first) back as ``[16 groups,
    K]`` rows, padding rows included (a copy)."""
    steps = panels.reshape(panels.shape[0], K // inputs, PAIR_GROUP, inputs).transpose(1, 2)
    return steps.reshape(-1, K)


@functools.cache
def _decode_op(name: str):
    """The native decode kernel ``name`` (looked up once: a product's Python overhead is a few us, per call)."""
    return getattr(native.ops("decode"), name)


@functools.cache
def native_can(capability: str) -> bool:
    """Whether the native kernels are built here with ``capability``, asked once: ``"fp32_panels"`` (fp32 and fp16
    weights in the panels layout), ``"bf16_dot"`` (bf16 weights multiplied in bf16 pairs: their panels layout)
    or ``"int16_dot"`` (int8 and int4 multiplied in int16 pairs: their pairs layouts)."""
    return native.load("decode") and getattr(native.ops("decode"), capability)()


def _round_up_to_bf16(x: Tensor) -> Tensor:
    """The smallest bf16 value >= x (x > 0), as fp32."""
    y = x.to(torch.bfloat16).float()
    bumped = torch.nextafter(y.to(torch.bfloat16), torch.tensor(float("inf"), dtype=torch.bfloat16)).float()
    return torch.where(y < x, bumped, y)


class Int4Linear(_KernelLayout):
    """Weight-only int4, asymmetric per group: ``W[o, g*G:(g+1)*G] = (q - 8) * scale[o, g] + zero[o, g]``.

    In ``state_dict()`` and files ``weight`` is uint8 ``[out, in / 2]``, two values per byte (low nibble = even
    input index), ``scale`` and ``zero`` bf16 ``[out, in / group]``: a plain, device-independent layout. On a CPU
    whose native kernels multiply in int16 pairs the module keeps all three in those kernels' pairs layout
    (``arranged`` is then True; ``int4_to_pairs``); elsewhere on CPU torch's packed kernel's layout is derived on
    first use.
    """

    packed_max_rows = 64     # measured: the packed kernel beats unpacking + bf16 GEMM up to here

    def __init__(self, in_features: int, out_features: int, group_size: int = 64, device=None):
        super().__init__()
        if in_features % group_size or group_size % 2:
            raise ValueError(f"int4: in_features ({in_features}) must be a multiple of an even group_size "
                             f"({group_size})")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=torch.bfloat16, device=device))
        self.register_buffer("zero", torch.empty(out_features, groups, dtype=torch.bfloat16, device=device))
        self._cpu_packed: tuple[Tensor, Tensor] | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int = 64) -> Int4Linear:
        m = cls(lin.in_features, lin.out_features, group_size, lin.weight.device)
        w = lin.weight.detach().float().view(m.out_features, -1, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = _round_up_to_bf16(((hi - lo) / 15).clamp_min(1e-8))
        zero = (lo + 8 * scale).to(torch.bfloat16).float()   # the kernel's bf16 value, quantized against
        q = ((w - zero[..., None]) / scale[..., None] + 8).round_().clamp_(0, 15).to(torch.uint8)
        q = q.view(m.out_features, -1)
        m.weight = q[:, 0::2] | (q[:, 1::2] << 4)
        m.scale, m.zero = scale.to(torch.bfloat16), zero.to(torch.bfloat16)
        m._settle()
        return m

    def _takes_layout(self) -> bool:                      # groups of 4k <= 4096 inputs
        return (self.weight.is_cpu and self.group_size % 4 == 0 and self.group_size <= 4096
                and native_can("int16_dot"))

    def _kernel_buffers(self) -> dict[str, Tensor]:
        return dict(zip(("weight", "scale", "zero"), int4_to_pairs(self.weight, self.scale, self.zero)))

    def _plain_buffers(self) -> dict[str, Tensor]:
        return dict(zip(("weight", "scale", "zero"), self._stored()))

    def _stored(self, lo: int = 0, hi: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Rows ``lo:hi`` of weight, scale and zero in the ``[out, ...]`` layout, whatever the layout in memory."""
        if not self.arranged:
            return self.weight[lo:hi], self.scale[lo:hi], self.zero[lo:hi]
        g0, g1, rows = _pair_groups(lo, hi, self.out_features)
        q = native.ops("decode").int4_pairs_rows(self.weight, g0, g1)[rows]
        scale, zero = (_from_panels(t[g0:g1], t.shape[1], 1)[rows] for t in (self.scale, self.zero))
        return q, scale.contiguous(), zero.contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._cpu_packed = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _unpack(self, packed: Tensor) -> Tensor:
        """The values 0..15 of ``[rows, in / 2]`` stored bytes, as ``[rows, in]``."""
        return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], self.in_features)

    def dequantize(self, lo: int = 0, hi: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        packed, scale, zero = self._stored(lo, hi)
        q = self._unpack(packed).view(-1, self.in_features // self.group_size, self.group_size).to(dtype) - 8
        w = torch.addcmul(zero[:, :, None].to(dtype), q, scale[:, :, None].to(dtype))
        return w.view(-1, self.in_features)

    def _cpu_kernel_args(self) -> tuple[Tensor, Tensor]:
        if self._cpu_packed is None or self._cpu_packed[0].device != self.weight.device:
            stored, scale, zero = self._stored()
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self._unpack(stored).to(torch.int32), 1)
            packed = own_copy(packed, packed.device, packed.dtype)   # onto huge pages, as the other weights
            scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
            self._cpu_packed = (packed, scales_zeros)
        return self._cpu_packed

    def _apply(self, fn, recurse=True):                  # .to()/.cuda() invalidate torch's kernel layout
        self._cpu_packed = None
        return super()._apply(fn, recurse)

    def native_product(self) -> NativeProduct | None:
        if not self.arranged:
            return None
        return NativeProduct("linear_int4_pairs", (self.weight, self.scale, self.zero),
                             (self.group_size, self.out_features), NATIVE_QUANT_MAX_ROWS)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        out = self._kernel_product(x)
        if out is not None:
            return out
        if (not self.arranged and _HAS_INT4_MM and _packed_path(x, rows, self.packed_max_rows)
                and self.out_features % 16 == 0):
            packed, scales_zeros = self._cpu_kernel_args()
            x2 = x.reshape(rows, self.in_features).to(torch.bfloat16)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, scales_zeros)
            return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        dt = _compute_dtype(x)
        out = _blocked_linear(x.to(dt), self.out_features, lambda lo, hi: self.dequantize(lo, hi, dt),
                              self.in_features * 4 * 2)   # fp32 temporaries while dequantizing
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        layout = ", pairs layout" if self.arranged else ""
        return f"in={self.in_features}, out={self.out_features}, int4 group={self.group_size}{layout}"


def int4_to_pairs(q: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """An Int4Linear's ``[N, K / 2]`` weight and ``[N, K / group]`` scale and zero in the native kernels' pairs
    layout: groups of 16 output rows; in each, a block of 32 bytes per 4 inputs, byte ``2 o + j`` holding input
    ``4 t + j`` of row ``o`` in its low nibble and ``4 t + 2 + j`` in its high one (one widening load, a mask and a
    shift give 16 rows' next two pairs of inputs); scale and zero as ``[groups of rows, K / group, 16]``."""
    padded = _padded_rows(q)
    groups, K = padded.shape[0] // PAIR_GROUP, 2 * padded.shape[1]
    values = torch.stack([padded & 15, padded >> 4], dim=-1).view(groups, PAIR_GROUP, K // 4, 2, 2)
    packed = values[:, :, :, 0] | (values[:, :, :, 1] << 4)       # [group, o, t, j]: byte 2 o + j of block t
    per_group = (to_panels(t, 1).view(groups, t.shape[1], PAIR_GROUP) for t in (scale, zero))
    return (_materialized(packed.transpose(1, 2)).view(groups, -1), *per_group)


QUANTIZED = (DenseLinear, Int8Linear, Int4Linear)


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every big matrix, in model order."""
    found = []
    for name, module in model.named_modules():
        if name.endswith(TARGETS) and isinstance(module, (nn.Linear, *QUANTIZED)):
            parent_name, _, attr = name.rpartition(".")
            found.append((model.get_submodule(parent_name) if parent_name else model, attr, module))
    return found


@torch.no_grad()
def quantize(model: nn.Module, fmt: str, group_size: int = 64) -> nn.Module:
    """Convert the big matrices of ``model`` to ``fmt`` in place (see the module docstring); returns it.

    Only ``nn.Linear`` modules are converted: a model converted once must be reloaded to change format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"weight format must be one of {FORMATS}, got {fmt!r}")
    targets = _targets(model)
    for _, attr, lin in targets:
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{attr} is already converted ({type(lin).__name__}); load the model again to "
                             f"change its weight format")
    # one matrix at a time, each old one let go as soon as it is replaced: memory peaks one matrix above the
    # model's, and the new weights reuse the old ones' freed pages instead of asking the kernel for fresh huge
    # pages, which it may compact memory for (measured, L24-D1024 to fp32 panels: 2.1 -> 0.5 s)
    while targets:
        parent, attr, lin = targets.pop()
        if fmt in DENSE:
            new = DenseLinear.from_linear(lin, DENSE[fmt])
        elif fmt == "int8":
            new = Int8Linear.from_linear(lin)
        else:
            new = Int4Linear.from_linear(lin, group_size)
        setattr(parent, attr, new)
        del lin, new
    return model


def weight_format(model: nn.Module) -> str:
    """The format of the big matrices: one of FORMATS, or "model" when they are plain nn.Linear."""
    kinds = set()
    for _, _, m in _targets(model):
        if isinstance(m, Int8Linear):
            kinds.add("int8")
        elif isinstance(m, Int4Linear):
            kinds.add("int4")
        elif isinstance(m, DenseLinear):
            kinds.add({v: k for k, v in DENSE.items()}[m.weight.dtype])
        else:
            kinds.add("model")
    if len(kinds) != 1:
        raise ValueError(f"mixed weight formats: {sorted(kinds)}")
    return kinds.pop()


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer except the embedding table (one
    row is looked up). This is what bounds batch-1 decoding on a memory-bound CPU."""
    total = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n != "emb.weight")
    return total + model.emb.weight.shape[1] * model.emb.weight.element_size()


def save_quantized(model: nn.Module, path: str | Path) -> None:
    """Write a converted model (any format) to a ``.safetensors`` file, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"quantized checkpoints are safetensors files; got {path.name}")
    fmt = weight_format(model)
    if fmt == "model":
        raise ValueError("the model is not converted: call quantize(model, fmt) first, or use goose.save")
    group = next((m.group_size for _, _, m in _targets(model) if isinstance(m, Int4Linear)), 0)
    sd = {k: t.detach().cpu().contiguous() for k, t in model.state_dict().items()}
    meta = {"format": _FILE_FORMAT, "weights": fmt, "group_size": str(group),
            "config": json.dumps(model.config.__dict__)}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(sd, str(tmp), metadata=meta)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def is_quantized_file(path: str | Path) -> bool:
    """True for files written by :func:`save_quantized`."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        return _metadata(path).get("format") == _FILE_FORMAT
    except Exception:  # noqa: BLE001 - any unreadable header simply means "not ours"; load reports details
        return False


def load_quantized(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """Read a file written by :func:`save_quantized` into an ``RWKV7`` with converted matrices.

    ``dtype`` casts the unconverted tensors (embedding, norms, LoRAs); the converted ones keep their format.
    """
    from safetensors.torch import load_file

    from .model import ModelConfig, RWKV7

    path = Path(path)
    if not is_quantized_file(path):
        raise ValueError(f"{path} is not a goose quantized checkpoint (see goose.quant.save_quantized)")
    meta = _metadata(path)
    cfg = ModelConfig(**json.loads(meta["config"]))
    with torch.device("meta"):
        model = RWKV7(cfg)
        fmt = meta["weights"]
        for parent, attr, lin in _targets(model):
            if fmt in DENSE:
                new = DenseLinear(lin.in_features, lin.out_features, DENSE[fmt])
            elif fmt == "int8":
                new = Int8Linear(lin.in_features, lin.out_features)
            else:
                new = Int4Linear(lin.in_features, lin.out_features, int(meta["group_size"]))
            setattr(parent, attr, new)
    converted = {n + "." for n, m in model.named_modules() if isinstance(m, QUANTIZED)}
    sd = load_file(str(path), device=str(device))
    for k, t in sd.items():   # copies: load_file maps the file, and the model must not change if the file does
        cast = dtype is not None and not k.startswith(tuple(converted))
        sd[k] = own_copy(t, t.device, dtype if cast else t.dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
