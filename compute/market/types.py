"""The market's wire messages, its stored job records, the submission and the config.

Wire messages and records are frozen dataclasses with the one canonical codec
(``ledger.encode`` / ``ledger.decode``); signed ones carry ``TYPE_TAG`` and trailing
``signer`` / ``signature`` fields and go through ``ledger.sign_object``. The codec reads the
field types at runtime, so the types named in fields are imported at runtime here.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar, NewType

from compute.types import RUNTIME_KINDS, SANDBOX_KINDS, OutputFile
from ledger import AgreementTerms, Delivery, Receipt  # noqa: TC001 - as above

MarketJobId = NewType("MarketJobId", bytes)
"""A job's 32-byte id: SHA-256 of its signed ``JobRequest``. Attempt ``n`` of the job trades
on the ledger under ``attempt_job_id(job_id, n)`` (attempt 0 is the job id itself)."""

STRATEGIES: tuple[str, ...] = ("cheapest", "soonest", "least-loaded", "reputation")

# Every limit of the market in one place; a MarketConfig may lower (never raise) the wire ones.
argv_items_max = 256
env_items_max = 64
input_files_max = 1000
output_files_max = 1000
bids_per_job_max = 64
message_bytes_max = 64 * 1024
"""Largest gossip or control message (requests, bids, awards, manifests)."""
manifest_bytes_max = 48 * 1024
"""Largest manifest: it travels inside the award, which is one control message."""
chunk_bytes_max = 1024 * 1024
"""Largest blob chunk one fetch request returns (a p2p response is capped at 16 MiB)."""
log_bytes_max = 1024 * 1024
"""Most stdout (and, separately, stderr) a job record keeps."""
outputs_inline_bytes_max = 1024 * 1024
"""Output files up to this in total also come inline in ``JobResultView.outputs``."""
outputs_bytes_default = 64 * 1024 * 1024
"""A job's declared output cap when the requester gives none (``job submit --max-output``)."""
transfer_rate_bytes_per_s = 8 * 1024 * 1024
"""The rate a trade's deadline allows for moving a job's inputs, image and outputs (well
under the ~25 MiB/s one py-libp2p stream makes here, for a loaded or distant pair)."""
text_chars_max = 4096


class Role(enum.IntEnum):
    REQUESTER = 1
    PROVIDER = 2


