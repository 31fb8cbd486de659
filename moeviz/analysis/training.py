"""How routing changed while a model trained, from the routing history that
`scripts/train_bundled.py` keeps instead of weight checkpoints: the held-out samples' selected
experts at ~8 points of training (`training_history.json` and `.npz` in the model's folder).

- router saturation (OLMoE, arXiv 2409.02060, Eq. 5): at point t, the mean over tokens of
  |E_t ∩ E_T| / k, the share of a token's top-k experts at t that the final model T also picks;
- load CV (standard deviation over mean of the experts' loads) and MaxVio (arXiv 2408.15664
  Eq. 4: (max load − mean load) / mean load), per MoE layer, over the held-out samples;
- for auxiliary-loss-free balancing (DeepSeek), the selection bias of every expert.

A history file is read like any user file: no pickle, sizes checked before anything is
decompressed, every array checked against the manifest. No torch.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST, ARRAYS = "training_history.json", "training_history.npz"
MAX_ARRAY_BYTES = 256 * 2**20  # decompressed, per array: a bundled model's history is ~3 MB
MAX_MANIFEST_BYTES = 2**20


class HistoryError(ValueError):
    """A training history that is missing pieces, inconsistent or too large."""


@dataclass(frozen=True)
class TrainingHistory:
    """experts: int16[points, samples, moe_layers, tokens, k], each token's experts by weight,
    -1 past a sample's end; lengths: int[samples]; biases: float[points, moe_layers, experts]
    or None; points: one dict per point (step, tokens, elapsed_s, heldout_loss)."""

    arch: str
    samples: list[str]
    moe_layers: list[int]
    num_experts: int
    top_k: int
    shared_experts: int
    points: list[dict]
    experts: np.ndarray
    lengths: np.ndarray
    biases: np.ndarray | None

    @property
    def steps(self) -> list[int]:
        return [int(p["step"]) for p in self.points]


def has_history(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / MANIFEST).is_file() and (folder / ARRAYS).is_file()


def read_history(folder: str | Path) -> TrainingHistory:
    """The history in a model folder, checked; HistoryError says what is wrong."""
    folder = Path(folder)
    if not has_history(folder):
        raise HistoryError(f"{folder} has no training history ({MANIFEST} and {ARRAYS}).")
    if (folder / MANIFEST).stat().st_size > MAX_MANIFEST_BYTES:
        raise HistoryError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES:,} bytes.")
    arrays = _load_arrays(folder / ARRAYS)
    try:
        meta = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        history = TrainingHistory(
            arch=str(meta["arch"]), samples=[str(s) for s in meta["samples"]],
            moe_layers=[int(i) for i in meta["moe_layers"]], num_experts=int(meta["num_experts"]),
            top_k=int(meta["top_k"]), shared_experts=int(meta.get("shared_experts", 0)),
            points=[dict(p) for p in meta["points"]], experts=arrays["experts"], lengths=arrays["lengths"],
            biases=arrays.get("biases"),
        )
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as error:
        raise HistoryError(f"The training history in {folder} cannot be read: {error}") from error
    _check(history)
    return history


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.file_size > MAX_ARRAY_BYTES:
                    raise HistoryError(f"{member.filename} in {path} holds {member.file_size:,} bytes "
                                       f"uncompressed, more than {MAX_ARRAY_BYTES:,}.")
        with np.load(path, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}
    except HistoryError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:  # ValueError: object arrays (pickles)
        raise HistoryError(f"{path} is not a NumPy archive of plain arrays: {error}") from error


def _check(h: TrainingHistory) -> None:
    shape = (len(h.points), len(h.samples), len(h.moe_layers))
    if h.experts.ndim != 5 or h.experts.shape[:3] != shape or h.experts.shape[4] != h.top_k:
        raise HistoryError(f"experts has shape {h.experts.shape}; the manifest needs {shape} + (tokens, {h.top_k}).")
    if not np.issubdtype(h.experts.dtype, np.integer) or not np.issubdtype(h.lengths.dtype, np.integer):
        raise HistoryError("expert ids and lengths must be integers.")
    if not h.points or not h.samples or not h.moe_layers or not 1 <= h.top_k <= h.num_experts:
        raise HistoryError("the history needs points, samples, MoE layers and 1 <= k <= experts.")
    if h.lengths.shape != (len(h.samples),) or h.lengths.min() < 1 or h.lengths.max() > h.experts.shape[3]:
        raise HistoryError(f"lengths {h.lengths.tolist()} do not fit {h.experts.shape[3]} tokens.")
    valid = valid_tokens(h)
    ids = h.experts[np.broadcast_to(valid[None, :, None, :], h.experts.shape[:4])]
    if ids.size and (ids.min() < 0 or ids.max() >= h.num_experts):
        raise HistoryError(f"expert ids must lie in 0..{h.num_experts - 1}.")
    if h.biases is not None and h.biases.shape != (len(h.points), len(h.moe_layers), h.num_experts):
        raise HistoryError(f"biases has shape {h.biases.shape}, not {(len(h.points), len(h.moe_layers), h.num_experts)}.")


def valid_tokens(h: TrainingHistory) -> np.ndarray:
    """bool[samples, tokens]: the tokens each sample has (the rest is padding)."""
    return np.arange(h.experts.shape[3])[None, :] < h.lengths[:, None]


def saturation(h: TrainingHistory) -> np.ndarray:
    """Router saturation against the final point (OLMoE Eq. 5), over all held-out tokens.
    float[points, moe_layers]: 1.0 at the final point."""
    final = h.experts[-1]  # [samples, layers, tokens, k]
    # |E_t ∩ E_T| per token: each of E_t's k experts counts if the final model picked it too.
    shared = (h.experts[..., :, None] == final[None, ..., None, :]).any(axis=-1).sum(axis=-1)
    valid = valid_tokens(h)[None, :, None, :]
    return (shared * valid).sum(axis=(1, 3)) / (valid.sum() * h.top_k)


def expert_loads(h: TrainingHistory) -> np.ndarray:
    """Each expert's share of the held-out top-k selections. float[points, moe_layers, experts]"""
    valid = np.broadcast_to(valid_tokens(h)[None, :, None, :, None], h.experts.shape)
    ids = np.where(valid, h.experts.astype(np.int64), h.num_experts)  # padding counts in an extra bin
    counts = np.zeros((*h.experts.shape[:1], h.experts.shape[2], h.num_experts + 1))
    for p in range(counts.shape[0]):
        for layer in range(counts.shape[1]):
            counts[p, layer] = np.bincount(ids[p, :, layer].ravel(), minlength=h.num_experts + 1)
    counts = counts[..., :h.num_experts]
    return counts / counts.sum(axis=-1, keepdims=True)


