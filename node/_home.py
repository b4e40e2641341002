"""The node home directory: what lives where, created once by `gpumesh init`.

```
<home>/
  node_key        hex Ed25519 seed, mode 0600: the node's libp2p identity and ledger address
  config.toml     per-node settings (NodeConfig)
  genesis.json    the chain's genesis (chain id, allocations, validators)
  data/           LevelDB stores (ledger, jobs) and the consensus WAL
  LOCK            flock'd by the running daemon: one daemon per home
  rpc.cookie      RPC bearer token, mode 0600, written at start, removed at stop
  rpc.port        the RPC port actually bound
  node.log        the daemon's log when started by `gpumesh testnet up`
```
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ledger import SigningKey
from node._config import NodeConfig
from node.exceptions import HomeError

if TYPE_CHECKING:
    from collections.abc import Iterator

DEFAULT_HOME = Path("~/.gpumesh")
key_file_mode = 0o600


class Home:
    """Paths of one node home; creating it is `init`, using it is `lock` + `load_*`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()

    @property
    def key_path(self) -> Path:
        return self.root / "node_key"

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def genesis_path(self) -> Path:
        return self.root / "genesis.json"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def lock_path(self) -> Path:
        return self.root / "LOCK"

    @property
    def cookie_path(self) -> Path:
        return self.root / "rpc.cookie"

    @property
    def port_path(self) -> Path:
        return self.root / "rpc.port"

    @property
    def log_path(self) -> Path:
        return self.root / "node.log"

    @property
    def pid_path(self) -> Path:
        return self.root / "node.pid"

    def init(self, config: NodeConfig, key: SigningKey | None = None) -> SigningKey:
        """Create the home with a fresh key (or ``key``) and ``config``; never overwrite a key."""
        if self.key_path.exists():
            raise HomeError(f"{self.key_path} already exists; refusing to overwrite a node key")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.data_dir.mkdir(exist_ok=True, mode=0o700)
        self.make_private()
        key = key or SigningKey.generate()
        write_private(self.key_path, key.seed.hex() + "\n")
        write_atomic(self.config_path, config.to_toml())
        return key

    def load_key(self) -> SigningKey:
        try:
            mode = self.key_path.stat().st_mode & 0o777
            text = self.key_path.read_text().strip()
        except FileNotFoundError:
            raise HomeError(f"no node key at {self.key_path} (run `gpumesh init`)") from None
        if mode & 0o077:
            raise HomeError(f"{self.key_path} is readable by others (mode {mode:o}); chmod 600 it")
        try:
            return SigningKey(bytes.fromhex(text))
        except ValueError:
            raise HomeError(f"{self.key_path} does not hold a 32-byte hex seed") from None

    def load_config(self) -> NodeConfig:
        return NodeConfig.load(self.config_path)

    def make_private(self) -> None:
        """Home and data 0700: the job store holds other people's inputs, the home the key
        and the RPC cookie; no local user (nor a job's uid) may list or read them."""
        for path in (self.root, self.data_dir):
            if path.is_dir():
                os.chmod(path, 0o700)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the home's lock for the daemon's lifetime; a second daemon is refused."""
        self.make_private()  # homes made by older versions were 0755
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                raise HomeError(
                    f"another gpumesh daemon (pid {holder or '?'}) is running on {self.root}"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)


def write_private(path: Path, text: str) -> None:
    """Write a secret file that is 0600 from the moment it exists, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, key_file_mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