class JobState(enum.IntEnum):
    """A job's life on either side; the JSON form is the lower-case name."""

    BIDDING = 1
    AWARDED = 2
    LOCKED = 3
    RUNNING = 4
    SETTLING = 5
    DONE = 6
    FAILED = 7
    CANCELLED = 8
    REFUNDED = 9
    OUTPUT_MISMATCH = 10

    @property
    def terminal(self) -> bool:
        return self >= JobState.DONE

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclasses.dataclass(frozen=True, slots=True)
class Requirements:
    """What a job needs: ``gpus == 0`` means CPU-only; empty model / (0, 0) versions: any."""

    gpus: int = 0
    min_vram_bytes: int = 0
    model: str = ""
    min_compute_capability: tuple[int, int] = (0, 0)
    min_cuda_version: tuple[int, int] = (0, 0)
    sandbox: str = ""
    """The sandbox kind the provider must run the job in (``"bwrap"``, ``"process"``); "": any."""
    memory_bytes: int = 0
    """Memory cap the job runs under (the whole process tree); 0: the provider's default."""
    disk_bytes: int = 0
    """Cap on the job directory's disk use; 0: the provider's default."""
    runtime: str = ""
    """A runtime the provider's offer must list (``"bwrap-image"`` for a job in an image)."""

    def __post_init__(self) -> None:
        if self.sandbox not in ("", *SANDBOX_KINDS):
            raise ValueError(f"sandbox must be one of {', '.join(SANDBOX_KINDS)} (or any)")
        if self.runtime not in ("", *RUNTIME_KINDS):
            raise ValueError(f"runtime must be one of {', '.join(RUNTIME_KINDS)} (or any)")
        if self.memory_bytes < 0 or self.disk_bytes < 0:
            raise ValueError("memory_bytes and disk_bytes must be >= 0")

    def describe(self) -> str:
        if self.gpus == 0:
            return self._describe_sandbox("a CPU slot")
        return self._describe_sandbox(self._describe_gpus())

    def _describe_sandbox(self, text: str) -> str:
        if self.sandbox:
            text += f" in a {self.sandbox} sandbox"
        if self.memory_bytes:
            text += f" with {_gib(self.memory_bytes)} memory"
        if self.disk_bytes:
            text += f" and {_gib(self.disk_bytes)} disk"
        if self.runtime:
            text += f" with the {self.runtime} runtime"
        return text

    def _describe_gpus(self) -> str:
        text = f">= {self.gpus} GPU{'s' if self.gpus > 1 else ''}"
        if self.model:
            text += f" of model {self.model}"
        if self.min_vram_bytes:
            text += f" with >= {_gib(self.min_vram_bytes)} VRAM"
        if self.min_compute_capability != (0, 0):
            major, minor = self.min_compute_capability
            text += f", compute capability >= {major}.{minor}"
        if self.min_cuda_version != (0, 0):
            major, minor = self.min_cuda_version
            text += f", CUDA >= {major}.{minor}"
        return text

    def to_json(self) -> dict[str, object]:
        return {
            "gpus": self.gpus,
            "min_vram_bytes": self.min_vram_bytes,
            "model": self.model or None,
            "min_compute_capability": "{}.{}".format(*self.min_compute_capability),
            "min_cuda_version": "{}.{}".format(*self.min_cuda_version),
            "sandbox": self.sandbox or None,
            "memory_bytes": self.memory_bytes,
            "disk_bytes": self.disk_bytes,
            "runtime": self.runtime or None,
        }


def _gib(size: int) -> str:
    return f"{size / 1024**3:g} GB"


@dataclasses.dataclass(frozen=True, slots=True)
class InputRef:
    """One input file of a job, content addressed: ``root`` is its blob root (the format is
    in ``_blobs``), which names the chunk-hash index the provider fetches and checks first."""

    name: str
    root: bytes
    size_bytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class ImageDescriptor:
    """The container image a job runs in (``_imagemesh``): the sha256 and size of its OCI
    image manifest, which names the config and layer blobs the provider fetches by digest."""

    manifest_sha256: bytes
    manifest_bytes: int
    total_bytes: int
    """Manifest, config and layers together, as the requester's store holds them."""


