"""Site-local Grad-CAM overlays of a fixed validation sample, written at every evaluate round.

A hospital switches this on in its own SuperNode's node config
(``explain-dir='/secure/medfed-cams' explain-samples=8``); the server cannot.
In a simulation, where Flower gives simulated sites no node config of their
own, the run config's ``sim-explain-dir`` / ``sim-explain-samples`` stand in
for it, for simulated sites only (sites without ``data-path``), each writing
under ``<sim-explain-dir>/<site-id>/`` (see :func:`resolve_explain`).

At every evaluate round the site writes, for classifier tasks::

    <explain-dir>/round-<NNN>/val-<iiii>-label-<y>-pred-<k>-p<prob>.png
    <explain-dir>/round-<NNN>/index.csv

``iiii`` is the image's position in the site's validation split, ``y`` its
label, ``k`` the predicted class (the class Grad-CAM explains) and ``prob``
the model's probability of ``k``. The sample is drawn once from the run seed
and the site id (classes interleaved so rare classes show up), so the same
images are explained in every round and maps can be compared across rounds.
File names carry no source path, file stem or patient id.

Segmentation tasks are skipped: Grad-CAM explains a class score, which a
segmentation network does not produce.

Nothing here is sent anywhere: the caller's reply to the server is computed
before and independently of this. Failures (an unwritable folder, a full
disk, a model Grad-CAM cannot read) are logged as a warning, without the
folder's path, and the round carries on.
"""

from __future__ import annotations

import csv
import logging
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from shared.data.preprocess import normalize_batch
from shared.settings import RunConfig, SiteConfig
from shared.training import model_in_channels, predict_proba, to_float01

logger = logging.getLogger(__name__)

__all__ = ["ExplainSettings", "explain_round", "resolve_explain", "sample_indices", "write_round_cams"]

#: Overlays smaller than this (px, short side) are enlarged so the map stays readable.
MIN_OVERLAY_SIDE = 128
INDEX_COLUMNS = ("file", "val_index", "label", "label_name", "predicted", "predicted_name", "probability")


@dataclass(frozen=True)
class ExplainSettings:
    """Where a site writes its Grad-CAM overlays and how many validation images it explains."""

    out_dir: Path
    samples: int


