"""Guard buffers: catch a kernel that loads or stores past its tile.

Under the Triton interpreter (and often on a GPU) a store that spills past a tile goes unnoticed: the spill lands
in a neighbouring row or tile, whose own program writes the right value over it later, or in memory nobody checks.
Here a tensor handed to a kernel is a view into a larger flat buffer filled with a sentinel (a NaN with a payload,
compared bit for bit): `pad` elements before and after it and, for a row-padded guard, `row_pad` sentinel columns
after every row (the kernel gets the row stride `shape[-1] + row_pad`). After the launch:

- `assert_guard_untouched(guard)`: every sentinel outside the view is intact, else it names the tensor and the first
  overwritten element (before the start, past the end, or `c` columns past the end of row `r`);
- `assert_written(guard)`: no sentinel is left inside the view (a mask that is too narrow);
- `check_guards(*guards)`: both, for each guard.

Inputs made with `guarded_copy` sit among NaN sentinels of another payload, so a masked-off load that reads them
anyway turns the result into NaN, which a comparison with the reference reports (and which never passes for an
output's sentinel).

`planted(kernel, old, new)` loads a copy of a `@triton.jit` kernel with a bug planted in its source (for example
a widened store mask), so a test can show that the guards catch it.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# Quiet NaNs with a payload (the bit patterns compared), so no computed value, NaN included, is taken for one.
# Inputs get another payload: arithmetic on a NaN keeps its payload, so an output element computed from an input's
# sentinel (an unmasked load) must not look like an output sentinel, i.e. like an element nobody wrote.
SENTINEL_BITS = {
    torch.float64: 0x7FFADEADBEEFCAFE,
    torch.float32: 0x7FDEAD01,
    torch.float16: 0x7E5B,
    torch.bfloat16: 0x7FDB,
}
INPUT_SENTINEL_BITS = {
    torch.float64: 0x7FFBADC0FFEE0BAD,
    torch.float32: 0x7FCBAD02,
    torch.float16: 0x7E0B,
    torch.bfloat16: 0x7FCB,
}
_BITS_DTYPE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS_DTYPE[t.element_size()])


def sentinel_bits(dtype: torch.dtype, *, inputs: bool = False) -> int:
    """The fill pattern: a NaN with a payload for floating dtypes, a repeated odd byte (0x5B outputs, 0x3D inputs)
    for the others."""
    table = INPUT_SENTINEL_BITS if inputs else SENTINEL_BITS
    if dtype in table:
        return table[dtype]
    return int.from_bytes((b"\x3d" if inputs else b"\x5b") * torch.empty((), dtype=dtype).element_size(), "little")


@dataclass(frozen=True)
class Guard:
    """`view` (what the kernel gets) sits `pad` elements into `flat`, laid out contiguously over `padded_shape`
    (its shape with `row_pad` extra columns per row); every other element of `flat` holds the sentinel."""

    name: str
    flat: torch.Tensor
    view: torch.Tensor
    padded_shape: tuple[int, ...]
    pad: int
    sentinel: int  # bit pattern of the fill

    @property
    def span(self) -> int:
        return math.prod(self.padded_shape)

    def inside(self) -> torch.Tensor:
        """Boolean mask over `flat`: True on the view's elements."""
        mask = torch.zeros(self.flat.numel(), dtype=torch.bool, device=self.flat.device)
        mask.as_strided(self.view.shape, self.view.stride(), self.view.storage_offset()).fill_(True)
        return mask

    def where(self, offset: int) -> str:
        """Where element `offset` of `flat` lies relative to the view, in words."""
        rel = offset - self.pad
        if rel < 0:
            return f"{-rel} element(s) before the start"
        if rel >= self.span:
            return f"{rel - self.span + 1} element(s) past the end (the view spans {self.span})"
        index = list(torch.unravel_index(torch.tensor(rel), self.padded_shape))
        index = tuple(int(i) for i in index)
        width = self.view.shape[-1]
        if index[-1] >= width:
            return (f"{index[-1] - width + 1} column(s) past the end of row {index[:-1]} (row width {width}, "
                    f"row stride {self.padded_shape[-1]})")
        return f"index {index}"