@dataclasses.dataclass(frozen=True, slots=True)
class JobManifest:
    """What the provider fetches first: the command and the input files' digests. The
    request carries ``hash_of(manifest)``, so a provider can check it got the right one."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    inputs: tuple[InputRef, ...]
    image: ImageDescriptor | None = None
    """The image to run in (its root as ``/``); ``None``: the provider's host ``/usr``."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class JobRequest:
    """Gossiped on purpose ``jobs`` by the requester's node; its hash is the job id."""

    TYPE_TAG: ClassVar[str] = "gpumesh/market/job-request/1"
    chain_id: str
    created_ms: int
    requirements: Requirements
    max_price_per_gpu_second: int
    max_wall_ms: int
    deadline_ms: int
    bid_window_ms: int
    manifest_digest: bytes
    inputs_bytes: int
    replica: int = 0
    """Which run of a verified job this is (``--verify N``: replicas 0..N-1, then maybe one
    more); it also keeps the replicas' job ids apart."""
    outputs_bytes_max: int = outputs_bytes_default
    """The most output bytes this job may deliver (``JobSubmission.outputs_bytes_max``)."""
    signer: bytes = b""
    signature: bytes = b""

    def max_cost(self, price_per_gpu_second: int) -> int:
        """The escrow at ``price``: the whole wall-time budget on every slot."""
        return price_per_gpu_second * max(self.requirements.gpus, 1) * self.max_wall_ms // 1000


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Bid:
    """A provider's answer to a job request, sent on a direct stream to the requester."""

    TYPE_TAG: ClassVar[str] = "gpumesh/market/bid/1"
    job_id: bytes
    price_per_gpu_second: int
    gpus: int
    model: str
    expected_start_ms: int
    free_slots: int
    reservation_expiry_ms: int
    signer: bytes = b""
    signature: bytes = b""

    def to_json(self) -> dict[str, object]:
        return {
            "provider": self.signer.hex(),
            "price_per_gpu_second": self.price_per_gpu_second,
            "gpus": self.gpus,
            "model": self.model,
            "expected_start_ms": self.expected_start_ms,
            "free_slots": self.free_slots,
            "reservation_expiry_ms": self.reservation_expiry_ms,
        }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Award:
    """The requester's acceptance of a bid; the provider answers with signed ``AgreementTerms``."""

    TYPE_TAG: ClassVar[str] = "gpumesh/market/award/1"
    job_id: bytes
    request: JobRequest
    attempt: int
    attempt_job_id: bytes
    provider: bytes
    price_per_gpu_second: int
    gpus: int
    max_cost: int
    deadline_ms: int
    manifest: JobManifest
    """What to run, so the provider checks it before it takes a slot (its hash must be the
    request's ``manifest_digest``)."""
    group_id: bytes
    """The logical job this attempt belongs to (every attempt and ``--verify`` replica of one
    job shares it); goes into the trade's terms so the chain can compare replicas."""
    signer: bytes = b""
    signature: bytes = b""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CancelNotice:
    """The requester tells the provider to stop an attempt (the Cancel tx is the authority)."""

    TYPE_TAG: ClassVar[str] = "gpumesh/market/cancel/1"
    attempt_job_id: bytes
    signer: bytes = b""
    signature: bytes = b""


@dataclasses.dataclass(frozen=True, slots=True)
class BlobRequest:
    """Fetch ``sha256``'s bytes from ``offset`` (inputs: from the requester; outputs: from
    the provider), scoped to one job so a peer can only read what belongs to it."""

    job_id: bytes
    sha256: bytes
    offset: int