def load_cv(loads: np.ndarray) -> np.ndarray:
    """Coefficient of variation over experts (population standard deviation / mean). float[...]"""
    return loads.std(axis=-1) / loads.mean(axis=-1)


def max_violation(loads: np.ndarray) -> np.ndarray:
    """MaxVio (arXiv 2408.15664 Eq. 4): (max load − mean load) / mean load. float[...]"""
    mean = loads.mean(axis=-1)
    return (loads.max(axis=-1) - mean) / mean


LOG = "training_log.csv"
MAX_LOG_BYTES = 16 * 2**20


def read_training_log(folder: str | Path):
    """The per-step log (step, loss, held-out loss where measured, ...) as a DataFrame, or
    None when the folder has none; HistoryError for a log that is too large or lacks columns."""
    import pandas as pd

    path = Path(folder) / LOG
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_LOG_BYTES:
        raise HistoryError(f"{LOG} is larger than {MAX_LOG_BYTES:,} bytes.")
    try:
        log = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as error:
        raise HistoryError(f"{LOG} cannot be read: {error}") from error
    missing = {"step", "loss", "heldout_loss"} - set(log.columns)
    if missing or not len(log):
        raise HistoryError(f"{LOG} has no rows or lacks the columns {sorted(missing)}.")
    log["step"] = pd.to_numeric(log["step"], errors="coerce")
    log["loss"] = pd.to_numeric(log["loss"], errors="coerce")
    return log.dropna(subset=["step", "loss"])
