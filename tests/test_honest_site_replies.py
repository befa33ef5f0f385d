"""What real sites send passes the reply validator.

medfed's own train/evaluate code, packed as the ClientApp packs it.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord

import client.site as site_mod
from client.site import evaluate_site, site_runtime, train_site
from shared.config import parse_run_config
from shared.tasks import get_task
from shared.validation import (
    VAL_EXAMPLES_KEY,
    SiteReply,
    ValidationPolicy,
    claimed_val_examples,
    model_spec,
    screen_evaluate_round,
    screen_train_round,
)

SMALL = {"phantom-count": 90, "image-size": 32, "batch-size": 16, "local-epochs": 1, "cache": False, "min-sites": 3}


@pytest.mark.parametrize(
    "run",
    [{}, {"task": "lung-seg", "phantom-count": 30}, {"dp.enabled": True, "dp.noise-multiplier": 1.0}],
    ids=["classification", "segmentation", "dp-sgd"],
)
def test_three_real_sites_pass_training_and_evaluation_checks(run: dict, tmp_path) -> None:  # noqa: ANN001
    flat = {**SMALL, **run}
    cfg = parse_run_config(flat)
    task = get_task(cfg.task)
    torch.manual_seed(0)
    model, _ = task.build_model(cfg)
    initial = ArrayRecord(model.state_dict())
    policy = ValidationPolicy.for_run(cfg)
    site_mod._RUNTIMES.clear()
    train_replies, eval_replies, val_sizes = [], [], []
    for p in range(3):
        rt = site_runtime(flat, {"partition-id": p, "num-partitions": 3, "state-dir": str(tmp_path)})
        state, metrics = train_site(rt, initial.to_torch_state_dict(), 1, None, run_key="r")
        assert metrics[VAL_EXAMPLES_KEY] == len(rt.val_x)
        train_replies.append(SiteReply.from_records(f"site-{p}", {"arrays": ArrayRecord(state)},
                                                    {"metrics": MetricRecord(metrics)}))
        val_sizes.append(claimed_val_examples(metrics))
        ev, _ = evaluate_site(rt, state, 1)
        eval_replies.append(SiteReply.from_records(f"site-{p}", {}, {"metrics": MetricRecord(ev)}))
    verdicts = screen_train_round(train_replies, model_spec(initial), initial, policy)
    assert all(v.accepted for v in verdicts), verdicts
    verdicts = screen_evaluate_round(eval_replies, policy, val_sizes)
    assert all(v.accepted for v in verdicts), verdicts
    site_mod._RUNTIMES.clear()
