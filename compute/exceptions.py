"""Errors raised by the compute package.

Offer validation splits in two: ``OfferRejected`` (the sender sent something invalid; the caller
counts it against the sender) and the harmless outcomes (duplicate, stale, expired), which are
return values of ``OfferDirectory.add``, not errors.
"""


class ComputeError(Exception):
    """Base class of every error the compute package raises on purpose."""


class SimulateSpecError(ComputeError, ValueError):
    """Raised when a ``simulate_gpus`` string is malformed or names an unknown GPU model."""


class NvmlUnavailableError(ComputeError):
    """Raised when NVML cannot be used: no library, no driver, or no device answers."""


class OfferRejected(ComputeError):
    """Raised when an offer is invalid; the peer that sent it should be scored down."""


class OfferDecodeError(OfferRejected):
    """Raised when offer bytes are not the canonical encoding of an ``Offer``."""


class OfferSignatureError(OfferRejected):
    """Raised when an offer's signature does not verify for its provider."""


class OfferWrongChainError(OfferRejected):
    """Raised when an offer names another chain id than ours."""


class OfferInvalidError(OfferRejected):
    """Raised when an offer carries impossible values (negative VRAM, bad expiry, huge lists)."""


class AllocationError(ComputeError):
    """Raised when a slot request cannot be satisfied or names an unknown allocation."""


class NoCapacityError(AllocationError):
    """Raised when there are not enough free slots for a request right now."""


class JobSpecError(ComputeError, ValueError):
    """Raised when a job's command, inputs, environment or limits are not acceptable."""


class SandboxError(ComputeError):
    """Raised when the sandbox itself cannot be set up (work directory, bwrap, permissions)."""


class ImageError(ComputeError):
    """Base of the image store's errors."""


class ImageRejected(ImageError):
    """Raised when an archive is malformed, over a limit, fails a digest, or holds an unsafe
    entry (absolute path, ``..``, device node, hard link out of the image)."""


class ImageNotFound(ImageError):
    """Raised when no stored image matches a reference (or a prefix matches several)."""


class ImageBusy(ImageError):
    """Raised when an image that a running job uses is to be removed."""


class ImageToolError(ImageError):
    """Raised when the unpacker (``umoci``) is missing or fails."""


class GpuDriverError(SandboxError):
    """Raised when GPUs were allocated to a job but this machine's NVIDIA driver pieces (the
    GPU's ``/dev/nvidia<minor>``, ``/dev/nvidiactl``, ``libcuda.so``) are not there."""
