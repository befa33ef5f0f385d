"""An in-process federation for the post-training phases: the real ClientApp handlers behind a fake Grid.

Each fake site is medfed's own ClientApp (``client.app``: roll call,
``evaluate.calibrate``, ``evaluate.ood``) with a Flower ``Context`` of a
simulated phantom site, so the site side runs exactly as under Flower; the
server side is the real :class:`server.rounds.RoundLoop`, gate and
:mod:`server.post_training`. No Flower process is started.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict

import client.app as client_app
from client.site import SiteRuntime, site_runtime
from server.federation import aggregate_train_metrics, make_evaluate_aggregator
from server.gate import ReplyGate, SiteDirectory
from server.recorder import RoundRecorder
from server.rounds import RoundLoop
from server.strategies import build_strategy
from shared import protocol
from shared.config import TrainConfig, parse_run_config
from shared.data.preprocess import normalize_batch
from shared.objectives import ClassificationObjective
from shared.results import RunFolder
from shared.tasks import get_task
from shared.training import to_float01, train_local
from shared.validation import ReplyScreen, ValidationPolicy, model_spec
from tests.fake_grid import FakeGridBase

#: Two simulated phantom sites at 32 px, 240 phantoms each, 40 % of them for validation.
RUN: dict[str, Any] = {"image-size": 32, "phantom-count": 480, "val-fraction": 0.4, "seed": 0, "min-sites": 2,
                       "round-timeout": 5.0, "num-server-rounds": 1, "min-train-images": 0, "min-val-images": 0}
SITES = 2


@contextmanager
def as_server() -> Iterator[None]:
    """What the ``server_identity`` fixture does, for module-scoped fixtures (messages built outside a ServerApp)."""
    import pytest
    from flwr.supercore.task_identity import TaskIdentity

    with pytest.MonkeyPatch.context() as mp:
        for attr in ("_run_id", "_node_id", "_task_id"):
            mp.setattr(TaskIdentity, attr, 1)
        yield


def node_config(pid: int, n: int = SITES) -> dict[str, Any]:
    """A simulated site's node config."""
    return {"partition-id": pid, "num-partitions": n}


def runtime(pid: int, run: dict[str, Any] | None = None) -> SiteRuntime:
    """The site runtime of simulated site ``pid`` (its phantoms, split, as the ClientApp loads them)."""
    return site_runtime(run or RUN, node_config(pid), pid + 1)


@lru_cache(maxsize=2)
def trained_state(scale: float = 1.0) -> tuple[tuple[str, torch.Tensor], ...]:
    """small-cnn trained 2 epochs on both sites' training images; the head scaled by ``scale`` (overconfident x5).

    Unscaled it is under-confident (its own temperature is about 0.4, AUROC about 0.8 on the validation images).

    Scaling the final linear layer's weight and bias multiplies every logit by
    ``scale``: the same decisions and ranking, ``scale`` times the confidence.
    """
    cfg = parse_run_config(RUN)
    task = get_task(cfg.task)
    x = torch.cat([runtime(p).train_x for p in range(SITES)])
    y = torch.cat([runtime(p).train_t for p in range(SITES)])
    torch.manual_seed(0)
    model, _ = task.build_model(cfg)
    train_local(model, x, y, TrainConfig(local_epochs=2, precision="fp32"), ClassificationObjective(task.num_classes),
                seed=0, augment=None)
    # After 18 steps BatchNorm's running statistics (momentum 0.1) still carry much of their initial values and
    # the eval-mode model calls every phantom positive; re-estimated on the training images it is a usable model.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(normalize_batch(to_float01(x, task.in_channels, torch.device("cpu"), False), cfg.data.normalize))
    model.eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["head.weight"] *= scale
    state["head.bias"] *= scale
    return tuple(state.items())


def arrays_of(state: tuple[tuple[str, torch.Tensor], ...]) -> ArrayRecord:
    """The global model as the server sends it."""
    return ArrayRecord(dict(state))


Tamper = Callable[[Message, Message], Message | None]


class AppSite:
    """One simulated site served by medfed's ClientApp handlers (``tamper`` may rewrite its replies)."""

    def __init__(self, pid: int, run: dict[str, Any] | None = None, tamper: Tamper | None = None) -> None:
        self.context = Context(run_id=1, node_id=pid + 1, node_config=node_config(pid), state=RecordDict(),
                               run_config=dict(run or RUN))
        self.tamper = tamper
        self.asked: list[str] = []

    def handle(self, msg: Message) -> Message:
        kind = msg.metadata.message_type
        self.asked.append(kind)
        handler = {"query": client_app.query, protocol.CALIBRATE_MESSAGE: client_app.calibrate,
                   protocol.OOD_MESSAGE: client_app.ood}[kind]
        try:
            reply = handler(msg, self.context)
        except Exception as exc:  # as Flower does: a handler's exception becomes an error reply
            return Message(error=Error(code=0, reason=str(exc)), reply_to=msg)
        return self.tamper(msg, reply) if self.tamper is not None and kind != "query" else reply


class FakeGrid(FakeGridBase):
    """Delivers each message to the site behind its node id (a site returning None lost the message)."""

    def __init__(self, sites: dict[int, AppSite]) -> None:
        super().__init__()
        self.sites = sites

    def get_node_ids(self) -> list[int]:
        return sorted(self.sites)

    def deliver(self, msg: Message) -> Message | None:
        return self.sites[msg.metadata.dst_node_id].handle(msg)


def make_loop(tmp_path: Path, grid: FakeGrid, run: dict[str, Any] | None = None) -> RoundLoop:
    """The server's round loop and gate for ``run`` (after its rounds: ready for the post-training phases)."""
    cfg = parse_run_config(run or RUN)
    task = get_task(cfg.task)
    model, _ = task.build_model(cfg)
    folder = RunFolder.create(str(tmp_path), "run", columns=task.view.columns)
    recorder = RoundRecorder(folder, cfg.num_server_rounds, task, min_sites=cfg.strategy.min_sites, cfg=cfg)
    strategy = build_strategy(cfg.strategy, cfg.train, train_metrics_aggr_fn=aggregate_train_metrics,
                              evaluate_metrics_aggr_fn=make_evaluate_aggregator(task))
    spec = model_spec({k: v.numpy() for k, v in model.state_dict().items()})
    gate = ReplyGate(SiteDirectory(), ReplyScreen(spec, ValidationPolicy.for_run(cfg)), cfg.strategy.min_sites)
    return RoundLoop(grid, strategy, gate, recorder, cfg.num_server_rounds, cfg.round_timeout, run_key="run",
                     checkpoint=lambda r, a: None, poll_seconds=0.05)


def server_model(state: tuple[tuple[str, torch.Tensor], ...], run: dict[str, Any] | None = None) -> torch.nn.Module:
    """The server's copy of the final model."""
    cfg = parse_run_config(run or RUN)
    model, _ = get_task(cfg.task).build_model(cfg)
    model.load_state_dict(dict(state))
    return model


def metrics_of(reply: Message) -> dict[str, Any]:
    """A reply's metric fields (to tamper with)."""
    return dict(reply.content[protocol.METRICS])


def pooled_validation(run: dict[str, Any] | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """All sites' validation images and labels, pooled (what a central fit would see)."""
    rts = [runtime(p, run) for p in range(SITES)]
    return torch.cat([rt.val_x for rt in rts]), torch.cat([rt.val_t for rt in rts]).numpy()
