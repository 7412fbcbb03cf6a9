"""LoRA's dropout draws each image's mask from the image's key, not from the global generator.

peft's ``lora_dropout`` is an ``nn.Dropout``: one draw for the batch from the global generator, so an
image's mask (and its loss and gradients) depended on its batch-mates and on whatever drew before.
``KeyedDropout`` takes its place: an image's mask comes from its sample seed (or its id, the run's seed
and the epoch), the same alone or in a batch, and again when activation checkpointing recomputes a block.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, random_batch

from samflow.module import SamflowModule, SamSpec
from samflow.plugins import PluginStack
from samflow.sam import HookedSam, build_sam
from samflow.sam.types import running
from samflow_plugins.lora import LoRA
from samflow_plugins.lora.dropout import KeyedDropout

TARGETS = ["qkv", "proj", "lin1", "lin2"]


def module_with(dropout: float, **sam) -> SamflowModule:
    torch.manual_seed(0)
    module = SamflowModule(
        sam=SamSpec(variant="tiny", **sam),
        plugins={"lora": LoRA(dropout=dropout, targets=TARGETS)},
        losses={"bce": 1.0},
    )
    with torch.no_grad():  # B non-zero: the dropped input reaches the output, and A gets a gradient
        gen = torch.Generator().manual_seed(1)
        for p in module.plugins.owned["lora"].values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return module


def seeded(seeds: list[int]):
    return random_batch(len(seeds)).replace(sample_seed=seeds)


def step(module: SamflowModule, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(prediction, loss, LoRA gradients) of one training forward and backward."""
    module.zero_grad()
    out, ctx = module(batch)
    loss = module.compute_losses(out, ctx.batch, ctx)["total"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.plugins.owned["lora"].items()}
    return out.pred.detach(), loss.detach(), grads


def test_peft_layers_take_the_keyed_dropout():
    module = module_with(0.5)
    encoder = module.model.sam.image_encoder
    layers = [m for n, m in encoder.named_modules() if n.endswith(("attn.qkv", "mlp.lin2"))]
    assert layers and all(isinstance(m.lora_dropout["lora"], KeyedDropout) for m in layers)
    streams = [m.lora_dropout["lora"].stream for m in layers]
    assert len(set(streams)) == len(streams)  # every layer draws its own masks
    assert not any(isinstance(m, torch.nn.Dropout) for m in module.model.sam.modules())


def test_a_rows_loss_and_gradients_alone_equal_its_part_in_a_batch_of_two():
    module = module_with(0.5).train()
    pair = seeded([11, 12])
    pred, loss, grads = step(module, pair)
    alone = [step(module, pair.select_images([i])) for i in range(2)]
    for i, (pred_i, _, _) in enumerate(alone):
        torch.testing.assert_close(pred_i[0], pred[i], rtol=1e-5, atol=1e-6)
    # the batch's loss is the mean of its rows' (bce), and so its gradients
    torch.testing.assert_close(loss, (alone[0][1] + alone[1][1]) / 2, rtol=1e-5, atol=1e-7)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, (alone[0][2][name] + alone[1][2][name]) / 2, rtol=1e-4, atol=1e-7)
    # the masks do drop: without dropout the rows come out otherwise
    plain = module_with(0.0).train()
    assert not torch.allclose(step(plain, pair)[0], pred)


@pytest.mark.parametrize("device", DEVICES)
def test_a_rows_prediction_alone_equals_its_row_in_a_batch_on_the_device(device):
    """The masks come from a generator on the activation's device (a GPU's draws differ from the CPU's,
    but still follow the image alone)."""
    module = module_with(0.5).to(device).train()
    pair = seeded([11, 12]).to(device)
    with torch.no_grad():
        together = module(pair)[0].pred
        alone = [module(pair.select_images([i]))[0].pred for i in range(2)]
        plain = module_with(0.0).to(device).train()(pair)[0].pred
    assert together.device.type == device
    for i in range(2):
        torch.testing.assert_close(alone[i][0], together[i], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, together)  # the masks do drop


