"""The offer directory every node keeps: one live offer per provider, queryable locally.

All methods take ``now_ms`` explicitly, so the directory is a pure, clock-free structure; the
node passes wall-clock time and tests pass whatever time they like.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Any

import ledger
from compute._offers import decode_offer, validate_offer
from compute.exceptions import ComputeError
from compute.types import CPU_MODEL, SANDBOX_KINDS, Offer

if TYPE_CHECKING:
    from collections.abc import Mapping

directory_offers_max = 4096
provider_silence_ms_max = 35_000
"""A provider not heard from for this long is dropped even if its offer has not expired."""
query_rows_max = 1000
query_tags_max = 16


class QueryError(ComputeError, ValueError):
    """Raised when offer-query parameters (e.g. from RPC) are malformed."""


class AddOutcome(enum.Enum):
    """What ``OfferDirectory.add`` did with a valid offer (none of these penalise the sender)."""

    ADDED = "added"
    REPLACED = "replaced"
    DUPLICATE = "duplicate"
    STALE = "stale"
    EXPIRED = "expired"
    FULL = "full"

    @property
    def is_new(self) -> bool:
        """True when the offer is news worth forwarding on the mesh."""
        return self in (AddOutcome.ADDED, AddOutcome.REPLACED)


@dataclasses.dataclass
class _Entry:
    offer: Offer
    offer_hash: bytes
    last_heard_ms: int


def _version(text: str, name: str) -> tuple[int, int]:
    parts = text.split(".")
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        raise QueryError(f"{name} must look like '8.6' or '12', got {text!r}")
    return int(parts[0]), int(parts[1]) if len(parts) == 2 else 0


def _required(value: int | None) -> int:
    if value is None:
        raise QueryError("a required integer is null")
    return value


@dataclasses.dataclass(frozen=True)
class OfferQuery:
    """A local search over the directory.

    With ``gpu_count`` > 0 (or any GPU filter) an offer matches when it has at least
    ``gpu_count`` (min 1) free GPUs of *one* model passing every filter at or under
    ``max_price``; its quoted price is the cheapest such model. With ``cpu_only`` it needs a
    free CPU slot. With neither, every live offer is listed at its cheapest price.
    """

    gpu_count: int = 0
    min_vram_bytes: int = 0
    model: str | None = None
    min_cuda_version: tuple[int, int] | None = None
    min_compute_capability: tuple[int, int] | None = None
    max_price: int | None = None
    tags: tuple[str, ...] = ()
    sandbox: str | None = None
    cpu_only: bool = False
    limit: int = 100

    def __post_init__(self) -> None:
        if not 0 <= self.gpu_count <= 64:
            raise QueryError("gpu_count must be 0..64")
        if self.min_vram_bytes < 0 or (self.max_price is not None and self.max_price < 0):
            raise QueryError("min_vram_bytes and max_price must be >= 0")
        if not 1 <= self.limit <= query_rows_max:
            raise QueryError(f"limit must be 1..{query_rows_max}")
        if len(self.tags) > query_tags_max:
            raise QueryError(f"at most {query_tags_max} tags")
        if self.sandbox is not None and self.sandbox not in SANDBOX_KINDS:
            raise QueryError(f"sandbox must be one of {SANDBOX_KINDS}")
        if self.cpu_only and self.wants_gpu:
            raise QueryError("cpu_only excludes GPU filters")

    @property
    def wants_gpu(self) -> bool:
        return bool(
            self.gpu_count
            or self.min_vram_bytes
            or self.model
            or self.min_cuda_version
            or self.min_compute_capability
        )

    @classmethod
    def from_json(cls, params: Mapping[str, Any]) -> OfferQuery:
        """Build a query from JSON-RPC params; versions are strings like ``"8.6"``."""
        known = {
            "gpu_count", "min_vram_bytes", "model", "min_cuda_version",
            "min_compute_capability", "max_price", "tags", "sandbox", "cpu_only", "limit",
        }  # fmt: skip
        unknown = set(params) - known
        if unknown:
            raise QueryError(f"unknown query keys: {sorted(unknown)}")

        def integer(name: str, default: int | None) -> int | None:
            value = params.get(name, default)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise QueryError(f"{name} must be an integer")
            return value

        def text(name: str) -> str | None:
            value = params.get(name)
            if value is not None and (not isinstance(value, str) or len(value) > 64):
                raise QueryError(f"{name} must be a string of at most 64 chars")
            return value

        tags = params.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise QueryError("tags must be a list of strings")
        cpu_only = params.get("cpu_only", False)
        if not isinstance(cpu_only, bool):
            raise QueryError("cpu_only must be a boolean")
        cuda = text("min_cuda_version")
        cc = text("min_compute_capability")
        return cls(
            gpu_count=_required(integer("gpu_count", 0)),
            min_vram_bytes=_required(integer("min_vram_bytes", 0)),
            model=text("model"),
            min_cuda_version=_version(cuda, "min_cuda_version") if cuda else None,
            min_compute_capability=_version(cc, "min_compute_capability") if cc else None,
            max_price=integer("max_price", None),
            tags=tuple(tags),
            sandbox=text("sandbox"),
            cpu_only=cpu_only,
            limit=_required(integer("limit", 100)),
        )


@dataclasses.dataclass(frozen=True)
class OfferMatch:
    """One query hit: the offer, what matched and the price quoted for it."""

    offer: Offer
    model: str
    gpu_count: int
    price_per_gpu_second: int
    last_heard_ms: int

    def to_json(self) -> dict[str, object]:
        row = self.offer.to_json()
        row["match"] = {
            "model": self.model,
            "gpu_count": self.gpu_count,
            "price_per_gpu_second": self.price_per_gpu_second,
        }
        row["last_heard_ms"] = self.last_heard_ms
        return row


def _match(offer: Offer, query: OfferQuery) -> tuple[str, int, int] | None:
    """``(model, gpu_count, price)`` if ``offer`` satisfies ``query``."""
    if query.sandbox is not None and offer.sandbox != query.sandbox:
        return None
    if query.tags and not set(query.tags) <= set(offer.tags):
        return None
    if query.cpu_only:
        price = offer.price_for(CPU_MODEL)
        if offer.free_cpu_slots <= 0 or price is None:
            return None
        if query.max_price is not None and price > query.max_price:
            return None
        return CPU_MODEL, 0, price
    if not query.wants_gpu:
        if not offer.prices:
            return None
        cheapest = min(offer.prices, key=lambda p: (p.price_per_gpu_second, p.model))
        if query.max_price is not None and cheapest.price_per_gpu_second > query.max_price:
            return None
        return cheapest.model, 0, cheapest.price_per_gpu_second
    need = max(1, query.gpu_count)
    free_by_model: dict[str, int] = {}
    for gpu in offer.gpus:
        if gpu.free_slots <= 0 or gpu.vram_bytes < query.min_vram_bytes:
            continue
        if query.model is not None and gpu.model.lower() != query.model.lower():
            continue
        if query.min_cuda_version is not None and gpu.cuda_version < query.min_cuda_version:
            continue
        if (
            query.min_compute_capability is not None
            and gpu.compute_capability < query.min_compute_capability
        ):
            continue
        free_by_model[gpu.model] = free_by_model.get(gpu.model, 0) + 1
    best: tuple[str, int, int] | None = None
    for model, free in free_by_model.items():
        price = offer.price_for(model)
        if free < need or price is None:
            continue
        if query.max_price is not None and price > query.max_price:
            continue
        if best is None or (price, model) < (best[2], best[0]):
            best = (model, need, price)
    return best


class OfferDirectory:
    """Live offers by provider: bounded, deduplicated, newest sequence wins."""

    def __init__(
        self,
        chain_id: str,
        *,
        offers_max: int = directory_offers_max,
        silence_ms_max: int = provider_silence_ms_max,
    ) -> None:
        self._chain_id = chain_id
        self._offers_max = offers_max
        self._silence_ms_max = silence_ms_max
        self._entries: dict[bytes, _Entry] = {}
        self._providers_by_hash: dict[bytes, bytes] = {}
        self._counts: dict[str, int] = {outcome.value: 0 for outcome in AddOutcome}
        self._counts["rejected"] = 0
        self._counts["dropped"] = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, offer: Offer | bytes, now_ms: int) -> AddOutcome:
        """Validate and store ``offer``; raises ``OfferRejected`` (penalise the sender)."""
        if isinstance(offer, bytes | bytearray | memoryview):
            data = bytes(offer)
            offer_hash = ledger.digest(data)
            # Gossip delivers most offers more than once: the exact bytes of a stored offer
            # were validated when first seen, so a repeat costs one SHA-256, no decode/verify.
            if offer_hash in self._providers_by_hash:
                self._counts[AddOutcome.DUPLICATE.value] += 1
                return AddOutcome.DUPLICATE
        else:
            data = None
            offer_hash = ledger.hash_of(offer)
        try:
            if data is not None:
                offer = decode_offer(data)
            assert isinstance(offer, Offer)
            validate_offer(offer, chain_id=self._chain_id, now_ms=now_ms)
        except ComputeError:
            self._counts["rejected"] += 1
            raise
        outcome = self._store(offer, offer_hash, now_ms)
        self._counts[outcome.value] += 1
        return outcome

    def _put(self, offer: Offer, offer_hash: bytes, now_ms: int) -> None:
        provider = bytes(offer.signer)
        old = self._entries.get(provider)
        if old is not None:
            del self._providers_by_hash[old.offer_hash]
        self._entries[provider] = _Entry(offer, offer_hash, now_ms)
        self._providers_by_hash[offer_hash] = provider

    def _remove(self, provider: bytes) -> None:
        entry = self._entries.pop(provider)
        del self._providers_by_hash[entry.offer_hash]

    def _store(self, offer: Offer, offer_hash: bytes, now_ms: int) -> AddOutcome:
        if offer.expiry_ms <= now_ms:
            return AddOutcome.EXPIRED
        current = self._entries.get(bytes(offer.signer))
        if current is not None:
            if offer.sequence < current.offer.sequence:
                return AddOutcome.STALE
            if offer.sequence == current.offer.sequence:
                # Same sequence and different bytes is a provider contradicting itself; the
                # first one seen stands, so every node converges on it, not on arrival order.
                same = offer_hash == current.offer_hash
                return AddOutcome.DUPLICATE if same else AddOutcome.STALE
            self._put(offer, offer_hash, now_ms)
            return AddOutcome.REPLACED
        if len(self._entries) >= self._offers_max:
            self.prune(now_ms)
        if len(self._entries) >= self._offers_max and not self._evict_for(offer):
            return AddOutcome.FULL
        self._put(offer, offer_hash, now_ms)
        return AddOutcome.ADDED

    def _evict_for(self, offer: Offer) -> bool:
        # Make room only by dropping the offer closest to expiry, and only if the newcomer
        # outlives it: a flood of fresh keys cannot push out a provider that keeps beating.
        victim = min(self._entries.values(), key=lambda e: (e.offer.expiry_ms, e.last_heard_ms))
        if victim.offer.expiry_ms >= offer.expiry_ms:
            return False
        self._remove(bytes(victim.offer.signer))
        self._counts["dropped"] += 1
        return True

    def _live(self, entry: _Entry, now_ms: int) -> bool:
        return (
            entry.offer.expiry_ms > now_ms and now_ms - entry.last_heard_ms <= self._silence_ms_max
        )

    def prune(self, now_ms: int) -> int:
        """Drop expired offers and silent providers; returns how many were dropped."""
        dead = [p for p, e in self._entries.items() if not self._live(e, now_ms)]
        for provider in dead:
            self._remove(provider)
        self._counts["dropped"] += len(dead)
        return len(dead)

    def get(self, provider: bytes, now_ms: int) -> Offer | None:
        entry = self._entries.get(bytes(provider))
        return entry.offer if entry is not None and self._live(entry, now_ms) else None

    def offers(self, now_ms: int) -> list[Offer]:
        return [e.offer for e in self._entries.values() if self._live(e, now_ms)]

    def query(self, query: OfferQuery, now_ms: int) -> list[OfferMatch]:
        """Live offers matching ``query``, cheapest first (ties: more free GPUs, then address)."""
        matches: list[OfferMatch] = []
        for entry in self._entries.values():
            if not self._live(entry, now_ms):
                continue
            hit = _match(entry.offer, query)
            if hit is not None:
                model, count, price = hit
                matches.append(OfferMatch(entry.offer, model, count, price, entry.last_heard_ms))
        matches.sort(
            key=lambda m: (m.price_per_gpu_second, -m.offer.free_gpu_count, m.offer.signer)
        )
        return matches[: query.limit]

    def rows(self, query: OfferQuery, now_ms: int) -> list[dict[str, object]]:
        """``query`` as JSON-ready rows: the ``market_offers`` RPC result."""
        return [match.to_json() for match in self.query(query, now_ms)]

    def statistics(self) -> dict[str, int]:
        return {"offers": len(self._entries), **self._counts}
