"""The node's per-machine configuration (config.toml): one frozen, validated object per section.

Chain-wide parameters (chain id, allocations, validators) live in genesis.json, not here.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from typing import TYPE_CHECKING, Any, Literal

from node.exceptions import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

LogFormat = Literal["plain", "json"]
port_max = 65535
peers_max_limit = 1024


@dataclasses.dataclass(frozen=True)
class NodeSection:
    chain_id: str = "gpumesh-dev"
    log_format: LogFormat = "plain"
    log_levels: str = "info"
    """A default level, then per-subsystem overrides: ``"info,p2p=debug,libp2p=warning"``."""

    def __post_init__(self) -> None:
        if not self.chain_id or len(self.chain_id) > 64 or not self.chain_id.isascii():
            raise ConfigError("[node] chain_id must be 1-64 ASCII characters")
        if self.log_format not in ("plain", "json"):
            raise ConfigError('[node] log_format must be "plain" or "json"')


@dataclasses.dataclass(frozen=True)
class P2PSection:
    listen_host: str = "127.0.0.1"
    listen_port: int = 7700
    bootstrap: tuple[str, ...] = ()
    mdns: bool = True
    dht: bool = True
    peers_max: int = 64

    def __post_init__(self) -> None:
        if self.listen_host in ("0.0.0.0", "::", ""):
            # libp2p advertises the wildcard address and peers cannot dial it.
            raise ConfigError("[p2p] listen_host must be a concrete address, not a wildcard")
        if not 0 <= self.listen_port <= port_max:
            raise ConfigError(f"[p2p] listen_port must be 0-{port_max}")
        if not 1 <= self.peers_max <= peers_max_limit:
            raise ConfigError(f"[p2p] peers_max must be 1-{peers_max_limit}")
        for addr in self.bootstrap:
            if not addr.startswith("/") or "/p2p/" not in addr:
                raise ConfigError(f"[p2p] bootstrap entry {addr!r} is not a .../p2p/<id> address")


@dataclasses.dataclass(frozen=True)
class RpcSection:
    host: str = "127.0.0.1"
    port: int = 7800

    def __post_init__(self) -> None:
        if not 0 <= self.port <= port_max:
            raise ConfigError(f"[rpc] port must be 0-{port_max}")


@dataclasses.dataclass(frozen=True)
class ComputeSection:
    simulate_gpus: str = ""
    """Simulated devices for GPU-less machines, e.g. ``"A100-80GB:2,RTX4090:1"``."""
    provider: bool = True
    """Whether this node offers its devices (or its CPU, with no GPU) to the market."""
    price_per_gpu_second: int = 100
    tags: tuple[str, ...] = ()
    sandbox: str = "bwrap"
    """``"bwrap"``: provide only if bubblewrap works here (probed at start). ``"process"``:
    plain processes without filesystem or network isolation; must be chosen explicitly."""
    job_uid_first: int = 1_900_000_000
    """Each running job gets its own uid (and a gid of the same number) from
    ``job_uid_first .. job_uid_first + job_uid_count - 1`` (the daemon must run as root)."""
    job_uid_count: int = 1024
    job_memory_bytes_max: int = 4 * 2**30
    """Most memory a requester may ask a job to run with (advertised in the offer)."""
    job_disk_bytes_max: int = 4 * 2**30
    """Most disk a requester may ask for its job directory (advertised in the offer)."""
    job_dir_retention_s: int = 24 * 3600
    """A finished job's directory is deleted once its trade settled and its outputs were
    fetched, or at the latest this long after the job ended (also swept at start)."""

    def __post_init__(self) -> None:
        if self.price_per_gpu_second < 0:
            raise ConfigError("[compute] price_per_gpu_second must be >= 0")
        if not 0 < self.job_uid_first or self.job_uid_first + self.job_uid_count >= 2**32 - 1:
            raise ConfigError("[compute] job uids must lie in 1 .. 2**32 - 2")
        if not 0 < self.job_uid_count <= 65536:
            raise ConfigError("[compute] job_uid_count must be 1..65536")
        if self.job_memory_bytes_max <= 0 or self.job_disk_bytes_max <= 0:
            raise ConfigError("[compute] job_memory_bytes_max and job_disk_bytes_max must be > 0")
        if self.job_dir_retention_s < 0:
            raise ConfigError("[compute] job_dir_retention_s must be >= 0")
        if self.sandbox not in ("bwrap", "process"):
            raise ConfigError('[compute] sandbox must be "bwrap" or "process"')


@dataclasses.dataclass(frozen=True)
class ConsensusSection:
    create_empty_blocks: bool = False
    timeout_propose_ms: int = 3000
    timeout_commit_ms: int = 200
    """Pause after a commit before the next height: lets votes of slow validators land."""
    empty_block_interval_ms: int = 2000
    """An idle chain still makes a block this often (0: never). Refunds need it: a refund
    is valid only in a block whose time is past the trade's deadline. ~3 ms CPU per block."""

    def __post_init__(self) -> None:
        if self.empty_block_interval_ms < 0:
            raise ConfigError("[consensus] empty_block_interval_ms must be >= 0")
        if self.timeout_propose_ms <= 0 or self.timeout_commit_ms < 0:
            raise ConfigError("[consensus] timeouts must be > 0 ms")


