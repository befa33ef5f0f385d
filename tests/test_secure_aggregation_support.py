"""Why Flower 1.41's SecAgg+ cannot serve medfed's server loop and handlers (README "Secure aggregation").

Each test pins one fact the conclusion rests on, read from the installed
Flower source. When a Flower upgrade changes one of them, the test fails:
then the README's conclusion (and deploy/README.md) must be revisited.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from shared import protocol


def test_the_server_workflow_refuses_a_message_api_context() -> None:
    """``SecAggPlusWorkflow.__call__`` raises unless it runs inside the legacy ``DefaultWorkflow`` (LegacyContext)."""
    from flwr.server.workflow import SecAggPlusWorkflow

    workflow = SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(TypeError, match="Expect a LegacyContext"):
        workflow(grid=None, context=context)  # type: ignore[arg-type]


def test_its_stages_drive_a_legacy_strategy_and_client_manager() -> None:
    """Stage 0 samples through the legacy ``Strategy.configure_fit``; stage 3 hands the sum to ``aggregate_fit``."""
    from flwr.server.workflow import SecAggPlusWorkflow

    setup = inspect.getsource(SecAggPlusWorkflow.setup_stage)
    assert "context.strategy.configure_fit" in setup and "context.client_manager" in setup
    unmask = inspect.getsource(SecAggPlusWorkflow.unmask_stage)
    assert "context.strategy.aggregate_fit" in unmask and "context.history" in unmask


def test_the_message_api_offers_no_secure_aggregation() -> None:
    """Neither ``flwr.serverapp`` nor its strategies (what ``server/`` builds on) has a SecAgg component."""
    import flwr.serverapp
    import flwr.serverapp.strategy

    names = [*dir(flwr.serverapp), *dir(flwr.serverapp.strategy)]
    assert not [n for n in names if "secagg" in n.lower() or "secure" in n.lower()]


def test_the_client_mod_expects_a_legacy_fitres_reply_which_medfed_does_not_send() -> None:
    """``secaggplus_mod`` reads the handler's reply with ``recorddict_to_fitres`` ('fitres.*' records)."""
    from flwr.client.mod import secaggplus_mod
    from flwr.compat.common import recorddict_compat

    assert "recorddict_to_fitres" in inspect.getsource(secaggplus_mod)
    # a training reply as client/app.py packs it
    content = RecordDict({
        protocol.METRICS: MetricRecord(protocol.train_metrics(num_examples=10, loss=0.5, seconds=1.0,
                                                              images_per_second=10.0, load_seconds=0.1,
                                                              torch_threads=1)),
        protocol.SITE: ConfigRecord({protocol.SITE_ID: "site-a"}),
        protocol.ARRAYS: ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
    })
    with pytest.raises(KeyError, match="fitres.parameters"):
        recorddict_compat.recorddict_to_fitres(content, keep_input=True)


def test_the_workflow_defaults_assume_small_weights_and_clip_every_value_to_8() -> None:
    """``max_weight`` 1000 (num-examples above it risk overflow) and ``clipping_range`` 8.0 on full weights."""
    from flwr.server.workflow import SecAggPlusWorkflow

    params = inspect.signature(SecAggPlusWorkflow.__init__).parameters
    assert params["max_weight"].default == 1000.0 and params["clipping_range"].default == 8.0
