"""Aggregating LoRA adapters: pure functions on {name: numpy array} (no torch, no flwr).

A site starts each round from the global adapter, trains, and sends an *update* (what it would add to
the global adapter); the server averages the updates, weighted, and applies the mean. How depends on
`aggregation` (docs/federated.md):

* fedavg: every adapter tensor, A and B alike, is averaged. Inexact for LoRA: the model uses the product
  B·A, and mean(B_i)·mean(A_i) ≠ mean(B_i·A_i) (`product_error` measures it).
* ffa-lora (Sun et al., ICLR 2024): A stays frozen at its shared seeded initialisation, only B trains and is
  averaged. With A shared, mean(B_i)·A = mean(B_i·A): averaging is exact.
* svd-refactor: sites send the change of the full update ΔW = s·B·A (s = alpha / r); the server averages
  those (exact), then re-factorises the new ΔW to rank r by truncated SVD (exact up to the rank cut). Each
  update is a dense d_out × d_in matrix per adapted module: more traffic, no constraint on training.

Updates are linear in what sites send, so Flower's SecAgg+ (which only reveals the sum) works with all three.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable, Optional, Sequence

import numpy as np

Arrays = dict[str, np.ndarray]

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
#: An svd-refactor update names the module's ΔW with this suffix (in place of its A and B).
DELTA_SUFFIX = ".delta_w"
AGGREGATIONS = ("fedavg", "ffa-lora", "svd-refactor")


def lora_pairs(names: Iterable[str]) -> list[tuple[str, str, str]]:
    """(module prefix, A name, B name) for every adapted module, sorted."""
    names = set(names)
    pairs = []
    for a in sorted(n for n in names if n.endswith(A_SUFFIX)):
        prefix = a[: -len(A_SUFFIX)]
        b = prefix + B_SUFFIX
        if b not in names:
            raise ValueError(f"{a} has no matching {b}")
        pairs.append((prefix, a, b))
    return pairs


def is_frozen(name: str, aggregation: str) -> bool:
    """ffa-lora trains B only: A keeps its seeded initialisation, the same at every site."""
    return aggregation == "ffa-lora" and name.endswith(A_SUFFIX)


def update_names(names: Iterable[str], aggregation: str) -> list[str]:
    """The names of the tensors a site's update carries, in the order they travel."""
    names = sorted(names)
    if aggregation == "svd-refactor":
        paired = {n for _, a, b in lora_pairs(names) for n in (a, b)}
        return sorted([p + DELTA_SUFFIX for p, _, _ in lora_pairs(names)] + [n for n in names if n not in paired])
    return [n for n in names if not is_frozen(n, aggregation)]


def site_update(received: Arrays, local: Arrays, aggregation: str, scaling: float) -> Arrays:
    """What a site sends: local − received for the tensors it trains (svd-refactor: the change of s·B·A)."""
    if aggregation == "svd-refactor":
        out: Arrays = {}
        paired = set()
        for prefix, a, b in lora_pairs(received):
            out[prefix + DELTA_SUFFIX] = scaling * (local[b] @ local[a] - received[b] @ received[a])
            paired |= {a, b}
        out.update({n: local[n] - received[n] for n in received if n not in paired})
        return out
    return {n: local[n] - received[n] for n in update_names(received, aggregation)}