@dataclasses.dataclass(frozen=True)
class MarketSection:
    """The job market's per-node knobs (chain-wide rules such as fee_min and
    provider_bond_min live in genesis)."""

    stake: int = 0
    """A provider keeps at least this bonded (and at least the chain's provider_bond_min),
    staking from its balance at start and after a slash; 0: just the chain's minimum."""
    fee: int = 0
    """Fee of each market transaction; the chain's fee_min when higher."""
    bid_window_ms: int = 2000
    """Default bid window of a job submitted here."""
    bid_timeout_ms: int = 2000
    """How long this node, as a provider, waits for a requester to take its bid."""
    spot_check_percent: int = 0
    """Share (0..100 %) of the jobs submitted here that also run on a second provider, paid
    only if both agree (as ``job submit --verify 2``)."""
    inputs_bytes_max: int = 16 * 1024**3
    """Most input bytes of one job: submitted here, or bid on and fetched as a provider."""
    outputs_bytes_max: int = 16 * 1024**3
    """Most output bytes of one job this node fetches as a requester (it needs about twice
    that free disk under ``<data>/blobs/outputs``: the sealed copy, then the opened files)."""

    def __post_init__(self) -> None:
        if not 0 <= self.spot_check_percent <= 100:
            raise ConfigError("[market] spot_check_percent must be in 0..100")
        if self.stake < 0 or self.fee < 0:
            raise ConfigError("[market] stake and fee must be >= 0")
        if self.inputs_bytes_max < 0:
            raise ConfigError("[market] inputs_bytes_max must be >= 0")
        if self.outputs_bytes_max < 0:
            raise ConfigError("[market] outputs_bytes_max must be >= 0")
        if not 0 < self.bid_window_ms <= 60_000:
            raise ConfigError("[market] bid_window_ms must be 1..60000")
        if not 0 < self.bid_timeout_ms <= 60_000:
            raise ConfigError("[market] bid_timeout_ms must be 1..60000")


@dataclasses.dataclass(frozen=True)
class ImagesSection:
    """The node's container image store (``gpumesh image``) and, as a provider, its cache of
    the images jobs bring over the mesh."""

    cache_bytes_max: int = 64 * 1024**3
    """Past this, images fetched for jobs are evicted, least recently used first (never one a
    job runs in, never one imported with ``gpumesh image import``)."""
    registry: str = ""
    """As a provider, pull a job's image from here before asking its requester: a skopeo
    source with ``{hex}`` for the manifest digest, e.g.
    ``docker://mirror.example/gpumesh@sha256:{hex}`` or ``oci:/srv/images:{hex}`` (needs
    ``skopeo``; a failed pull falls back to the requester)."""

    def __post_init__(self) -> None:
        if self.cache_bytes_max < 0:
            raise ConfigError("[images] cache_bytes_max must be >= 0")
        if self.registry and (
            "{hex}" not in self.registry or not self.registry.startswith(("docker://", "oci:"))
        ):
            raise ConfigError(
                '[images] registry must start with "docker://" or "oci:" and contain {hex}'
            )


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    node: NodeSection = dataclasses.field(default_factory=NodeSection)
    p2p: P2PSection = dataclasses.field(default_factory=P2PSection)
    rpc: RpcSection = dataclasses.field(default_factory=RpcSection)
    compute: ComputeSection = dataclasses.field(default_factory=ComputeSection)
    consensus: ConsensusSection = dataclasses.field(default_factory=ConsensusSection)
    market: MarketSection = dataclasses.field(default_factory=MarketSection)
    images: ImagesSection = dataclasses.field(default_factory=ImagesSection)

    @classmethod
    def default(cls) -> NodeConfig:
        return cls()

    @classmethod
    def for_tests(cls, chain_id: str = "gpumesh-test") -> NodeConfig:
        """Ephemeral ports, no mDNS: tests must not hear each other's nodes."""
        return cls(
            node=NodeSection(chain_id=chain_id),
            p2p=P2PSection(listen_port=0, mdns=False),
            rpc=RpcSection(port=0),
        )

    def replace(self, **sections: Any) -> NodeConfig:
        """A copy with some sections replaced, or with section keys: ``p2p={"mdns": False}``."""
        changes: dict[str, Any] = {}
        for name, value in sections.items():
            if isinstance(value, dict):
                value = dataclasses.replace(getattr(self, name), **value)
            changes[name] = value
        return dataclasses.replace(self, **changes)

    # -- TOML ------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeConfig:
        sections: dict[str, Any] = {}
        known = {f.name: f for f in dataclasses.fields(cls)}
        for name, table in data.items():
            if name not in known:
                raise ConfigError(f"unknown section [{name}]")
            if not isinstance(table, dict):
                raise ConfigError(f"[{name}] must be a table")
            section_cls = type(getattr(cls(), name))
            sections[name] = _section_from_dict(section_cls, name, table)
        return cls(**sections)

    @classmethod
    def load(cls, path: Path) -> NodeConfig:
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config file at {path} (run `gpumesh init`)") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        return cls.from_dict(data)

    def to_toml(self) -> str:
        lines = ["# gpumesh node configuration. Chain-wide settings live in genesis.json."]
        for section in dataclasses.fields(self):
            lines.append(f"\n[{section.name}]")
            value = getattr(self, section.name)
            for f in dataclasses.fields(value):
                lines.append(f"{f.name} = {_toml_value(getattr(value, f.name))}")
        return "\n".join(lines) + "\n"


def _section_from_dict(section_cls: type[Any], name: str, table: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    kwargs: dict[str, Any] = {}
    defaults = section_cls()
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"[{name}] unknown key {key!r}")
        expected = type(getattr(defaults, key))
        if expected is tuple:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"[{name}] {key} must be a list of strings")
            value = tuple(value)
        elif expected is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"[{name}] {key} must be true or false")
        elif expected is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"[{name}] {key} must be an integer")
        elif not isinstance(value, expected):
            raise ConfigError(f"[{name}] {key} must be a {expected.__name__}")
        kwargs[key] = value
    return section_cls(**kwargs)


def _toml_value(value: Any) -> str:
    # JSON string escapes are valid TOML basic-string escapes for everything we write.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
