"""Malformed-reply matrix: every strategy x every malformation, validated before aggregation.

Each cell builds 4 honest training replies (7 for Bulyan, which needs 4f+3
with f=1) and 1 malformed one as Flower ``Message`` objects, runs
:func:`shared.validation.screen_train_round` and
:func:`shared.validation.filter_round` on them exactly as the server glue
will, aggregates the accepted replies with the strategy's own
``aggregate_train`` and checks that nothing raised, the global model is finite
and equal (up to central-DP noise) to the aggregate of the honest replies
alone, and that the malformed reply was rejected with the expected reason.
The same replies aggregated *without* validation show what the check prevents
(crash, NaN model, explosion, or a silent deviation from the aggregate the
uncorrupted copy of the reply would have given). Both matrices are printed
(run with ``-s`` to see them).

The evaluation half does the same for count reports: inflated, negative and
inconsistent counts against the pooled AUROC and operating threshold.
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from server.federation import aggregate_train_metrics, make_evaluate_aggregator
from server.gate import declared_site_id
from server.strategies import build_strategy
from shared.config import STRATEGY_NAMES, parse_run_config
from shared.metrics.classification import ClassificationCounts
from shared.metrics.federated import SiteEvaluation, ThresholdRule, pool_evaluations
from shared.tasks import get_task
from shared.validation import (
    Reason,
    ReplyScreen,
    RoundDecision,
    SiteReply,
    ValidationPolicy,
    Verdict,
    filter_round,
    model_spec,
    screen_train_round,
)

pytestmark = pytest.mark.usefixtures("server_identity", "no_flower_gc")

# ---------------------------------------------------------------------------
# A small model state dict with a BatchNorm counter and a non-square layer
# ---------------------------------------------------------------------------

_RNG = np.random.default_rng(7)
GLOBAL: dict[str, np.ndarray] = {
    "conv.weight": _RNG.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32),
    "conv.bias": np.zeros(4, dtype=np.float32),
    "bn.weight": np.ones(4, dtype=np.float32),
    "bn.bias": np.zeros(4, dtype=np.float32),
    "bn.running_mean": np.zeros(4, dtype=np.float32),
    "bn.running_var": np.ones(4, dtype=np.float32),
    "bn.num_batches_tracked": np.array(0, dtype=np.int64),
    "fc.weight": _RNG.normal(0, 0.3, (3, 16)).astype(np.float32),
    "fc.bias": np.zeros(3, dtype=np.float32),
}
SPEC = model_spec(GLOBAL)
_DIRECTION = {k: _RNG.normal(0, 1, v.shape) for k, v in GLOBAL.items() if v.dtype.kind == "f"}
# Per-site step sizes and data sizes: sites differ (as hospitals do), all honest.
STEP = (0.030, 0.036, 0.041, 0.048, 0.033, 0.044, 0.039)
SIZES = (80, 120, 150, 200, 95, 170, 130)
LOSSES = (0.52, 0.61, 0.47, 0.70, 0.58, 0.66, 0.55)


def global_record() -> ArrayRecord:
    return ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in GLOBAL.items()})


def honest_arrays(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + i)
    out: dict[str, np.ndarray] = {}
    for k, g in GLOBAL.items():
        if g.dtype.kind == "f":
            out[k] = (g + STEP[i] * (_DIRECTION[k] + 0.7 * rng.normal(0, 1, g.shape))).astype(g.dtype)
        else:
            out[k] = np.asarray(g + 10 * (i + 1), dtype=g.dtype)
    return out


def honest_metrics(i: int) -> dict[str, float | int]:
    return {"num-examples": SIZES[i], "train-loss": LOSSES[i], "train-seconds": 2.0 + i,
            "train-images-per-s": 40.0, "load-seconds": 0.1, "num-val-examples": SIZES[i] // 4}


def message(site: str, node_id: int, records: dict[str, object], kind: str = "train") -> Message:
    content = RecordDict({**records, "site": ConfigRecord({"site-id": site})})  # type: ignore[arg-type]
    meta = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
                    reply_to_message_id="x", group_id="", created_at=time.time(), ttl=60.0, message_type=kind)
    return Message(content, metadata=meta)


def to_record(arrays: dict[str, object]) -> ArrayRecord:
    return ArrayRecord({k: v if isinstance(v, Array) else Array(np.require(v, requirements="C"))  # type: ignore[arg-type]
                        for k, v in arrays.items()})


def honest_message(i: int) -> Message:
    return message(f"site-{i}", i + 1, {"arrays": to_record(honest_arrays(i)),  # type: ignore[dict-item]
                                        "metrics": MetricRecord(honest_metrics(i))})


def screen_messages(screen: ReplyScreen, messages: list[Message],
                    global_arrays: ArrayRecord | None = None) -> RoundDecision[Message]:
    """The validation step of the server's reply gate (:mod:`server.gate`), on one batch of replies."""
    ok = [m for m in messages if not m.has_error()]
    keys = [m.metadata.src_node_id for m in ok]  # trusted: assigned by the SuperLink, not declared by the site
    replies = [SiteReply.from_records(declared_site_id(m), m.content.array_records,
                                      m.content.metric_records) for m in ok]
    is_train = bool(ok) and ok[0].metadata.message_type.split(".")[0] == "train"
    verdicts = screen.train(keys, replies, global_arrays) if is_train else screen.evaluate(keys, replies)
    return filter_round(ok, verdicts, screen.policy.min_sites)