def weighted_mean(updates: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
    """Σ w_i · u_i / Σ w_i, tensor by tensor (float64 inside, the inputs' dtype out)."""
    if not updates or len(updates) != len(weights):
        raise ValueError("weighted_mean needs one weight per update, and at least one update")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the weights sum to zero")
    out: Arrays = {}
    for name in updates[0]:
        acc = sum(np.asarray(u[name], dtype=np.float64) * float(w) for u, w in zip(updates, weights))
        out[name] = (acc / total).astype(updates[0][name].dtype)
    return out


def refactor(delta_w: np.ndarray, rank: int, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) of rank `rank` with s·B·A the best rank-r approximation of delta_w (Eckart–Young); the
    singular values are split evenly between B and A so neither factor dwarfs the other."""
    u, s, vt = np.linalg.svd(np.asarray(delta_w, dtype=np.float64) / scaling, full_matrices=False)
    r = min(rank, len(s))
    root = np.sqrt(s[:r])
    b = np.zeros((delta_w.shape[0], rank))
    a = np.zeros((rank, delta_w.shape[1]))
    b[:, :r] = u[:, :r] * root
    a[:r] = root[:, None] * vt[:r]
    return b, a


def apply_update(global_: Arrays, mean_update: Arrays, aggregation: str, scaling: float, rank: int) -> Arrays:
    """The next global adapter: the current one plus the averaged update."""
    out = {n: v.copy() for n, v in global_.items()}
    if aggregation == "svd-refactor":
        paired = set()
        for prefix, a, b in lora_pairs(global_):
            dense = scaling * (global_[b].astype(np.float64) @ global_[a].astype(np.float64))
            new_b, new_a = refactor(dense + mean_update[prefix + DELTA_SUFFIX], rank, scaling)
            out[b], out[a] = new_b.astype(global_[b].dtype), new_a.astype(global_[a].dtype)
            paired |= {a, b}
        for n, v in mean_update.items():
            if not n.endswith(DELTA_SUFFIX):
                out[n] = (global_[n] + v).astype(global_[n].dtype)
        return out
    for n, v in mean_update.items():
        out[n] = (global_[n] + v).astype(global_[n].dtype)
    return out


def product_error(adapters: Sequence[Arrays], weights: Sequence[float]) -> float:
    """Relative error of plain averaging for LoRA: ‖mean(B)·mean(A) − mean(B·A)‖ / ‖mean(B·A)‖ over all
    modules (0 when every site shares A, as with ffa-lora)."""
    mean = weighted_mean(adapters, weights)
    num = den = 0.0
    for _, a, b in lora_pairs(adapters[0]):
        exact = weighted_mean([{"w": ad[b].astype(np.float64) @ ad[a].astype(np.float64)} for ad in adapters],
                              weights)["w"]
        approx = mean[b].astype(np.float64) @ mean[a].astype(np.float64)
        num += float(np.sum((approx - exact) ** 2))
        den += float(np.sum(exact ** 2))
    return float(np.sqrt(num / den)) if den else 0.0


# ---- differential privacy: clipping and noise at the site --------------------------------------

def l2_norm(update: Arrays) -> float:
    return float(np.sqrt(sum(float(np.sum(np.asarray(v, dtype=np.float64) ** 2)) for v in update.values())))


def clip_and_noise(update: Arrays, clipping_norm: float, noise_std: float,
                   rng: Optional[np.random.Generator] = None) -> tuple[Arrays, float]:
    """The update scaled to L2 norm <= clipping_norm (all tensors together), plus N(0, noise_std²) on every
    entry; and the norm before clipping."""
    norm = l2_norm(update)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    rng = rng or np.random.default_rng()
    out = {n: (np.asarray(v, dtype=np.float64) * scale + (rng.normal(0.0, noise_std, size=np.shape(v))
                                                           if noise_std > 0 else 0.0)).astype(v.dtype)
           for n, v in update.items()}
    return out, norm


# ---- the order tensors travel in -------------------------------------------------------------------

def to_list(arrays: Arrays, names: Sequence[str]) -> list[np.ndarray]:
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ValueError(f"missing tensors: {missing[:3]}")
    return [np.ascontiguousarray(arrays[n]) for n in names]


def from_list(values: Sequence[np.ndarray], names: Sequence[str]) -> Arrays:
    if len(values) != len(names):
        raise ValueError(f"{len(values)} tensors for {len(names)} names")
    return dict(zip(names, (np.asarray(v) for v in values)))


def names_digest(names: Sequence[str], shapes: Sequence[tuple]) -> str:
    """Sites and server agree on the adapter's layout (names and shapes) before a round's tensors mix."""
    return hashlib.sha256(json.dumps([[n, list(s)] for n, s in zip(names, shapes)]).encode()).hexdigest()[:16]