@dataclasses.dataclass(frozen=True, slots=True)
class OutputsInfo:
    """The provider's answer to an outputs request: what to fetch and what the job said."""

    files: tuple[OutputFile, ...]
    stdout: bytes
    stderr: bytes
    outcome: str = "succeeded"
    """The sandbox's verdict on the run (``compute.JobOutcome``): a run stopped at a limit
    (``output_limit``, ``timed_out``, ...) delivers no files, and this says why."""
    reason: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class RunResult:
    """What a provider measured, kept with the job so a restart can resubmit the receipt."""

    outcome: str
    reason: str
    exit_status: int
    wall_ms: int
    outputs_digest: bytes
    files: tuple[OutputFile, ...]
    stdout: bytes
    stderr: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Stamp:
    state: JobState
    at_ms: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class JobRecord:
    """One job as this node sees it, as one side (requester or provider); persisted whole."""

    role: Role
    job_id: bytes
    state: JobState
    request: JobRequest
    strategy: str = "cheapest"
    attempt: int = 0
    attempt_job_id: bytes = b""
    counterparty: bytes = b""
    """The provider (for the requester) or the requester (for the provider)."""
    counterparty_peer_id: str = ""
    terms: AgreementTerms | None = None
    agreement_tx: bytes = b""
    receipt_tx: bytes = b""
    receipt: Receipt | None = None
    cost: int = 0
    error: str = ""
    bids: tuple[Bid, ...] = ()
    bid_peers: tuple[str, ...] = ()
    """Peer id of each bid's sender, in ``bids`` order."""
    tried: tuple[bytes, ...] = ()
    """Providers already tried (a failed attempt is not retried with the same provider)."""
    result: RunResult | None = None
    outputs: tuple[OutputFile, ...] = ()
    """Requester: the verified output files (their bytes are blobs in the store)."""
    cancel_requested: bool = False
    """Requester: the user asked to cancel. Provider: it owes the chain its own Cancel of an
    attempt it will not deliver (so an honest provider is never slashed for it)."""
    bid_rounds: int = 0
    """Bid rounds held so far (a round whose every bidder refused the award is repeated)."""
    group_id: bytes = b""
    """Requester, verified job: the group's id (replica 0's job id), shared by every replica;
    empty for a job run once."""
    verify: int = 1
    """Requester: how many replicas of the group must run (a majority of them must agree)."""
    stamps: tuple[Stamp, ...] = ()
    deliveries: tuple[Delivery, ...] = ()
    """Requester, verified job: the checked delivery of each of this replica's attempts that
    delivered (one per attempt, ``Delivery.job_id`` its attempt job id, in attempt order),
    kept across retries and restarts: the last is the replica's vote, and every one the
    majority outvotes is slash evidence."""

    def to_json(self) -> dict[str, object]:
        stamps: dict[str, int] = {}
        for stamp in self.stamps:
            stamps.setdefault(stamp.state.label, stamp.at_ms)
        terms = self.terms
        receipt = self.receipt
        return {
            "id": self.job_id.hex(),
            "role": self.role.name.lower(),
            "state": self.state.label,
            "attempt": self.attempt,
            "attempt_job_id": self.attempt_job_id.hex(),
            "requester": self.request.signer.hex(),
            "provider": terms.provider.hex() if terms is not None else None,
            "price_per_gpu_second": terms.price_per_gpu_second if terms is not None else None,
            "max_cost": terms.max_cost if terms is not None else None,
            "cost": self.cost,
            "requirements": self.request.requirements.to_json(),
            "max_price_per_gpu_second": self.request.max_price_per_gpu_second,
            "max_wall_ms": self.request.max_wall_ms,
            "deadline_ms": self.request.deadline_ms,
            "strategy": self.strategy,
            "group_id": self.group_id.hex() or None,
            "replica": self.request.replica,
            "verify": self.verify,
            "bids": len(self.bids),
            "error": self.error or None,
            "agreement_tx": self.agreement_tx.hex() or None,
            "receipt_tx": self.receipt_tx.hex() or None,
            "receipt": None
            if receipt is None
            else {
                "output_root": receipt.delivery.output_root.hex(),
                "plain_root": receipt.delivery.plain_root.hex(),
                "wall_ms": receipt.wall_ms,
                "exit_status": receipt.exit_status,
            },
            "timestamps": stamps,
        }


@dataclasses.dataclass(frozen=True)
class JobSubmission:
    """What a user asks for (from RPC or the CLI). ``deadline_ms`` 0 means ``now +
    default_deadline_ms``; ``bid_window_ms`` 0 means the config's default."""

    argv: tuple[str, ...]
    inputs: tuple[tuple[str, bytes], ...] = ()
    """Small inputs given inline: name -> bytes."""
    input_paths: tuple[tuple[str, str], ...] = ()
    """Inputs given as files on this machine: name -> absolute path (copied, or reflinked,
    into the node's blob store before the job is acknowledged)."""
    env: tuple[tuple[str, str], ...] = ()
    requirements: Requirements = Requirements()
    max_price_per_gpu_second: int = 0
    max_wall_ms: int = 60_000
    deadline_ms: int = 0
    bid_window_ms: int = 0
    strategy: str = "cheapest"
    verify: int = 1
    """Run on this many distinct providers and pay only those whose outputs agree with the
    majority (1: once, unless the node's spot-check rate picks it for a second run)."""
    image: str = ""
    """An image of the requester's image store (reference or unique prefix); "": none."""
    outputs_bytes_max: int = outputs_bytes_default
    """The most output bytes the job may deliver (the provider caps the sandbox's output
    size at it, the requester refuses more); the trade's deadline allows for moving them."""


