"""A plugin's random draws in its training step come from each sample's seed, row by row (``ctx.rand``).

Training batches carry every image's ``sample_seed`` (``ResumableLoader``: from run seed, epoch and
index). PA-SAM's Gumbel noise, HQ-SAM's loss points and SAPNet's random negatives draw from it, each
row (SAPNet: each image) from a generator of its own. So a row's draws depend on neither its batch,
its place in it, nor the DDP rank: one training step on 4 images gives the losses and gradients of
its two halves (2 + 2) put together, as DDP on 2 ranks does. Before, each plugin drew once per batch
from the process's global generator: the halves drew other noise than the whole batch's rows, and DDP
ranks, which share that generator's state, drew the same noise for their i-th rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize

from samflow.batch import SamBatch
from samflow.plugins import PluginStack
from samflow.sam import HookedSam, build_sam
from samflow.sam.types import ForwardContext
from samflow.testing import random_batch
from samflow_plugins.hq_sam import HQSam
from samflow_plugins.pa_sam import PASam
from samflow_plugins.sapnet import SAPNet

SEEDS = [101, 202, 303, 404]
OTHER_SEEDS = [505, 606, 707, 808]
EPOCH = 5  # PA-SAM mines from epoch 1 on (mining_start_epoch 0)


def _plugin(name: str):
    if name == "pa":
        return PASam(mining_start_epoch=0)
    if name == "hq":
        return HQSam(num_points=256)
    return SAPNet(num_classes=3, hidden=32, num_negatives=40)


def _model(name: str) -> HookedSam:
    torch.manual_seed(0)
    sam = randomize(build_sam("tiny", seed=0))
    return HookedSam(sam, PluginStack({name: _plugin(name)})).double().train()


def _batch(seeds: list[int]):
    return random_batch(4, prompt="box", seed=3, dtype=torch.float64).replace(sample_seed=seeds)


def _step(
    model: HookedSam, batch
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], dict]:
    """One training step's loss terms (SAM's mask BCE and the plugin's), each term's gradients, and the
    plugin's extras. The global generator is moved on first: a draw from it would differ in every call."""
    torch.rand(7)
    out, ctx = model.run(batch, model.context(batch, epoch=EPOCH))
    pred = F.interpolate(out.pred, size=batch.row_mask.shape[-2:], mode="bilinear", align_corners=False)
    terms = {"mask_bce": F.binary_cross_entropy_with_logits(pred, batch.row_mask)}
    terms.update(model.plugins.losses(out, batch, ctx))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {}
    for name, term in terms.items():
        if not term.requires_grad:
            continue
        got = torch.autograd.grad(term, list(params.values()), retain_graph=True, allow_unused=True)
        grads[name] = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), got)}
    return {k: v.detach() for k, v in terms.items()}, grads, out.extras


def _halves_weights(name: str, term: str, extras: list[dict]) -> tuple[float, float]:
    """How the whole batch's term combines its halves'. A mean over rows: (1/2, 1/2). SAPNet's negative
    term is L = 0.75 · mean_i(w_i) · Σ_negatives / N with w_i = Σ_j d⁰_ij (detached, a row's own): with
    c = 0.75 · mean(w) / N of each batch, L = c (L_a / c_a + L_b / c_b), and so are its gradients."""
    if not (name == "sap" and term.endswith("/neg")):
        return 0.5, 0.5
    whole, a, b = (
        (0.75 * e["sapnet"].score0.sum(1).mean() / e["sapnet"].score0.shape[0]).item() for e in extras
    )
    return whole / a, whole / b


@pytest.mark.parametrize("name", ["pa", "hq", "sap"])
def test_a_training_step_on_four_images_is_its_two_halves_put_together(name):
    model = _model(name)
    batch = _batch(SEEDS)
    whole = _step(model, batch)
    a = _step(model, batch.select_images([0, 1]))
    b = _step(model, batch.select_images([2, 3]))
    assert set(whole[0]) == set(a[0]) == set(b[0]) and len(whole[0]) > 1, whole[0].keys()
    for term, value in whole[0].items():
        wa, wb = _halves_weights(name, term, [whole[2], a[2], b[2]])
        torch.testing.assert_close(value, wa * a[0][term] + wb * b[0][term], rtol=1e-6, atol=1e-12, msg=term)
        for param, grad in whole[1].get(term, {}).items():
            joined = wa * a[1][term][param] + wb * b[1][term][param]
            torch.testing.assert_close(grad, joined, rtol=1e-6, atol=1e-12, msg=f"{term}: {param}")
    assert any(g.abs().sum() > 0 for grads in whole[1].values() for g in grads.values())