# ---------------------------------------------------------------------------
# Malformations
# ---------------------------------------------------------------------------


def _set(key: str, fn: Callable[[np.ndarray], object]) -> Callable[[dict, dict], tuple[dict, dict, dict]]:
    def make(arrays: dict, metrics: dict) -> tuple[dict, dict, dict]:
        arrays = dict(arrays)
        arrays[key] = fn(arrays[key])
        return arrays, metrics, {}
    return make


def _metric(key: str, value: object) -> Callable[[dict, dict], tuple[dict, dict, dict]]:
    def make(arrays: dict, metrics: dict) -> tuple[dict, dict, dict]:
        return arrays, {**metrics, key: value}, {}
    return make


def _scale(arrays: dict, metrics: dict) -> tuple[dict, dict, dict]:
    return {k: (v * np.float32(1e30)).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in arrays.items()}, \
        metrics, {}


def _flip(arrays: dict, metrics: dict) -> tuple[dict, dict, dict]:
    """The update reversed and 10x as long (a classic model-poisoning reply)."""
    return {k: (GLOBAL[k] - 10 * (v - GLOBAL[k])).astype(v.dtype) if v.dtype.kind == "f" else v
            for k, v in arrays.items()}, metrics, {}


def _missing(arrays: dict, metrics: dict) -> tuple[dict, dict, dict]:
    return {k: v for k, v in arrays.items() if k != "fc.bias"}, metrics, {}


def _extra(arrays: dict, metrics: dict) -> tuple[dict, dict, dict]:
    return {**arrays, "backdoor.weight": np.zeros(5, np.float32)}, metrics, {}


def _reordered(arrays: dict, metrics: dict) -> tuple[dict, dict, dict]:
    """The right tensors, the two BatchNorm affine vectors swapped in order (same shape: no error anywhere)."""
    keys = list(arrays)
    i, j = keys.index("bn.weight"), keys.index("bn.bias")
    keys[i], keys[j] = keys[j], keys[i]
    return {k: arrays[k] for k in keys}, metrics, {}


def _unreadable(arrays: dict, metrics: dict) -> tuple[dict, dict, dict]:
    a = arrays["fc.bias"]
    return {**arrays, "fc.bias": Array(dtype="float32", shape=a.shape, stype="torch.Tensor", data=a.tobytes())}, \
        metrics, {}


def _forged_shape(arrays: dict, metrics: dict) -> tuple[dict, dict, dict]:
    """Metadata says the model's shape, the bytes hold a longer array."""
    real = Array(np.append(arrays["fc.bias"], np.float32(9.0)))
    return {**arrays, "fc.bias": Array(dtype=real.dtype, shape=(3,), stype=real.stype, data=real.data)}, metrics, {}


def _second_record(arrays: dict, metrics: dict) -> tuple[dict, dict, dict]:
    return arrays, metrics, {"arrays-2": to_record({"x": np.zeros(2, np.float32)})}


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[dict, dict], tuple[dict, dict, dict]]
    reason: Reason