def guard_buffer(shape, dtype: torch.dtype, device="cpu", *, name: str, row_pad: int = 0,
                 pad: int | None = None, inputs: bool = False) -> Guard:
    """A sentinel-filled guard around an uninitialised `shape` view; the view's last dim is contiguous and each row
    is followed by `row_pad` sentinel columns. `pad` (default: the view's span, at least 1024) sentinel elements
    before and after; it should be at least the largest overrun a tile could make, so a spill stays in the guard."""
    shape = tuple(int(s) for s in shape)
    padded = (*shape[:-1], shape[-1] + row_pad) if shape else ()
    span = math.prod(padded)
    pad = max(span, 1024) if pad is None else pad
    flat = torch.empty(pad + span + pad, dtype=dtype, device=device)
    sentinel = sentinel_bits(dtype, inputs=inputs)
    _bits(flat).fill_(sentinel)
    strides = tuple(itertools.accumulate(reversed(padded[1:]), lambda a, b: a * b, initial=1))[::-1]
    view = flat.as_strided(shape, strides, pad)
    return Guard(name, flat, view, padded, pad, sentinel)


def guarded_copy(t: torch.Tensor, *, name: str, row_pad: int = 0, pad: int | None = None) -> Guard:
    """`t`'s values in a guard buffer (inputs: an unmasked load of the sentinel brings NaN into the result)."""
    guard = guard_buffer(t.shape, t.dtype, t.device, name=name, row_pad=row_pad, pad=pad, inputs=True)
    guard.view.copy_(t)
    return guard


def assert_guard_untouched(guard: Guard, name: str | None = None) -> None:
    """Every sentinel outside the view is intact; else names the tensor and the first overwritten element."""
    name = name or guard.name
    clobbered = (_bits(guard.flat) != guard.sentinel) & ~guard.inside()
    hits = clobbered.nonzero().flatten()
    if hits.numel():
        first = int(hits[0])
        raise AssertionError(f"{name}: out-of-bounds store, {hits.numel()} guard element(s) overwritten; the first "
                             f"at offset {first - guard.pad:+d} from the view's start is {guard.where(first)}, "
                             f"value {guard.flat[first].item()!r}")


def assert_written(guard: Guard, name: str | None = None) -> None:
    """No sentinel is left inside the view: the kernel wrote every element."""
    name = name or guard.name
    if guard.view.numel() == 0:
        return
    left = (_bits(guard.view) == guard.sentinel).nonzero()
    if left.numel():
        raise AssertionError(f"{name}: {left.shape[0]} element(s) never written, the first at index "
                             f"{tuple(int(i) for i in left[0])} of shape {tuple(guard.view.shape)}")


def check_guards(*guards: Guard) -> None:
    """assert_guard_untouched then assert_written for each guard (outputs)."""
    for guard in guards:
        assert_guard_untouched(guard)
        assert_written(guard)


def raw_kernel(kernel):
    """The `@triton.jit` function itself, under any autotuner / heuristics wrappers (their `.fn`): launched with
    an explicit grid and tile sizes, it runs exactly the config a test asks for."""
    while not inspect.isfunction(kernel.fn):
        kernel = kernel.fn
    return kernel


def planted(kernel, old: str, new: str, directory: Path):
    """A copy of raw_kernel(kernel) whose source has `old` replaced by `new` (found exactly once in the kernel).
    The copy is the kernel's whole module written to `directory` and loaded as a sibling module, so its relative
    imports and helper functions resolve."""
    fn = raw_kernel(kernel).fn
    module = sys.modules[fn.__module__]
    source = Path(module.__file__).read_text()
    kernel_source = inspect.getsource(fn)
    assert source.count(kernel_source) == 1, f"{fn.__name__}: its source is not found once in {module.__file__}"
    assert kernel_source.count(old) == 1, (f"{fn.__name__}: the text to plant a bug in, {old!r}, is not found once "
                                           "in its source: update the plant to the kernel's current code")
    mutant_name = f"{module.__package__}._planted_{fn.__name__}"
    path = Path(directory) / f"_planted_{fn.__name__}.py"
    path.write_text(source.replace(kernel_source, kernel_source.replace(old, new)))
    spec = importlib.util.spec_from_file_location(mutant_name, path)
    mutant = importlib.util.module_from_spec(spec)
    sys.modules[mutant_name] = mutant
    try:
        spec.loader.exec_module(mutant)
    finally:
        del sys.modules[mutant_name]
    return raw_kernel(getattr(mutant, fn.__name__))
