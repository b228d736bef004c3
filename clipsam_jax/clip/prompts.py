"""The compositional prompt ensemble and the text features L (Appendix A, docs/method.md §1).

L for a class is a (2, C_t) array: row 0 the normal-state feature, row 1 the anomalous one
(the paper writes it as C_t × 2). Each sentence is encoded with CLIP's text tower and projected,
L2-normalized, averaged per state group, and the mean normalized again (WinCLIP/APRIL-GAN).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from clipsam_jax.clip.loading import ClipModel, default_cache_dir

# Figure 7a/7b: state-level phrases; "{}" is the object name.
NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")

# Figure 7c: each "a/the" line stands for both articles (29 sentences per state).
_FIGURE_7C = (
    "a bad photo of a/the {}.",
    "a low resolution photo of a/the {}.",
    "a cropped photo of a/the {}.",
    "a bright photo of a/the {}.",
    "a dark photo of a/the {}.",
    "a photo of a/the cool {}.",
    "a black and white photo of a/the {}.",
    "a jpeg corrupted photo of a/the {}.",
    "a blurry photo of a/the {}.",
    "a photo of a/the {}.",
    "a photo of a/the large {}.",
    "a photo of a/the small {}.",
    "there is a/the {} in the scene.",
    "this is a/the {} in the scene.",
    "this is one {} in the scene.",
)
# The six further sentences of APRIL-GAN's code (35 in all).
_APRILGAN_EXTRA = (
    "a photo of my {}.",
    "a photo of one {}.",
    "a close-up photo of a/the {}.",
    "a good photo of a/the {}.",
)

UNKNOWN_OBJECT = "object"  # Appendix A: placeholder when the category is unknown


def _expand(lines: Sequence[str]) -> tuple[str, ...]:
    out = []
    for line in lines:
        if "a/the" in line:
            out += [line.replace("a/the", "a"), line.replace("a/the", "the")]
        else:
            out.append(line)
    return tuple(out)


TEMPLATE_SETS = {
    "clipsam29": _expand(_FIGURE_7C),
    "aprilgan35": _expand(_FIGURE_7C + _APRILGAN_EXTRA),
}


def object_name(
    class_name: str | None, mode: Literal["as_written", "spaced", "object"] = "as_written"
) -> str:
    """The object word of the prompts: the class name as written (Figure 7d: `metal_nut`), or
    with underscores as spaces, or `object` for an unknown class (None or empty)."""
    if not class_name or mode == "object":
        return UNKNOWN_OBJECT
    return class_name.replace("_", " ") if mode == "spaced" else class_name


def build_sentences(name: str, templates: str = "clipsam29") -> tuple[list[str], list[str]]:
    """(normal sentences, anomalous sentences) for one object name: states × templates."""
    if templates not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {templates!r}; choose from {sorted(TEMPLATE_SETS)}")
    lines = TEMPLATE_SETS[templates]
    normal = [t.format(s.format(name)) for s in NORMAL_STATES for t in lines]
    anomalous = [t.format(s.format(name)) for s in ANOMALOUS_STATES for t in lines]
    return normal, anomalous


def make_text_encoder(clip: ClipModel):
    """A jitted `fn(params, input_ids (N, T), attention_mask (N, T)) -> (N, C_t)` of projected
    (not normalized) sentence embeddings, CLIP's `get_text_features`."""

    def forward(module, input_ids, attention_mask):
        position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        pooled = module.text_model(input_ids, attention_mask, position_ids, deterministic=True)[1]
        return module.text_projection(pooled)

    @jax.jit
    def encode(params, input_ids, attention_mask):
        out = clip.module.apply({"params": params}, input_ids, attention_mask, method=forward)
        return out.astype(jnp.float32)

    return encode


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class TextFeatures:
    """Text features L per class, computed once and cached in memory and on disk.

    `features(class_name)` → (2, C_t) float32; `batch(names)` → (B, 2, C_t).
    """

    def __init__(
        self,
        clip: ClipModel,
        templates: str = "clipsam29",
        object_mode: Literal["as_written", "spaced", "object"] = "as_written",
        cache_dir: str | Path | None = None,
        use_disk_cache: bool = True,
        normalization: Literal["sentence_and_mean", "mean"] = "sentence_and_mean",
    ):
        self.clip = clip
        self.templates = templates
        self.normalization = normalization
        self.object_mode = object_mode
        self._encode = make_text_encoder(clip)
        self._memory: dict[str, np.ndarray] = {}
        key = f"{clip.source}|{clip.fingerprint}|{templates}|{normalization}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        self._disk = root / "text" / digest if use_disk_cache else None

    def encode_sentences(self, sentences: Sequence[str]) -> np.ndarray:
        """Projected embeddings of sentences, (N, C_t) float32, not normalized."""
        limit = int(self.clip.config.text_config.max_position_embeddings)
        # Pad to the longest sentence (rounded up to 16: few compiled shapes), not to 77: the
        # text encoder is causal and pools at the end-of-text token, so tokens after it change
        # nothing, and prompt sentences are ~15 tokens, so this is ~4x less work.
        longest = max(len(ids) for ids in self.clip.tokenizer(list(sentences))["input_ids"])
        length = min(limit, -(-longest // 16) * 16)
        tokens = self.clip.tokenizer(
            list(sentences), padding="max_length", max_length=length, truncation=True,
            return_tensors="np",
        )  # fmt: skip
        out = self._encode(self.clip.params, tokens["input_ids"], tokens["attention_mask"])
        return np.asarray(out)

    def features(self, class_name: str | None) -> np.ndarray:
        name = object_name(class_name, self.object_mode)
        if name in self._memory:
            return self._memory[name]
        path = (
            self._disk / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.npy"
            if self._disk
            else None
        )
        if path is not None and path.is_file():
            value = np.load(path)
        else:
            normal, anomalous = build_sentences(name, self.templates)
            embeddings = self.encode_sentences(normal + anomalous)
            if self.normalization == "sentence_and_mean":
                embeddings = _normalize(embeddings)
            groups = (embeddings[: len(normal)], embeddings[len(normal) :])
            value = _normalize(np.stack([g.mean(axis=0) for g in groups])).astype(np.float32)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path.with_suffix(".partial"), "wb") as handle:
                    np.save(handle, value)
                path.with_suffix(".partial").replace(path)
        self._memory[name] = value
        return value

    def batch(self, class_names: Sequence[str | None]) -> np.ndarray:
        """(B, 2, C_t) text features for a batch of class names."""
        return np.stack([self.features(name) for name in class_names])