CASES = (
    Case("nan", _set("fc.weight", lambda a: np.where(a > 0.2, np.nan, a).astype(a.dtype)), Reason.NON_FINITE),
    Case("inf", _set("conv.weight", lambda a: np.where(a > 0.2, np.inf, a).astype(a.dtype)), Reason.NON_FINITE),
    Case("x1e30", _scale, Reason.UPDATE_TOO_LARGE),
    Case("flip-x10", _flip, Reason.NORM_OUTLIER),
    Case("missing-key", _missing, Reason.MISSING_KEY),
    Case("extra-key", _extra, Reason.EXTRA_KEY),
    Case("reordered", _reordered, Reason.KEY_ORDER),
    Case("transposed", _set("fc.weight", lambda a: np.ascontiguousarray(a.T)), Reason.SHAPE_MISMATCH),
    Case("extra-element", _set("fc.bias", lambda a: np.append(a, np.float32(0))), Reason.SHAPE_MISMATCH),
    Case("float64", _set("fc.weight", lambda a: a.astype(np.float64)), Reason.DTYPE_MISMATCH),
    Case("float16", _set("conv.weight", lambda a: a.astype(np.float16)), Reason.DTYPE_MISMATCH),
    Case("n=0", _metric("num-examples", 0), Reason.BAD_NUM_EXAMPLES),
    Case("n=-1", _metric("num-examples", -1), Reason.BAD_NUM_EXAMPLES),
    Case("n=1e12", _metric("num-examples", 10**12), Reason.BAD_NUM_EXAMPLES),
    Case("n=1e12f", _metric("num-examples", 1e12), Reason.BAD_NUM_EXAMPLES),
    Case("unreadable", _unreadable, Reason.UNDECODABLE),
    Case("forged-shape", _forged_shape, Reason.SHAPE_MISMATCH),
    Case("2nd-record", _second_record, Reason.UNEXPECTED_RECORD),
)


def bad_message(case: Case, node_id: int) -> Message:
    i = 3  # a copy of an honest site's reply, then corrupted
    arrays, metrics, extra = case.make(honest_arrays(i), honest_metrics(i))
    return message("mallory", node_id, {"arrays": to_record(arrays), "metrics": MetricRecord(metrics), **extra})


# ---------------------------------------------------------------------------
# Strategies (the registry, plus both central-DP wrappers around fedavg)
# ---------------------------------------------------------------------------

NEEDS: dict[str, dict] = {
    "fedprox": {"proximal-mu": 0.1},
    "bulyan": {"krum.num-malicious": 1, "min-sites": 7},
}
DP_CLIP = 5.0  # well above every honest update norm (~1), so honest updates pass unclipped
DP = {"strategy": "fedavg", "central-dp.noise-multiplier": 1e-4, "central-dp.clipping-norm": DP_CLIP}
COLUMNS: dict[str, dict] = {
    **{name: {"strategy": name, "min-sites": 3, **NEEDS.get(name, {})} for name in STRATEGY_NAMES},
    "dp-server": {**DP, "min-sites": 3, "central-dp.mode": "server-fixed"},
    "dp-client": {**DP, "min-sites": 3, "central-dp.mode": "client-fixed"},
}


