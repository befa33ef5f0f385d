"""Site-side state and work for the ClientApp: parse once, load data once, train, evaluate."""

from __future__ import annotations

import functools
import logging
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from shared.config import ConfigError, RunConfig, SiteConfig, parse_node_config, parse_run_config
from shared.data.preprocess import AugmentConfig
from shared.data.site import SiteData, load_site_data, resolve_augment
from shared.models import build_model
from shared.tasks import TaskSpec, get_task
from shared.seg_training import evaluate_seg, train_local_seg
from shared.training import EvalResult, TrainResult, evaluate_model, images_to_tensor, train_local

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class SiteError(RuntimeError):
    """What the server is told when a site fails: no paths, no patient data."""


def privacy_safe_errors(fn: F) -> F:
    """Log a site failure in full locally; send the server only a generic reason.

    Configuration errors are passed on unchanged: they quote run-config values,
    which the server set, never site data.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported, then re-raised sanitised
            logger.exception("site failure in %s", fn.__name__)
            raise SiteError(
                f"{type(exc).__name__} at this site during {fn.__name__}; details are in the site's own log"
            ) from None

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class SiteRuntime:
    """Everything a site needs to serve train/evaluate messages of one run."""

    cfg: RunConfig
    site: SiteConfig
    task: TaskSpec
    data: SiteData
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    augment: AugmentConfig | None
    train_m: torch.Tensor | None = None  # segmentation masks
    val_m: torch.Tensor | None = None

    def new_model(self, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """Build the run's model and load the global weights into it."""
        model = build_model(self.cfg.model, self.task.in_channels, self.task.num_classes)
        model.load_state_dict(state_dict, strict=True)
        return model

    def round_seed(self, server_round: int) -> int:
        """A seed that differs per site and round and is stable across processes."""
        return (self.cfg.seed * 1_000_003 + server_round * 7919 + zlib.crc32(self.site.site_id.encode())) % 2**31


_RUNTIMES: OrderedDict[tuple[Any, ...], SiteRuntime] = OrderedDict()
# A simulation worker serves several sites in turn: keep a few of them warm.
_RUNTIMES_MAX = 8


def _masks(m: Any) -> torch.Tensor | None:
    return None if m is None else torch.from_numpy(m)


def site_runtime(run_config: Mapping[str, Any], node_config: Mapping[str, Any], node_id: int | None = None) -> SiteRuntime:
    """Parse configs and load this site's data, once per process and run config."""
    key = (tuple(sorted(run_config.items())), tuple(sorted(node_config.items())))
    if key in _RUNTIMES:
        _RUNTIMES.move_to_end(key)
    else:
        cfg = parse_run_config(run_config)
        site = parse_node_config(node_config, node_id)
        task = get_task(cfg.task)
        data = load_site_data(cfg, site, task)
        _RUNTIMES[key] = SiteRuntime(
            cfg, site, task, data,
            images_to_tensor(data.train_images), torch.from_numpy(data.train_labels).long(),
            images_to_tensor(data.val_images), torch.from_numpy(data.val_labels).long(),
            resolve_augment(cfg, task),
            _masks(data.train_masks), _masks(data.val_masks),
        )
        while len(_RUNTIMES) > _RUNTIMES_MAX:
            _RUNTIMES.popitem(last=False)
    return _RUNTIMES[key]


def train_site(rt: SiteRuntime, state_dict: Mapping[str, torch.Tensor], server_round: int,
               proximal_mu: float | None) -> tuple[dict[str, torch.Tensor], dict[str, float | int]]:
    """One round of local training; returns new weights and the metrics to send."""
    model = rt.new_model(state_dict)
    common = {"seed": rt.round_seed(server_round), "augment": rt.augment, "normalize": rt.cfg.data.normalize,
              "proximal_mu": proximal_mu}
    res: TrainResult
    if rt.train_m is not None:
        res = train_local_seg(model, rt.train_x, rt.train_m, rt.cfg.train, **common)
    else:
        res = train_local(model, rt.train_x, rt.train_y, rt.cfg.train, num_classes=rt.task.num_classes, **common)
    model = model.to("cpu").to(memory_format=torch.contiguous_format)
    metrics: dict[str, float | int] = {
        "num-examples": res.num_examples,
        "train-loss": res.loss,
        "train-seconds": res.seconds,
        "train-images-per-s": res.images_per_second,
        "load-seconds": rt.data.load_seconds,
        "torch-threads": torch.get_num_threads(),
    }
    return {k: v.contiguous() for k, v in model.state_dict().items()}, metrics


def evaluate_site(rt: SiteRuntime, state_dict: Mapping[str, torch.Tensor]) -> dict[str, int | float | list[int]]:
    """Evaluate the global model on this site's validation split; counts only."""
    model = rt.new_model(state_dict)
    if rt.val_m is not None:
        counts, loss = evaluate_seg(model, rt.val_x, rt.val_m, batch_size=max(rt.cfg.train.batch_size, 32),
                                    precision=rt.cfg.train.precision, normalize=rt.cfg.data.normalize,
                                    spacings=rt.data.val_spacings)
        return {"num-examples": counts.n_images, "eval-loss": loss, **counts.to_flat()}
    res: EvalResult = evaluate_model(
        model, rt.val_x, rt.val_y, num_classes=rt.task.num_classes,
        batch_size=max(rt.cfg.train.batch_size, 64), precision=rt.cfg.train.precision,
        normalize=rt.cfg.data.normalize,
    )
    return {"num-examples": res.num_examples, "eval-loss": res.loss, **res.counts.to_flat()}