def _drawn(name: str, ctx, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the plugin's draws decided: PA-SAM's mined cells, HQ-SAM's point loss, SAPNet's negative term."""
    if name == "pa":
        return ctx.state["pa"]["points"].double()
    return torch.stack(
        [v.detach() for k, v in terms.items() if k.endswith(("/point_bce", "/point_dice", "/neg"))]
    )


@pytest.mark.parametrize("name", ["pa", "hq", "sap"])
def test_other_sample_seeds_draw_otherwise_and_the_same_seeds_alike(name):
    model = _model(name)
    seen = []
    for seeds in (SEEDS, OTHER_SEEDS, SEEDS):
        batch = _batch(seeds)
        torch.rand(7)  # the global generator moves on: it has no say
        out, ctx = model.run(batch, model.context(batch, epoch=EPOCH))
        seen.append(_drawn(name, ctx, model.plugins.losses(out, batch, ctx)))
    assert seen[0].numel() > 0 and not torch.equal(seen[0], seen[1])
    torch.testing.assert_close(seen[2], seen[0], rtol=0, atol=0)


def _ctx(batch) -> ForwardContext:
    return ForwardContext(sam=None, batch=batch)  # type: ignore[arg-type]


def test_rows_of_one_image_draw_apart_and_alike_in_any_batch():
    batch = random_batch(3, prompt="box").select_rows([0, 1, 1, 2, 1]).replace(sample_seed=[7, 8, 9])
    draws = _ctx(batch).rand("key/use", (5,))
    assert draws.shape == (5, 5) and draws.dtype == torch.float32
    assert len({tuple(row.tolist()) for row in draws}) == 5  # image 1's three rows: three ranks
    alone = _ctx(batch.select_images([1])).rand("key/use", (5,))
    torch.testing.assert_close(alone, draws[[1, 2, 4]], rtol=0, atol=0)
    assert not torch.equal(_ctx(batch).rand("key/other", (5,)), draws)  # a stream of its own
    per_image = _ctx(batch).rand("key/use", (2, 3), per_image=True)
    assert per_image.shape == (3, 2, 3)
    torch.testing.assert_close(
        _ctx(batch.select_images([2])).rand("key/use", (2, 3), per_image=True), per_image[2:]
    )


def test_a_batch_without_seeds_or_ids_draws_once_from_the_global_generator():
    """A batch built without ids has none (its positions are only ``names``, which would key an image by
    its place in the batch): its draws come from the global generator."""
    bare = SamBatch(image=torch.zeros(2, 3, 8, 8))
    assert bare.id == [] and bare.names == ["0", "1"] and bare.select_images([1]).names == ["0"]
    batch = random_batch(2, prompt="box").replace(id=[])
    torch.manual_seed(4)
    drawn = _ctx(batch).rand("key/use", (3,), dtype=torch.float64)
    torch.manual_seed(4)
    torch.testing.assert_close(drawn, torch.rand(2, 3, dtype=torch.float64), rtol=0, atol=0)
    state = torch.get_rng_state()
    _ctx(batch.replace(sample_seed=[1, 2])).rand("key/use", (3,))
    assert torch.equal(torch.get_rng_state(), state)  # seeded draws leave the global generator alone


def test_context_views_draw_from_seeds_of_their_own():
    """WSI-SAM's batches run as 2B images (``with_context``): each context view keeps a seed, apart from
    its view's, so its rows draw per sample too, not from the global generator."""
    batch = random_batch(2, prompt="box")
    batch = batch.replace(context_image=batch.image.flip(-1), sample_seed=[5, 6])
    doubled = batch.with_context()
    assert len(doubled.sample_seed) == 4 and doubled.sample_seed[:2] == [5, 6]
    assert len(set(doubled.sample_seed)) == 4
    assert doubled.sample_seed == batch.with_context().sample_seed  # the same every time
    state = torch.get_rng_state()
    draws = _ctx(doubled).rand("key/use", (4,))
    assert torch.equal(torch.get_rng_state(), state) and len({tuple(r.tolist()) for r in draws}) == 4
    alone = _ctx(batch.select_images([1]).with_context()).rand("key/use", (4,))
    torch.testing.assert_close(alone, draws[[1, 3]], rtol=0, atol=0)


def _eval_ctx(batch, epoch: int = 0) -> ForwardContext:
    return ForwardContext(sam=None, batch=batch, training=False, epoch=epoch)  # type: ignore[arg-type]


def test_evaluation_draws_by_image_id_alike_in_any_batch_epoch_and_process_state():
    """A batch without sample seeds (evaluation) keys each image by its id: a row draws alike alone or
    in a batch, in every epoch and whatever the global generator's state (so a validation loss that
    draws is the same in every epoch, batching and DDP rank). Before, one draw from the global
    generator: the halves drew other values than the whole batch."""
    batch = random_batch(3, prompt="box").select_rows([0, 1, 1, 2])
    assert batch.sample_seed == [] and batch.id == ["img0", "img1", "img2"]
    torch.manual_seed(1)
    draws = _eval_ctx(batch).rand("key/use", (6,))
    assert len({tuple(row.tolist()) for row in draws}) == 4  # image 1's two rows: two ranks
    torch.manual_seed(2)
    state = torch.get_rng_state()
    alone = _eval_ctx(batch.select_images([1]), epoch=7).rand("key/use", (6,))
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is not read
    torch.testing.assert_close(alone, draws[[1, 2]], rtol=0, atol=0)
    renamed = batch.replace(id=["img0", "other", "img2"])
    assert not torch.equal(_eval_ctx(renamed).rand("key/use", (6,))[1], draws[1])  # the id is the key
    per_image = _eval_ctx(batch).rand("key/use", (2,), per_image=True)
    torch.testing.assert_close(
        _eval_ctx(batch.select_images([2])).rand("key/use", (2,), per_image=True), per_image[2:]
    )


def test_training_batches_without_seeds_draw_by_id_run_seed_and_epoch():
    """A training loader that gives no sample seeds (a third party's): each image is keyed by its id,
    the run's seed and the epoch, so its draws are its own in any batch and rank, and fresh each
    epoch and run."""
    batch = random_batch(2, prompt="box")

    def drawn(epoch: int, seed: int, images: list[int] = [0, 1]) -> torch.Tensor:  # noqa: B006
        torch.manual_seed(seed)
        ctx = ForwardContext(sam=None, batch=batch.select_images(images), training=True, epoch=epoch)  # type: ignore[arg-type]
        torch.rand(3)  # the global generator's position has no say
        return ctx.rand("key/use", (5,))

    first = drawn(0, 11)
    torch.testing.assert_close(drawn(0, 11, [1]), first[1:], rtol=0, atol=0)
    assert not torch.equal(drawn(1, 11), first)  # another epoch
    assert not torch.equal(drawn(0, 12), first)  # another run seed
    evaluation = _eval_ctx(batch).rand("key/use", (5,))
    assert not torch.equal(evaluation, first)


@pytest.mark.parametrize("name", ["hq", "sap"])
def test_an_evaluation_loss_that_draws_is_the_same_for_a_batch_and_its_halves(name):
    """HQ-SAM's evaluation point loss and SAPNet's negatives come from each image's id (``ctx.rand``):
    the losses of a batch of 4 equal those of its halves put together, in every epoch."""
    model = _model(name).eval()
    batch = random_batch(4, prompt="box", seed=3, dtype=torch.float64)

    def terms(b, epoch: int):
        with torch.no_grad():
            torch.rand(7)
            out, ctx = model.run(b, model.context(b, epoch=epoch))
            got = model.plugins.losses(out, b, ctx)
        return {k: v for k, v in got.items() if k.endswith(("/point_bce", "/point_dice", "/neg"))}

    whole = terms(batch, 0)
    a, b = terms(batch.select_images([0, 1]), 3), terms(batch.select_images([2, 3]), 5)
    assert whole
    for term, value in whole.items():
        if not term.endswith("/neg"):  # SAPNet's negative term weighs by the batch (as the reference)
            torch.testing.assert_close(value, (a[term] + b[term]) / 2, rtol=1e-9, atol=1e-12, msg=term)
    if name == "sap":  # its draws, then: an image's are its own, alike in any batch and epoch
        plugin, cpu = model.plugins["sap"], torch.device("cpu")
        whole_draws = plugin.negative_draws(_eval_ctx(batch), cpu)
        half = plugin.negative_draws(_eval_ctx(batch.select_images([2, 3]), epoch=9), cpu)
        torch.testing.assert_close(whole_draws[:, 2:], half, rtol=0, atol=0)
        assert not torch.equal(whole_draws[:, 0], whole_draws[:, 1])
