"""`gpumesh image import|ls|rm` against a live node, and the runtimes its offer advertises."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from compute import testing
from node import _testnet
from node.cli import main

CI = os.environ.get("CI") == "true"


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> object:
    rc = main([*argv, "--json"])
    out = capsys.readouterr()
    assert rc == 0, f"gpumesh {' '.join(argv)} exited {rc}: {out.err}"
    return json.loads(out.out)


def test_image_import_ls_rm_against_a_live_node(
    testnet: _testnet.TestnetLayout, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = [t for t in ("umoci", testing.BUSYBOX) if shutil.which(t) is None]
    if missing:
        if CI:
            pytest.fail(f"CI=true and {missing} missing (scripts/setup.sh installs them)")
        pytest.skip(f"{missing} not installed")
    home = str(testnet.nodes[0].home)
    archive = testing.write_docker_archive(tmp_path / "busybox.tar", testing.busybox_layers())
    assert main(["image", "import", str(archive), "--home", home]) == 0
    ref = capsys.readouterr().out.strip()
    assert ref.startswith("sha256:") and len(ref) == 71, f"import printed {ref!r}"
    again = run_json(capsys, "image", "import", str(archive), "--home", home)
    assert isinstance(again, dict) and again["ref"] == ref and again["done"] is True
    listed = run_json(capsys, "image", "ls", "--home", home)
    assert isinstance(listed, list) and [i["ref"] for i in listed] == [ref]
    assert listed[0]["config"]["working_dir"] == "/app"
    assert main(["image", "ls", "--home", home]) == 0
    table = capsys.readouterr().out
    assert ref.removeprefix("sha256:")[:12] in table and "docker" in table

    offers = run_json(capsys, "offers", "--home", str(testnet.nodes[1].home))
    assert isinstance(offers, list) and offers
    assert "bwrap-image" in offers[0]["runtimes"], "the provider's offer must say it runs images"

    (tmp_path / "junk.tar").write_bytes(b"not a tar at all")
    assert main(["image", "import", str(tmp_path / "junk.tar"), "--home", home]) == 1
    assert "not a tar archive" in capsys.readouterr().err
    assert main(["image", "rm", "sha256:" + "0" * 64, "--home", home]) == 1
    assert "no image" in capsys.readouterr().err

    removed = run_json(capsys, "image", "rm", ref.removeprefix("sha256:")[:12], "--home", home)
    assert isinstance(removed, dict) and removed["ref"] == ref
    assert run_json(capsys, "image", "ls", "--home", home) == []
    spec = run_json(capsys, "rpc", "--home", home, "rpc_discover")
    assert isinstance(spec, dict)
    names = {m["name"] for m in spec["methods"]}
    assert {"image_import", "image_list", "image_remove"} <= names, "methods not in OpenRPC"


def test_the_images_section_validates_its_registry_and_cache() -> None:
    from node._config import NodeConfig
    from node.exceptions import ConfigError

    config = NodeConfig.from_dict(
        {"images": {"registry": "oci:/srv/images:{hex}", "cache_bytes_max": 1 << 30}}
    )
    assert config.images.registry == "oci:/srv/images:{hex}"
    assert "[images]" in config.to_toml()
    for bad in ("docker://mirror.example/gpumesh", "https://mirror/{hex}"):
        with pytest.raises(ConfigError, match=r"\[images\] registry"):
            NodeConfig.from_dict({"images": {"registry": bad}})
    with pytest.raises(ConfigError, match="cache_bytes_max"):
        NodeConfig.from_dict({"images": {"cache_bytes_max": -1}})
