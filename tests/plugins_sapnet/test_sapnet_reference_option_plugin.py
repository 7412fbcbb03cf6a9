"""SAPNet's three reference quirks set as *plugin options*, against the reference's own ``forward_train``.

``test_official_sapnet.py`` proves that ``SelectionNet`` with ``pdg_box_centres``, ``fallback_last_proposal``
and ``plus_one`` on equals the reference (zhaoyangwei123/SAPNet), by setting the three attributes on the
net itself. A user turns them on as options of the ``sapnet`` plugin, whose ``losses`` builds the net's
inputs from the batch: the proposals (``batch.proposals``), the classes, each row's point (its first
annotated point) and the boxes PDG reads with ``pdg_box_centres`` (``batch.box``). Here the plugin,
built with the three options, runs its own ``losses`` on a batch holding the same inputs as that test,
and its selection result must equal the reference's outputs (the same case, ``forward_train``: live
with ``SAMFLOW_SAPNET_SRC``, else from ``tests/reference_outputs/sapnet_pipeline.pt``). The plugin's
default (all three off) must not.
"""

from __future__ import annotations

import types

import pytest
import torch
from official_code import fingerprint, largest_difference
from test_official_sapnet import NEGATIVES, REF, ROI_LAYER, SIZE, compare, inputs, network, reference

from samflow.data.coco_batch import CocoBatch
from samflow_plugins.sapnet import SAPNet

official = pytest.mark.skipif(not REF.available, reason=REF.skip_reason())
QUIRKS = ("pdg_box_centres", "fallback_last_proposal", "plus_one")


def plugin_result(x: dict, **options: bool):
    """The plugin ``SAPNet(**options)`` set up for 4-channel features, with the shared head weights
    (``test_official_sapnet.network``), run through its ``losses`` on ``x`` as a batch."""
    plugin = SAPNet(num_classes=3, hidden=16, num_negatives=NEGATIVES, **options)
    plugin.setup(types.SimpleNamespace(prompt_encoder=types.SimpleNamespace(embed_dim=4)))  # type: ignore[arg-type]
    assert plugin.net is not None
    plugin.net.load_state_dict(network().state_dict())
    plugin.net.double()
    n = x["true"].shape[0]
    batch = CocoBatch(
        image=torch.zeros(x["features"].shape[0], 3, SIZE, SIZE),
        image_index=x["image_index"],
        points=x["points"][:, None],  # the annotated point, not the box centre
        point_labels=torch.ones(n, 1, dtype=torch.long),
        box=x["true"],  # the reference's ground-truth boxes
        proposals=x["proposals"],
        classes=x["labels"],
    )
    ctx = types.SimpleNamespace(encoded=types.SimpleNamespace(embeddings=x["features"]), batch=batch)
    plugin.negative_draws = lambda ctx, device: x["draws"]  # type: ignore[method-assign]  # the shared U(0, 1)
    out = types.SimpleNamespace(extras={})
    with torch.no_grad():
        plugin.losses(out, batch, ctx)  # type: ignore[arg-type]
    return plugin, out.extras["sapnet"]


@official
def test_the_quirk_options_of_the_plugin_equal_the_reference_forward_train(monkeypatch):
    x = inputs()
    digest = fingerprint(network(), x, SIZE, NEGATIVES, ROI_LAYER)  # the case of test_official_sapnet
    expected = REF.get("forward_train", digest, lambda: reference(network(), x, monkeypatch))
    plugin, result = plugin_result(x, **dict.fromkeys(QUIRKS, True))
    assert plugin.net is not None and all(getattr(plugin.net, q) for q in QUIRKS)
    compare(result, expected, x)


@official
@pytest.mark.parametrize("off", [*QUIRKS, "default"])
def test_the_plugin_with_a_quirk_off_differs_from_the_reference(monkeypatch, off):
    """Each option reaches the net: with one of them off (or the plugin's default, all off) the plugin
    moves off the reference on these inputs."""
    x = inputs()
    digest = fingerprint(network(), x, SIZE, NEGATIVES, ROI_LAYER)
    expected = REF.get("forward_train", digest, lambda: reference(network(), x, monkeypatch))
    options = {} if off == "default" else {q: q != off for q in QUIRKS}
    _, result = plugin_result(x, **options)
    moved = {
        "pdg": largest_difference(result.phi[..., None].pow(1 / 64), expected["pdg_factor"][..., :1]) > 1e-4,
        "bag": largest_difference(result.bag1, expected["bag1"]) > 1.0,
        "box": largest_difference(result.pseudo_box, expected["pseudo_box"]) > 0.99,
    }
    want = {
        "pdg_box_centres": {"pdg"},
        "fallback_last_proposal": {"bag"},
        "plus_one": {"box"},
        "default": {"pdg", "bag", "box"},
    }[off]
    assert {k for k, v in moved.items() if v} >= want
    with pytest.raises(AssertionError):
        compare(result, expected, x)
