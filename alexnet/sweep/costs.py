"""What a trial cost, measured once it ends, and what a cost-aware sweep or a constrained one makes of it.

Every trial records its measurements in its user attributes (`measured`): its training seconds (the sum
of its epochs'), its mean epoch seconds, its examples/s (the book's count, last epoch) and the FLOPs of one
trained image (3x the forward pass at its resize: `alexnet.training.sizes`). A sweep with `cost = ...` minimises
one of them as its second objective; one with `max_epoch_seconds = S` makes a trial whose epochs took
longer on average infeasible (Optuna's constraint: the value `epoch_seconds - S` must be <= 0). A warm
start prices an earlier study's trials from the same record. Torch-free: the launcher uses it.
"""

from __future__ import annotations

from alexnet.training import sizes
from alexnet.sweep.spec import COSTS, Sweep

CONSTRAINT = "epoch_seconds"  # the constraint's name in Optuna (a trial's system attribute)


def measure(records: list, resize: int) -> dict[str, float]:
    """A trial's measurements from its epoch records (`alexnet.training.train.EpochRecord`)."""
    seconds = [r.epoch_seconds for r in records]
    return {"train_seconds": sum(seconds), "epoch_seconds": sum(seconds) / len(seconds),
            "examples_per_sec": records[-1].examples_per_sec, "flops_per_image": 3 * sizes.flops_per_image(resize)}


def cost_of(cost: str, measured: dict) -> float:
    """The value of `cost` (a key of `COSTS`) from a trial's measurements."""
    if cost == "seconds":
        return measured["train_seconds"]
    if cost == "flops":
        return float(measured["flops_per_image"])
    if cost == "inverse_throughput":
        return 1.0 / measured["examples_per_sec"]
    raise ValueError(f"unknown cost {cost!r} (known: {', '.join(COSTS)})")


def constraints(sweep: Sweep, measured: dict) -> dict[str, float]:
    """Optuna's constraint values for a trial: `epoch_seconds - max_epoch_seconds` (feasible when <= 0)."""
    return {CONSTRAINT: measured["epoch_seconds"] - sweep.max_epoch_seconds} if sweep.max_epoch_seconds else {}


def non_dominated(points: list[list[float]]) -> list[int]:
    """Indices of the points no other point dominates, every coordinate minimised: a point is dominated
    by one at least as small in every coordinate and not equal to it."""
    return [i for i, p in enumerate(points)
            if not any(all(a <= b for a, b in zip(q, p)) and q != p for q in points)]


def describe(cost: str, value: float) -> str:
    """A cost in words: `flops 1.13e+09`, `seconds 35.2`, `s/example 0.0042`."""
    if cost == "seconds":
        return f"seconds {value:.1f}"
    if cost == "flops":
        return f"flops {value:.3g}"
    return f"s/example {value:.3g}"
