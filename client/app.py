"""Flower ClientApp: unpack the message, call shared code, pack the reply (keys: :mod:`shared.protocol`)."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.central_dp import central_dp_clipping_mod
from client.site import (
    calibrate_site,
    evaluate_site,
    ood_site,
    privacy_safe_errors,
    roll_call,
    site_runtime,
    train_site,
)
from shared import protocol
from shared.logs import use_flower_handlers
from shared.privacy.site_dp import BudgetRefusal
from shared.site_policy import PolicyRefusal

app = ClientApp()


def _reply(msg: Message, site_id: str, metrics: dict, arrays: ArrayRecord | None = None,
           subgroups: dict | None = None) -> Message:
    content = RecordDict({protocol.METRICS: MetricRecord(metrics),
                          protocol.SITE: ConfigRecord({protocol.SITE_ID: site_id})})
    if arrays is not None:
        content[protocol.ARRAYS] = arrays
    if subgroups:
        content[protocol.SUBGROUPS] = ConfigRecord(subgroups)
    return Message(content=content, reply_to=msg)


def _round_config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get(protocol.CONFIG, ConfigRecord())


def _run_key(msg: Message, context: Context) -> str:
    """The run's stable name from the server (kept across a resume), else Flower's run id."""
    return str(_round_config(msg).get(protocol.RUN_KEY) or context.run_id)


def _refuse(msg: Message, refusal: PolicyRefusal) -> Message:
    return Message(error=Error(code=protocol.SITE_POLICY_ERROR_CODE, reason=str(refusal)), reply_to=msg)


@app.query()
@privacy_safe_errors
def query(msg: Message, context: Context) -> Message:
    """The roll call: this site's id, role and data sizes, or its refusal under its own policy."""
    use_flower_handlers()
    rt = site_runtime(context.run_config, context.node_config, context.node_id)
    try:
        site, sizes = roll_call(rt)
    except PolicyRefusal as refusal:
        return _refuse(msg, refusal)
    return Message(content=RecordDict({protocol.SITE: ConfigRecord(site), protocol.METRICS: MetricRecord(sizes)}),
                   reply_to=msg)


@app.train(mods=[central_dp_clipping_mod])
@privacy_safe_errors
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's data."""
    use_flower_handlers()
    rt = site_runtime(context.run_config, context.node_config, context.node_id)
    config = _round_config(msg)
    mu = config.get(protocol.PROXIMAL_MU)
    try:
        state, metrics = train_site(rt, msg.content[protocol.ARRAYS].to_torch_state_dict(),
                                    int(config.get(protocol.SERVER_ROUND, 0)),
                                    float(mu) if mu is not None else None, run_key=_run_key(msg, context))
    except BudgetRefusal as refusal:  # a structured "no", not a crash: the server records it and carries on
        return Message(error=Error(code=protocol.DP_BUDGET_ERROR_CODE, reason=str(refusal)), reply_to=msg)
    except PolicyRefusal as refusal:
        return _refuse(msg, refusal)
    return _reply(msg, rt.site.site_id, metrics, ArrayRecord(state))


@app.evaluate()
@privacy_safe_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model at this site (and write local Grad-CAMs if set)."""
    use_flower_handlers()
    rt = site_runtime(context.run_config, context.node_config, context.node_id)
    try:
        metrics, subgroups = evaluate_site(rt, msg.content[protocol.ARRAYS].to_torch_state_dict(),
                                           int(_round_config(msg).get(protocol.SERVER_ROUND, 0)),
                                           run_key=_run_key(msg, context))
    except PolicyRefusal as refusal:
        return _refuse(msg, refusal)
    return _reply(msg, rt.site.site_id, metrics, subgroups=subgroups)


@app.evaluate(protocol.CALIBRATE_ACTION)
@privacy_safe_errors
def calibrate(msg: Message, context: Context) -> Message:
    """After the last round: summed validation NLL per proposed temperature, or the counts at one (classification)."""
    use_flower_handlers()
    rt = site_runtime(context.run_config, context.node_config, context.node_id)
    try:
        metrics = calibrate_site(rt, msg.content[protocol.ARRAYS].to_torch_state_dict(), dict(_round_config(msg)),
                                 run_key=_run_key(msg, context))
    except PolicyRefusal as refusal:
        return _refuse(msg, refusal)
    return _reply(msg, rt.site.site_id, metrics)


@app.evaluate(protocol.OOD_ACTION)
@privacy_safe_errors
def ood(msg: Message, context: Context) -> Message:
    """After the last round: feature sums of the training images, or counts of images' distances to their mean."""
    use_flower_handlers()
    rt = site_runtime(context.run_config, context.node_config, context.node_id)
    ref = msg.content.array_records.get(protocol.OOD_REFERENCE)
    reference = {k: v.numpy() for k, v in ref.items()} if ref is not None else None
    try:
        metrics = ood_site(rt, msg.content[protocol.ARRAYS].to_torch_state_dict(), dict(_round_config(msg)),
                           reference, run_key=_run_key(msg, context))
    except PolicyRefusal as refusal:
        return _refuse(msg, refusal)
    return _reply(msg, rt.site.site_id, metrics)
