"""Client-side clipping for central DP (``central-dp.mode='client-fixed'``).

A ClientApp mod registered on ``train``. It is a no-op unless the run config
asks for client-side clipping; then it clips this site's update (the trained
model minus the global model it received) to the norm the server's
``DifferentialPrivacyClientSideFixedClipping`` wrapper sends. It does the work
of Flower's ``fixedclipping_mod`` with :func:`shared.privacy.central.clip_update`,
which keeps integer buffers (BatchNorm's ``num_batches_tracked``) at the
global value instead of failing on them.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from shared import protocol
from shared.config import parsed_run_config
from shared.privacy.central import clip_update

logger = logging.getLogger(__name__)


def _numpy(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return dict(zip(rec.keys(), rec.to_numpy_ndarrays(), strict=True))


def _error(msg: Message, reason: str) -> Message:
    logger.error("central DP clipping: %s", reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def central_dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the site's update when ``central-dp.mode`` is 'client-fixed'; otherwise pass through."""
    if parsed_run_config(context.run_config).central_dp.mode != "client-fixed":
        return call_next(msg, context)
    config = msg.content.config_records.get(protocol.CONFIG)
    if config is None or KEY_CLIPPING_NORM not in config:
        return _error(msg, f"central-dp.mode='client-fixed' but the server sent no '{KEY_CLIPPING_NORM}'; "
                           "the ServerApp must run with the same central-dp.mode.")
    clipping_norm = float(config[KEY_CLIPPING_NORM])
    ref = _numpy(msg.content[protocol.ARRAYS])
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    clipped = clip_update(_numpy(reply.content[protocol.ARRAYS]), ref, clipping_norm)
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make BatchNorm's counter shape (1,), which the
    # server's reply validation rejects as a shape mismatch)
    reply.content[protocol.ARRAYS] = ArrayRecord(
        {k: Array(np.require(v, requirements="C")) for k, v in clipped.items()})
    return reply
