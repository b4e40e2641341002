"""Pure decisions: does this node fit a request, why can no offer fit one, which bid wins."""

from __future__ import annotations

from typing import TYPE_CHECKING

from compute.types import CPU_MODEL

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from compute import Offer, OfferConfig, SlotAllocator
    from compute.market.types import Bid, Requirements


def _gpu_ok(
    req: Requirements,
    model: str,
    vram: int,
    cc: tuple[int, int],
    cuda: tuple[int, int],
) -> bool:
    return (
        vram >= req.min_vram_bytes
        and (not req.model or model.lower() == req.model.lower())
        and cc >= req.min_compute_capability
        and cuda >= req.min_cuda_version
    )


def fit_on_node(
    req: Requirements, allocator: SlotAllocator, config: OfferConfig
) -> tuple[str, int, int] | None:
    """``(model, free slots of that model, price)`` if this node can run ``req`` right now."""
    if req.sandbox and req.sandbox != config.sandbox:
        return None
    if req.runtime and req.runtime not in config.runtimes:
        return None
    if req.memory_bytes > config.job_memory_bytes_max or req.disk_bytes > config.job_disk_bytes_max:
        return None
    if req.gpus == 0:
        if allocator.free_cpu_slots <= 0:
            return None
        return CPU_MODEL, allocator.free_cpu_slots, config.cpu_price_per_slot_second
    free = allocator.free_slots_per_gpu()
    by_model: dict[str, int] = {}
    for gpu, slots in zip(allocator.gpus, free, strict=True):
        ok = _gpu_ok(req, gpu.model, gpu.vram_total_bytes, gpu.compute_capability, gpu.cuda_version)
        if slots > 0 and ok:
            by_model[gpu.model] = by_model.get(gpu.model, 0) + 1
    best: tuple[str, int, int] | None = None
    for model, count in sorted(by_model.items()):
        price = config.price_for(model)
        if count >= req.gpus and (best is None or price < best[2]):
            best = (model, count, price)
    return best


def _offer_capacity(
    offer: Offer, req: Requirements, *, free_only: bool
) -> list[tuple[str, int, int]]:
    """Per model: ``(model, GPUs meeting req, price)`` in ``offer``; CPU: ``("cpu", slots, p)``."""
    if req.sandbox and offer.sandbox != req.sandbox:
        return []
    if req.runtime and req.runtime not in offer.runtimes:
        return []
    if req.memory_bytes > offer.job_memory_bytes_max or req.disk_bytes > offer.job_disk_bytes_max:
        return []
    if req.gpus == 0:
        price = offer.price_for(CPU_MODEL)
        slots = offer.free_cpu_slots if free_only else offer.total_cpu_slots
        return [(CPU_MODEL, slots, price)] if price is not None and slots > 0 else []
    counts: dict[str, int] = {}
    for gpu in offer.gpus:
        if free_only and gpu.free_slots <= 0:
            continue
        if _gpu_ok(req, gpu.model, gpu.vram_bytes, gpu.compute_capability, gpu.cuda_version):
            counts[gpu.model] = counts.get(gpu.model, 0) + 1
    return [(m, c, offer.price_for(m) or 0) for m, c in sorted(counts.items()) if c >= req.gpus]


def explain_unsatisfiable(offers: Sequence[Offer], req: Requirements, max_price: int) -> str | None:
    """None when some live offer can take the job now; else why not, naming what is unmet."""
    if not offers:
        return "no live provider offers are known yet (the offer directory is empty)"
    free = [(o, hit) for o in offers for hit in _offer_capacity(o, req, free_only=True)]
    if any(price <= max_price for _, (_, _, price) in free):
        return None
    if free:
        cheapest = min(price for _, (_, _, price) in free)
        return (
            f"{len(free)} provider offer(s) satisfy {req.describe()}, but all are too expensive: "
            f"cheapest {cheapest} per GPU-second > max {max_price}"
        )
    total = [o for o in offers if _offer_capacity(o, req, free_only=False)]
    if total:
        return f"all {len(total)} provider(s) offering {req.describe()} are full right now"
    return f"no provider offers {req.describe()}; best: {_best_hardware(offers, req)}"


def _best_hardware(offers: Sequence[Offer], req: Requirements) -> str:
    if req.gpus == 0:
        return "no provider offers CPU slots"
    best: tuple[int, int, str] | None = None
    for offer in offers:
        by_model: dict[str, tuple[int, int]] = {}
        for gpu in offer.gpus:
            vram, count = by_model.get(gpu.model, (gpu.vram_bytes, 0))
            by_model[gpu.model] = (min(vram, gpu.vram_bytes), count + 1)
        for model, (vram, count) in by_model.items():
            candidate = (vram * count, count, model)
            if best is None or candidate > best:
                best = (vram * count, count, f"{model} {vram / 1024**3:g} GB x{count}")
    return best[2] if best is not None else "no provider has GPUs"


def rank_bids(bids: Sequence[Bid], strategy: str, score: Callable[[bytes], float]) -> list[Bid]:
    """``bids`` best first by ``strategy``; ties go to the cheaper bid, then the address."""
    if strategy == "soonest":
        return sorted(bids, key=lambda b: (b.expected_start_ms, b.price_per_gpu_second, b.signer))
    if strategy == "least-loaded":
        return sorted(bids, key=lambda b: (-b.free_slots, b.price_per_gpu_second, b.signer))
    if strategy == "reputation":
        return sorted(bids, key=lambda b: (-score(b.signer), b.price_per_gpu_second, b.signer))
    return sorted(bids, key=lambda b: (b.price_per_gpu_second, b.expected_start_ms, b.signer))
