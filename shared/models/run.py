"""Build the network a run uses: the registered model, made DP-compatible when DP-SGD is on."""

from __future__ import annotations

from torch import nn

from shared.models.weights import build_model


def build_network(
    name: str, in_channels: int, num_classes: int, *, dp: bool = False, init_weights: str | None = None,
    image_size: int | None = None,
) -> tuple[nn.Module, list[str]]:
    """The run's network and the list of changes made for DP-SGD (empty without DP).

    Server, sites and ``medfed predict`` all build through here (via
    :meth:`shared.tasks.TaskSpec.build_model` or the model card), so their
    state dicts always have the same keys (e.g. GroupNorm in place of
    BatchNorm under DP). ``image_size`` is the run's input side (required
    by models built for one size, see :func:`shared.models.build_model`).
    """
    model = build_model(name, in_channels, num_classes, init_weights, image_size=image_size)
    if not dp:
        return model, []
    from shared.models.dp import make_dp_compatible  # Opacus is heavy: only when DP is on

    return make_dp_compatible(model)