@dataclasses.dataclass(frozen=True)
class JobResultView:
    """What ``MarketService.result`` returns to a requester."""

    job_id: bytes
    state: JobState
    outputs: dict[str, bytes]
    """The output files' bytes, only when they add up to ``outputs_inline_bytes_max`` at
    most (else empty: read them from ``output_dir``)."""
    stdout: bytes
    stderr: bytes
    receipt: Receipt | None
    files: tuple[OutputFile, ...] = ()
    output_dir: str = ""
    """Where the opened output files lie on this node (``files``' paths are under it)."""


@dataclasses.dataclass(frozen=True)
class MarketConfig:
    """Per-node market knobs; every time is milliseconds, every size bytes."""

    bid_window_ms: int = 2_000
    default_deadline_ms: int = 3_600_000
    attempt_slack_ms: int = 30_000
    """An attempt's trade deadline is ``now + max_wall_ms + attempt_slack_ms`` (capped by the
    job's deadline): time for fetching inputs and settling. Past it the requester refunds."""
    award_open_timeout_ms: int = 30_000
    """How long a provider holds slots for an award whose trade has not opened on chain."""
    reservation_ms: int = 10_000
    inputs_bytes_max: int = 16 * 1024**3
    """Most input bytes of one job: a requester refuses to submit more, a provider to bid
    on (or accept) more; it also needs that much free disk beside its blob store."""
    outputs_bytes_max: int = 16 * 1024**3
    """Most output bytes of one job a requester fetches (it also needs twice that free disk:
    the sealed copy while fetching, the opened files)."""
    outputs_dir: str = ""
    """Requester: where fetched and opened outputs go (``_exchange.outputs_root``); empty:
    beside the job store."""
    request_timeout_s: float = 10.0
    stake: int = 0
    """A provider keeps at least this much bonded (and at least the chain's
    ``provider_bond_min``): it stakes from its balance at start and whenever a slash or an
    unbond takes the bond below that. 0: just the chain's minimum."""
    spot_check_rate: float = 0.0
    """Share of this node's jobs (0..1) re-run on a second provider, as if ``verify=2``."""
    bid_timeout_ms: int = 2_000
    """How long a provider waits for a requester to take its bid (a requester that holds bid
    streams open costs the provider this long, per bid, at most)."""
    jobs_active_max: int = 64
    fee: int = 0
    wait_for_open: bool = True
    """Provider starts a job only once it sees the trade OPEN on chain (the safe default)."""
    image_cache_bytes_max: int = 64 * 1024**3
    """Provider: images fetched for jobs past this are evicted, least recently used first."""
    image_registry: str = ""
    """Provider: a skopeo source with ``{hex}`` to pull a job's image from before asking the
    requester ("": always from the requester)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool | str):
                continue
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"[market] {field.name} must be a number >= 0")
        if not 0 < self.bid_window_ms <= 60_000:
            raise ValueError("[market] bid_window_ms must be 1..60000")
        if not 0 < self.request_timeout_s <= 120:
            raise ValueError("[market] request_timeout_s must be in (0, 120]")
        if not 0 <= self.spot_check_rate <= 1:
            raise ValueError("[market] spot_check_rate must be in 0..1")
        if not 1 <= self.jobs_active_max <= 10_000:
            raise ValueError("[market] jobs_active_max must be 1..10000")

    @classmethod
    def default(cls) -> MarketConfig:
        return cls()

    @classmethod
    def for_tests(cls, **overrides: object) -> MarketConfig:
        values: dict[str, object] = {
            # Long enough for a bid's stream to open on a machine loaded far past its cores
            # (measured 1-1.3 s per new stream at load average 37 on 2 cores).
            "bid_window_ms": 1_500,
            "attempt_slack_ms": 4_000,
            "award_open_timeout_ms": 5_000,
            "reservation_ms": 3_000,
            "request_timeout_s": 5.0,
            "bid_timeout_ms": 5_000,
        }
        values.update(overrides)
        return dataclasses.replace(cls(), **values)  # type: ignore[arg-type]