def _folder_name(site_id: str) -> str:
    """A site id as a single, safe folder name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", site_id).strip("._")
    return name or "site"


def resolve_explain(site: SiteConfig, cfg: RunConfig) -> ExplainSettings | None:
    """The explain settings in force at this site, or None when switched off.

    The site's own node config (``explain-dir``) wins. Otherwise a simulated
    site (no ``data-path``) follows the run config's ``sim-explain-dir``,
    writing under ``<sim-explain-dir>/<site-id>/``. A real site never writes
    because of the run config: the server must not decide what a hospital
    writes to its disks.
    """
    if site.explain_dir:
        return ExplainSettings(Path(site.explain_dir).expanduser(), site.explain_samples)
    if site.simulated and cfg.sim_explain_dir:
        return ExplainSettings(Path(cfg.sim_explain_dir).expanduser() / _folder_name(site.site_id),
                               cfg.sim_explain_samples)
    return None


def sample_indices(labels: Sequence[int] | np.ndarray, k: int, seed: int, site_id: str) -> np.ndarray:
    """Positions of ``k`` validation images to explain: fixed per (seed, site), classes interleaved.

    Each class's positions are shuffled by a generator seeded from ``seed``
    and ``site_id`` only (not the round), then taken in turn, one per class,
    so a rare class is represented. Returned sorted; fewer than ``k`` when the
    split is smaller.
    """
    y = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng([int(seed), zlib.crc32(site_id.encode())])
    queues = [list(rng.permutation(np.flatnonzero(y == c))) for c in np.unique(y)]
    picked: list[int] = []
    while len(picked) < k and any(queues):
        for q in queues:
            if q and len(picked) < k:
                picked.append(int(q.pop(0)))
    return np.sort(np.asarray(picked, dtype=np.int64))


def _display(image: torch.Tensor) -> np.ndarray:
    """uint8 ``(C, H, W)`` -> ``(H, W)`` gray or ``(H, W, 3)`` RGB, enlarged to :data:`MIN_OVERLAY_SIDE`."""
    img = image.detach().cpu().numpy()
    img = img[0] if img.shape[0] == 1 else np.ascontiguousarray(img[:3].transpose(1, 2, 0))
    h, w = img.shape[:2]
    scale = MIN_OVERLAY_SIDE / min(h, w)
    if scale > 1.0:
        img = cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LINEAR)
    return img


def write_round_cams(
    model: nn.Module,
    model_name: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: np.ndarray,
    out_dir: Path,
    *,
    class_names: Sequence[str],
    normalize: str = "fixed",
) -> list[Path]:
    """Write Grad-CAM overlays of ``images[indices]`` and an ``index.csv`` into ``out_dir``.

    Parameters
    ----------
    model, model_name
        The classifier being evaluated and its registered name.
    images, labels
        The site's validation split: uint8 ``(N, C, H, W)`` and ``(N,)``.
    indices
        Positions to explain (see :func:`sample_indices`).
    out_dir
        This round's folder (created if missing).
    class_names
        Class names in label order (for the index only; file names use numbers).
    normalize
        The run's intensity normalisation (as in training).

    Returns
    -------
    list[Path]
        The PNG files written, in ``indices`` order.

    Raises
    ------
    OSError
        When the folder cannot be created or a file cannot be written.
    """
    from shared.explain import gradcam, overlay

    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    x_u8 = images[idx]
    device = next(model.parameters()).device
    in_ch = model_in_channels(model)
    probs = predict_proba(model, x_u8, precision="fp32", normalize=normalize, device=device).numpy()
    pred = probs.argmax(axis=1)
    x = normalize_batch(to_float01(x_u8, in_ch, device, channels_last=False), normalize)
    maps = gradcam(model, model_name, x, target_class=None)  # each image's predicted class

    def name_of(c: int) -> str:
        return class_names[c] if 0 <= c < len(class_names) else str(c)

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rows: list[dict[str, object]] = []
    for j, i in enumerate(idx.tolist()):
        y, k, p = int(labels[i]), int(pred[j]), float(probs[j, pred[j]])
        fname = f"val-{i:04d}-label-{y}-pred-{k}-p{p:.2f}.png"
        path = out_dir / fname
        if not cv2.imwrite(str(path), overlay(_display(x_u8[j]), maps[j], rgb=True)):
            raise OSError(f"cv2.imwrite could not write {fname}")
        written.append(path)
        rows.append({"file": fname, "val_index": i, "label": y, "label_name": name_of(y), "predicted": k,
                     "predicted_name": name_of(k), "probability": round(p, 4)})
    with open(out_dir / "index.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=INDEX_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return written


def _reason(exc: BaseException) -> str:
    """An exception as text without file names (an OSError's message quotes the path)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__


def explain_round(
    settings: ExplainSettings | None,
    model: nn.Module,
    model_name: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    server_round: int,
    seed: int,
    site_id: str,
    class_names: Sequence[str],
    normalize: str = "fixed",
) -> int:
    """Write this round's overlays under ``<out_dir>/round-<NNN>/``; never raises.

    Returns the number of overlays written (0 when switched off, on an empty
    validation split, or on failure, which is logged as a local warning).
    """
    if settings is None or len(labels) == 0:
        return 0
    indices = sample_indices(labels.numpy(), settings.samples, seed, site_id)
    try:
        written = write_round_cams(model, model_name, images, labels, indices,
                                   settings.out_dir / f"round-{server_round:03d}",
                                   class_names=class_names, normalize=normalize)
    except Exception as exc:  # noqa: BLE001 - explanations are optional; the round must go on
        logger.warning("Grad-CAM overlays for round %d were not written (%s); the round carries on",
                       server_round, _reason(exc))
        return 0
    logger.info("wrote %d Grad-CAM overlays for round %d to the site's explain folder", len(written), server_round)
    return len(written)