class FakeGrid:
    """Just enough of a Grid for ``configure_train``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def fresh(column: str):  # noqa: ANN201
    cfg = parse_run_config(COLUMNS[column])
    strategy = build_strategy(cfg.strategy, cfg.train, train_metrics_aggr_fn=aggregate_train_metrics,
                              central_dp=cfg.central_dp)
    list(strategy.configure_train(1, global_record(), ConfigRecord(), FakeGrid(cfg.strategy.min_sites + 1)))
    return cfg, strategy


def honest_count(cfg) -> int:  # noqa: ANN001
    return max(4, cfg.strategy.min_sites)


def aggregate(column: str, messages: list[Message]) -> dict[str, np.ndarray] | None:
    _, strategy = fresh(column)
    arrays, _ = strategy.aggregate_train(1, messages)
    return None if arrays is None else {k: v.numpy() for k, v in arrays.items()}


def tolerance(column: str) -> float:
    """Central DP adds independent noise to both aggregates: allow 10 noise std (of their difference)."""
    cfg = parse_run_config(COLUMNS[column])
    c = cfg.central_dp
    return 1e-6 if c.mode == "none" else 10 * np.sqrt(2) * c.noise_multiplier * c.clipping_norm / cfg.strategy.min_sites


def outcome(result: dict[str, np.ndarray] | None | BaseException, ref: dict[str, np.ndarray], tol: float) -> str:
    """What aggregation did, relative to the honest aggregate."""
    if isinstance(result, BaseException):
        return f"crash:{type(result).__name__}"
    if result is None:
        return "no-aggregate"
    if set(result) != set(ref) or any(result[k].shape != ref[k].shape for k in ref):
        return "wrong-shape"
    if not all(np.isfinite(result[k]).all() for k in ref):
        return "NaN-model"
    gap = _gap(result, ref)
    if gap > 1e3:
        return "exploded"
    if gap > tol:
        return "deviated"
    return "dtype-changed" if any(result[k].dtype != ref[k].dtype for k in ref) else "unchanged"


def _gap(result: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    """Largest absolute difference over the floating-point tensors."""
    return max(float(np.max(np.abs(result[k].astype(np.float64) - ref[k].astype(np.float64))))
               for k in ref if GLOBAL[k].dtype.kind == "f")


@dataclass
class Cell:
    verdict: str  # the malformed reply's reason (or "accepted")
    protected: str  # outcome with validation
    unprotected: str  # outcome without validation
    problems: list[str]


@functools.cache
def reference(column: str) -> dict[str, np.ndarray]:
    """The aggregate of the honest replies alone (central DP: one noisy draw of it)."""
    cfg = parse_run_config(COLUMNS[column])
    ref = aggregate(column, [honest_message(i) for i in range(honest_count(cfg))])
    assert ref is not None, f"{column}: no honest aggregate"
    return ref


@functools.cache
def reference_with_clean_copy(column: str) -> dict[str, np.ndarray]:
    """The aggregate had the 5th reply been the uncorrupted copy: the baseline of the "without validation" row."""
    cfg = parse_run_config(COLUMNS[column])
    n = honest_count(cfg)
    clean = Case("clean", lambda a, m: (a, m, {}), Reason.OK)
    ref = aggregate(column, [honest_message(i) for i in range(n)] + [bad_message(clean, n + 1)])
    assert ref is not None, f"{column}: no aggregate with the clean copy"
    return ref


def run_cell(column: str, case: Case) -> Cell:
    cfg, _ = fresh(column)
    n = honest_count(cfg)
    policy = ValidationPolicy.for_run(cfg)
    problems: list[str] = []
    ref = reference(column)
    tol = tolerance(column)

    messages = [honest_message(i) for i in range(n)] + [bad_message(case, n + 1)]
    try:
        decision = screen_messages(ReplyScreen(SPEC, policy), messages, global_record())
        protected: dict[str, np.ndarray] | None | BaseException = aggregate(column, decision.accepted)
    except Exception as e:  # noqa: BLE001 - recorded as a problem of this cell
        return Cell("raised", f"crash:{type(e).__name__}", "", [f"validation path raised {e!r}"])
    bad = next((v for v in decision.rejected if v.site_id == "mallory"), Verdict("mallory", True, Reason.OK))
    if any(v.site_id != "mallory" for v in decision.rejected):
        problems.append(f"honest replies rejected: {[v for v in decision.rejected if v.site_id != 'mallory']}")
    if not decision.proceed:
        problems.append(f"round refused: {decision.refusal}")
    expected = case.reason
    dp_sign_flip = cfg.central_dp.mode != "none" and case.name == "flip-x10"
    if dp_sign_flip:
        # Under central DP the norm screen is off (see ValidationPolicy.for_run): clipping bounds the update instead.
        if not bad.accepted:
            problems.append(f"expected the flipped update to reach the DP wrapper, got {bad.reason}")
    elif bad.accepted or bad.reason != expected:
        problems.append(f"expected {expected}, got {bad.reason}")
    if bad.detail and "mallory" in bad.detail:
        problems.append("detail repeats the site id")
    got = outcome(protected, ref, tol)
    if dp_sign_flip:
        if cfg.central_dp.mode == "client-fixed":
            ok = got == "no-aggregate"  # the wrapper refuses a round with an unclipped update
        else:  # server-side clipping: the update counts with norm <= C, its share of the mean is <= C/m
            bound = DP_CLIP / (n + 1) * 2 + tol
            ok = got in ("unchanged", "deviated") and isinstance(protected, dict) and _gap(protected, ref) <= bound
        if not ok:
            problems.append(f"central DP did not bound the flipped update: {got}")
    elif got != "unchanged":
        problems.append(f"protected aggregate {got}")
    try:
        unprotected: dict[str, np.ndarray] | None | BaseException = aggregate(
            column, [honest_message(i) for i in range(n)] + [bad_message(case, n + 1)])
    except Exception as e:  # noqa: BLE001 - what happens without validation is the point
        unprotected = e
    return Cell(str(bad.reason) if not bad.accepted else "accepted", got,
                outcome(unprotected, reference_with_clean_copy(column), tol), problems)


@functools.cache
def matrix() -> dict[tuple[str, str], Cell]:
    return {(col, case.name): run_cell(col, case) for col in COLUMNS for case in CASES}


def render(field: str) -> str:
    cells = matrix()
    cols = list(COLUMNS)
    width = max(len(getattr(c, field)) for c in cells.values())
    width = max(width, max(len(c) for c in cols))
    out = io.StringIO()
    out.write(f"{'malformation':<14}" + "".join(f" {c:<{width}}" for c in cols) + "\n")
    for case in CASES:
        out.write(f"{case.name:<14}" + "".join(f" {getattr(cells[(c, case.name)], field):<{width}}" for c in cols)
                  + "\n")
    return out.getvalue()


@pytest.mark.parametrize("column", list(COLUMNS))
def test_no_malformed_reply_reaches_the_global_model(column: str) -> None:
    problems = {case.name: matrix()[(column, case.name)].problems for case in CASES}
    assert not any(problems.values()), {k: v for k, v in problems.items() if v}


def test_print_matrices() -> None:
    """The report: the rejection reason per cell, and what aggregation does with / without validation."""
    cells = matrix()
    print("\n\nREJECTED REPLY -> REASON (strategy x malformation; 'accepted' = passed to the strategy)\n"
          + render("verdict"))
    print("WITH VALIDATION: global model vs the honest-only aggregate\n" + render("protected"))
    print("WITHOUT VALIDATION: the same replies aggregated as they came, vs the aggregate with the uncorrupted copy\n"
          + render("unprotected"))
    assert all(not c.problems for c in cells.values())
    # the matrix is only meaningful if the unprotected runs show harm somewhere in every malformation row
    for case in CASES:
        harms = {cells[(col, case.name)].unprotected for col in COLUMNS}
        assert harms != {"unchanged"}, f"{case.name}: no strategy was harmed without validation; weak test case"


# ---------------------------------------------------------------------------
# Evaluation counts
# ---------------------------------------------------------------------------


def counts(n: int, seed: int, separation: float) -> ClassificationCounts:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    logits = rng.normal(0, 1, (n, 2)) + separation * np.eye(2)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return ClassificationCounts.from_predictions(probs, labels)


def eval_message(site: str, node_id: int, flat: dict, n: int | None = None) -> Message:
    n = int(np.sum(flat["confusion"])) if n is None else n
    return message(site, node_id, {"metrics": MetricRecord({"num-examples": n, "eval-loss": 0.4, **flat})},
                   kind="evaluate")


HONEST_EVAL = [counts(SIZES[i] // 4, 50 + i, 3.0) for i in range(4)]


def _inflate(factor: int) -> Callable[[], tuple[dict, int | None]]:
    def make() -> tuple[dict, int | None]:
        flat = counts(SIZES[4] // 4, 99, -3.0).to_flat()  # an inverted model's counts
        return {**flat, "confusion": [v * factor for v in flat["confusion"]],
                "histogram-count": [v * factor for v in flat["histogram-count"]]}, None
    return make


def _negative() -> tuple[dict, int | None]:
    flat = counts(SIZES[4] // 4, 99, 3.0).to_flat()
    conf = list(flat["confusion"])
    conf[1] = -conf[1] - 5
    return {**flat, "confusion": conf}, int(sum(conf))


def _not_adding_up() -> tuple[dict, int | None]:
    flat = counts(SIZES[4] // 4, 99, 3.0).to_flat()
    return flat, int(np.sum(flat["confusion"])) - 3  # within the announced size, but not the count total


def _histogram_moved() -> tuple[dict, int | None]:
    c = counts(SIZES[4] // 4, 99, 3.0)
    h = c.histogram.copy()
    top = int(np.flatnonzero(h[1, 0])[-1])
    h[1, 0, top] -= 1  # a negative's score re-labelled positive in the histogram only
    h[1, 1, top] += 1
    return ClassificationCounts(2, c.bins, c.confusion, h).to_flat(), None


EVAL_CASES = {
    "inflated-x1e6": (_inflate(10**6), Reason.BAD_NUM_EXAMPLES),
    "inflated-x1e3": (_inflate(10**3), Reason.BAD_NUM_EXAMPLES),
    "negative": (_negative, Reason.BAD_COUNTS),
    "total!=n": (_not_adding_up, Reason.INCONSISTENT_COUNTS),
    "hist!=confusion": (_histogram_moved, Reason.INCONSISTENT_COUNTS),
}


def pooled(messages: list[Message]) -> dict[str, float]:
    """What the recorder (pool_evaluations) and the strategy (evaluate aggregator) make of the replies."""
    rule = ThresholdRule()
    reports = [SiteEvaluation.from_flat(declared_site_id(m), m.content["metrics"], ClassificationCounts.from_flat)
               for m in messages]
    ev = pool_evaluations(reports, rule).pooled
    via_strategy = make_evaluate_aggregator(get_task("pneumonia-cxr"))([m.content for m in messages], "num-examples")
    assert via_strategy["auroc"] == ev["auroc"]
    return {"auroc": ev["auroc"], "threshold": ev["threshold"]}


@pytest.mark.parametrize("name", list(EVAL_CASES))
def test_bad_evaluation_counts_are_rejected_and_pooled_metrics_unchanged(name: str) -> None:
    make, expected = EVAL_CASES[name]
    screen = ReplyScreen(SPEC, ValidationPolicy(min_sites=3))
    # round 1 training: five honest replies announce their validation sizes (mallory, node 5, announces 23)
    trained = screen_messages(screen, [honest_message(i) for i in range(5)], global_record())
    assert trained.proceed and not trained.rejected
    honest = [eval_message(f"site-{i}", i + 1, c.to_flat()) for i, c in enumerate(HONEST_EVAL)]
    flat, n = make()
    messages = honest + [eval_message("mallory", 5, flat, n)]
    decision = screen_messages(screen, messages)
    assert decision.proceed and [v.site_id for v in decision.rejected] == ["mallory"]
    assert decision.rejected[0].reason == expected, decision.rejected[0]
    honest_pool = pooled(honest)
    assert pooled(decision.accepted) == honest_pool
    try:
        without = pooled(messages)
        effect = f"AUROC {honest_pool['auroc']:.3f} -> {without['auroc']:.3f}, " \
                 f"threshold {honest_pool['threshold']:.3f} -> {without['threshold']:.3f}"
    except Exception as e:  # noqa: BLE001 - what happens without validation
        effect = f"crash:{type(e).__name__}"
    print(f"\n{name:<16} rejected as {decision.rejected[0].reason:<20} without validation: {effect}")


def test_torch_state_dict_replies_pass() -> None:
    """Replies as the ClientApp builds them (ArrayRecord(torch state dict)) are accepted."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(),
                                torch.nn.Linear(2 * 4 * 4, 3))
    state = model.state_dict()
    spec = model_spec(ArrayRecord(state))
    replies = []
    for i in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (i + 1) * torch.randn_like(p))
        m = message(f"s{i}", i + 1, {"arrays": ArrayRecord(model.state_dict()),
                                     "metrics": MetricRecord(honest_metrics(i))})
        replies.append(SiteReply.from_records(declared_site_id(m), m.content.array_records, m.content.metric_records))
    verdicts = screen_train_round(replies, spec, ArrayRecord(state), ValidationPolicy())
    assert all(v.accepted for v in verdicts), verdicts


def test_refused_round_keeps_the_global_model() -> None:
    """Fewer valid replies than min-sites: the strategy gets nothing and returns no new model."""
    policy = ValidationPolicy(min_sites=3)
    messages = [honest_message(0), honest_message(1), bad_message(CASES[0], 3)]
    decision = screen_messages(ReplyScreen(SPEC, policy), messages, global_record())
    assert not decision.proceed and decision.accepted == []
    assert "only 2 of 3 replies passed validation, min-sites is 3" in (decision.refusal or "")
    assert "mallory: non-finite" in (decision.refusal or "")
    for column in ("fedavg", "fedadam", "qfedavg", "fedavgm", "dp-server"):
        assert aggregate(column, decision.accepted) is None, column  # Strategy.start keeps the previous arrays
