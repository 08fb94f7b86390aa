"""`MethodOptions`: the recipe-wide switches a merge method may read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MethodOptions:
    """Options shared by every expert of one merge call.

    They mirror the recipe-level fields of `MergeRecipe` (`normalize`, `lambda_`, `rescale`) plus the
    rule's `t`. Unlike mergekit, whose default `normalize` differs per method (True for `ties`/`della`,
    False for `task_arithmetic`/`dare_*`/`breadcrumbs*`/`della_linear`), the value here is always
    explicit; whoever writes mergekit YAML must therefore write `normalize` explicitly too.
    """

    normalize: bool = True
    """Divide the merged task vector by the (consensus-masked) sum of weights."""
    lambda_: float = 1.0
    """Global scale of the merged task vector (mergekit's `lambda`)."""
    rescale: Literal["mergekit", "paper"] = "mergekit"
    """DARE/DELLA rescale after dropping: restore the tensor's L1 norm (mergekit) or divide by the
    keep probability (paper: 1/density for DARE, 1/p_i element-wise for DELLA)."""
    t: float | None = None
    """Interpolation factor for slerp (required) and nuslerp (optional; default from the weights)."""
    draws: Literal["fast", "mergekit"] = "fast"
    """How DARE/DELLA masks are drawn. "fast": counter-based hashes of the element index (`_draws`;
    DARE: windows on a per-(expert, tensor) field, density quantized to 1/4096), chunkable and
    fusable. "mergekit": `torch.bernoulli` on whole tensors, which consumes the generator exactly
    like mergekit 0.1.5, so on CPU the masks are bit-identical to mergekit's under the same seed
    (used by the parity tests). Both keep each entry with probability p; a recipe is reproducible
    with either, but only with the same choice."""
    pruning: Literal["exact", "approximate"] = "exact"
    """Magnitude pruning (ties, breadcrumbs*, topk). "exact": mergekit's count and tie-breaking, to the
    entry (`_ranks`: one sort per task vector, kept for the search). "approximate": a threshold
    interpolated from the `MagnitudeTable`'s order statistics (sampled above 2**18 entries), ties at
    the threshold all kept; no sort, error bound in `_magnitude`'s docstring."""
    seed: int = 0
    """The run seed (`MergeRecipe.seed`): with a table's `identity` it fixes DARE's field for the
    run (`_draws.field_key`); the trial's generator then only picks the window."""

    def __post_init__(self) -> None:
        if self.rescale not in ("mergekit", "paper"):
            raise ValueError(f"rescale must be 'mergekit' or 'paper', got {self.rescale!r}")
        if self.pruning not in ("exact", "approximate"):
            raise ValueError(f"pruning must be 'exact' or 'approximate', got {self.pruning!r}")
        if self.draws not in ("fast", "mergekit"):
            raise ValueError(f"draws must be 'fast' or 'mergekit', got {self.draws!r}")