def test_the_mask_follows_the_seed_not_the_global_generator():
    module = module_with(0.5).train()
    image = random_batch(1)

    def embeddings(seed: int) -> torch.Tensor:
        # with gradients, as in training (under no_grad SAM runs lin1 / lin2 in token pieces, which
        # have no image axis: see test_without_an_image_axis_it_is_plain_dropout)
        return module.model.run(image.replace(sample_seed=[seed]))[1].encoded.embeddings.detach()

    torch.manual_seed(3)
    state = torch.get_rng_state()
    first = embeddings(1)
    assert torch.equal(torch.get_rng_state(), state)  # no draw from the global generator
    torch.manual_seed(4)
    again, other = embeddings(1), embeddings(2)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not torch.allclose(other, first)


def test_eval_has_no_dropout():
    module, plain = module_with(0.5).eval(), module_with(0.0).eval()
    batch = seeded([11, 12])
    with torch.no_grad():
        torch.testing.assert_close(module(batch)[0].pred, plain(batch)[0].pred, rtol=0, atol=0)


def test_activation_checkpointing_recomputes_the_same_masks():
    grads = []
    for checkpoint_blocks, global_seed in ((False, 5), (True, 6)):
        module = module_with(0.5, checkpoint_blocks=checkpoint_blocks).train()
        torch.manual_seed(global_seed)  # another global state: the masks come from the sample seeds
        grads.append(step(module, seeded([11, 12]))[2])
    plain, recomputed = grads
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7)


def context(seeds: list[int]):
    """A training forward's context for images with these sample seeds."""
    return HookedSam(build_sam("tiny")).train().context(seeded(seeds))


def test_the_mask_of_each_image_is_its_own_draw():
    """On the module itself: rows of one image share a seed, kept values are scaled by 1 / (1 - p),
    and each image's block of rows is what it draws alone."""
    dropout = KeyedDropout(0.25, "s").train()
    x = torch.ones(2 * 3, 4, 4, 8)  # 2 images of 3 windows each
    with running(context([7, 8])):
        both = dropout(x)
    with running(context([8])):
        second = dropout(x[3:])
    torch.testing.assert_close(both[3:], second, rtol=0, atol=0)
    assert set(both.unique().tolist()) == {0.0, torch.tensor(1 / 0.75).item()}  # float32
    kept = (both > 0).float().mean().item()
    assert abs(kept - 0.75) < 0.03  # 768 values per image
    assert not torch.equal(both[:3], both[3:])
    dropout.eval()
    assert dropout(x) is x


@pytest.mark.parametrize("seeds", [None, [1, 2, 3]])
def test_without_an_image_axis_it_is_plain_dropout(seeds):
    """Outside a block HookedSam runs, or an input that does not split into the images."""
    dropout = KeyedDropout(0.5, "s").train()
    x = torch.ones(16, 8)
    torch.manual_seed(0)
    if seeds is None:
        out = dropout(x)
    else:
        with running(context(seeds)):
            out = dropout(x)
    torch.manual_seed(0)
    torch.testing.assert_close(out, torch.nn.functional.dropout(x, 0.5, training=True), rtol=0, atol=0)


def test_hooked_sam_without_keys_draws_from_the_global_generator(tiny_sam):
    """A batch with neither sample seeds nor ids draws as ``nn.Dropout`` did: from the global stream."""
    model = HookedSam(tiny_sam, PluginStack({"lora": LoRA(dropout=0.5, targets=TARGETS)})).train()
    batch = random_batch(1).replace(id=[])
    with torch.no_grad():
        for p in model.plugins.owned["lora"].values():
            p.add_(0.05)
    torch.manual_seed(0)
    first = model.run(batch)[1].encoded.embeddings.detach()
    torch.manual_seed(0)
    again = model.run(batch)[1].encoded.embeddings.detach()
    other = model.run(batch)[1].encoded.embeddings.detach()
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not torch.allclose(other, first)
