"""``Predictor`` against segment-anything's ``SamPredictor`` on a SAM built from segment-anything's own
classes, left as segment-anything builds it (its ``LayerNorm``s, no samflow changes), with random
weights copied into samflow's ``build_sam``: odd image sizes (portrait, landscape), points, boxes,
several boxes at once, multimask on and off, mask inputs; then the invariances of the README's
"Use a trained model" (a prompt row alone or padded in a batch, encode once or every time).

Tolerance: both run float32 on the CPU with the same weights, so only the order of sums differs
(samflow's fused layer norms and SDPA attention against segment-anything's explicit ones). Logits are
scaled to O(1) (``LOGIT_SCALE``; mean |logit| about 1) so an absolute tolerance means something:
measured below 1e-5 on logits and IoU predictions; ``ATOL`` = 1e-4 leaves room for other CPUs and
BLAS builds and is still over 100 x below what moving a box by one pixel changes (0.03 to 0.1,
checked in the first test), so prompts in a wrong frame cannot pass. Boolean
masks are compared exactly wherever segment-anything's logit is farther than ``ATOL`` from the
threshold (a pixel within rounding of 0 may fall either way).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from official_code import randomize_all
from segment_anything import SamPredictor
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from samflow import Predictor
from samflow.sam import HookedSam, build_sam
from samflow.sam.build import VARIANTS

SIZE = 256  # the model's input side: 16 x 16 embeddings, 64 x 64 low-resolution masks
SPEC = VARIANTS["tiny"]
LOGIT_SCALE = 300.0  # the mask and IoU heads' last layers, so random weights give logits of O(1)
ATOL = 1e-4
SHAPES = [(300, 517), (517, 300), (33, 700), (257, 255)]  # landscape, portrait, a strip, near the input


def segment_anything_sam() -> Sam:
    """The tiny variant's shape at ``SIZE`` px, built from segment-anything's classes as its
    ``build_sam._build_sam`` builds SAM, with random weights everywhere."""
    grid = SIZE // SPEC.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=SPEC.depth,
            embed_dim=SPEC.embed_dim,
            img_size=SIZE,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=SPEC.num_heads,
            patch_size=SPEC.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=SPEC.global_attn_indexes,
            window_size=SPEC.window_size,
            out_chans=SPEC.prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=SPEC.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(SIZE, SIZE),
            mask_in_chans=SPEC.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=SPEC.prompt_dim,
                mlp_dim=SPEC.decoder_mlp_dim,
                num_heads=SPEC.decoder_heads,
            ),
            transformer_dim=SPEC.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=SPEC.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()
    randomize_all(sam, seed=0)
    with torch.no_grad():
        # segment-anything's own scale of the prompts' Fourier features (N(0, 1)): prompts matter
        pe = sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        pe.copy_(torch.randn(pe.shape, generator=torch.Generator().manual_seed(1)))
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(LOGIT_SCALE)
        sam.mask_decoder.iou_prediction_head.layers[-1].weight.mul_(LOGIT_SCALE)
    return sam


@pytest.fixture(scope="module")
def pair() -> tuple[SamPredictor, Predictor]:
    """segment-anything's SamPredictor on its own SAM; samflow's Predictor on samflow's SAM with the
    same weights (loaded strictly: every key of one is a key of the other)."""
    reference = segment_anything_sam()
    ours = build_sam("tiny", img_size=SIZE)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return SamPredictor(reference), Predictor(HookedSam(ours), device="cpu")


def image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def prompts(shape: tuple[int, int]) -> dict[str, dict[str, np.ndarray]]:
    """Prompts in the original image's pixels, scaled to it; the last point is the far corner."""
    h, w = shape
    box = np.array([0.1 * w, 0.2 * h, 0.7 * w, 0.9 * h]).round()
    points = np.array([[0.3 * w, 0.4 * h], [0.8 * w, 0.1 * h], [w - 1, h - 1]]).round()
    labels = np.array([1, 0, 1])
    return {
        "box": {"box": box},
        "points": {"point_coords": points, "point_labels": labels},
        "box+point": {"box": box, "point_coords": points[:1], "point_labels": labels[:1]},
    }


def assert_same_logits(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)


def assert_same_masks(ours: np.ndarray, theirs: np.ndarray, theirs_logits: np.ndarray) -> None:
    assert ours.dtype == theirs.dtype == bool and ours.shape == theirs.shape
    clear = np.abs(theirs_logits) > ATOL
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(ours[clear], theirs[clear])
    assert 0.05 < theirs.mean() < 0.95  # both classes: the comparison can fail


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_predict_equals_sam_predictor_on_odd_sizes(pair, shape):
    ref, ours = pair
    img = image(shape)
    ref.set_image(img)
    ours.set_image(img)
    assert ours.original_size == ref.original_size == shape
    assert ours.input_size == ref.input_size
    torch.testing.assert_close(ours.get_image_embedding(), ref.get_image_embedding(), atol=ATOL, rtol=0)
    for name, prompt in prompts(shape).items():
        for multimask in (True, False):
            logits, scores, low = ours.predict(**prompt, multimask_output=multimask, return_logits=True)
            want_logits, want_scores, want_low = ref.predict(
                **prompt, multimask_output=multimask, return_logits=True
            )
            assert logits.shape == ((3 if multimask else 1), *shape), name  # the original size, exactly
            assert np.abs(want_logits).mean() > 0.5, name  # logits of O(1): ATOL is meaningful
            assert_same_logits(logits, want_logits)
            assert_same_logits(low, want_low)
            np.testing.assert_allclose(scores, want_scores, atol=ATOL, rtol=0)
            masks = ours.predict(**prompt, multimask_output=multimask)[0]
            assert_same_masks(masks, want_logits > ref.model.mask_threshold, want_logits)
    # the tolerance is far below what a prompt one pixel off changes (coordinates in the right frame)
    box = prompts(shape)["box"]["box"]
    moved = ref.predict(box=box + np.array([1, 0, 1, 0]), multimask_output=False, return_logits=True)[2]
    same = ours.predict(box=box, multimask_output=False, return_logits=True)[2]
    assert np.abs(moved - same).max() > 100 * ATOL


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: f"{s[0]}x{s[1]}")
def test_mask_input_of_earlier_logits_equals_sam_predictor(pair, shape):
    ref, ours = pair
    img = image(shape, seed=1)
    ref.set_image(img)
    ours.set_image(img)
    prompt = prompts(shape)
    for multimask in (True, False):
        low = ref.predict(**prompt["box"], multimask_output=multimask)[2]
        best = low[np.argmax(ref.predict(**prompt["box"], multimask_output=multimask)[1])][None]
        for kind in ("points", "box"):
            got = ours.predict(
                **prompt[kind], mask_input=best, multimask_output=multimask, return_logits=True
            )
            want = ref.predict(
                **prompt[kind], mask_input=best, multimask_output=multimask, return_logits=True
            )
            for a, b in zip(got, want, strict=True):
                assert_same_logits(a, b)
            # the mask input is used: without it the result differs
            bare = ours.predict(**prompt[kind], multimask_output=multimask, return_logits=True)[2]
            assert np.abs(bare - got[2]).max() > 100 * ATOL


@pytest.mark.parametrize("shape", SHAPES[1:2], ids=lambda s: f"{s[0]}x{s[1]}")
def test_predict_torch_several_boxes_and_points_equals_sam_predictor(pair, shape):
    ref, ours = pair
    img = image(shape, seed=2)
    ref.set_image(img)
    ours.set_image(img)
    h, w = shape
    boxes = torch.tensor(
        [[0, 0, w, h], [0.1 * w, 0.2 * h, 0.5 * w, 0.6 * h], [0.4 * w, 0.5 * h, w - 1, h - 1]]
    )
    points = (
        torch.tensor([[[0.3 * w, 0.3 * h], [0.9 * w, 0.9 * h]]] * 3) + torch.arange(3.0)[:, None, None] * 9
    )
    labels = torch.tensor([[1, 0], [1, 1], [0, 1]])
    low_in = ref.predict(box=boxes[1].numpy(), multimask_output=False)[2]
    masks_in = torch.as_tensor(low_in)[None].expand(3, -1, -1, -1)
    model_boxes = ours.transform.apply_boxes_torch(boxes, shape)
    torch.testing.assert_close(model_boxes, ref.transform.apply_boxes_torch(boxes, shape), atol=1e-4, rtol=0)
    model_points = ours.transform.apply_coords_torch(points, shape)
    cases = {
        "boxes": (None, None, model_boxes, None),
        "points": (model_points, labels, None, None),
        "boxes+points+masks": (model_points, labels, model_boxes, masks_in),
    }
    for name, args in cases.items():
        for multimask in (True, False):
            got = ours.predict_torch(*args, multimask_output=multimask, return_logits=True)
            want = ref.predict_torch(*args, multimask_output=multimask, return_logits=True)
            assert got[0].shape == (3, 3 if multimask else 1, *shape), name
            for a, b in zip(got, want, strict=True):
                assert_same_logits(a.numpy(), b.numpy())


def test_a_row_padded_in_a_batch_equals_the_row_alone(pair):
    """Rows with 1, 3 and 2 points (empty slots labelled -1 at the end), with and without boxes:
    each row of the batch equals ``SamPredictor.predict`` on that row's prompt alone."""
    ref, ours = pair
    shape = (300, 517)
    img = image(shape, seed=3)
    ref.set_image(img)
    ours.set_image(img)
    rows = [
        (np.array([[100.0, 50.0]]), np.array([1])),
        (np.array([[300.0, 200.0], [20.0, 280.0], [500.0, 10.0]]), np.array([1, 0, 1])),
        (np.array([[250.0, 150.0], [260.0, 160.0]]), np.array([0, 1])),
    ]
    boxes = np.array([[10.0, 20, 300, 250], [200, 100, 517, 300], [0, 0, 100, 100]])
    coords = np.zeros((3, 3, 2))
    labels = -np.ones((3, 3), dtype=np.int64)
    for r, (c, lab) in enumerate(rows):
        coords[r, : len(c)], labels[r, : len(lab)] = c, lab
    model_coords = torch.as_tensor(ours.transform.apply_coords(coords, shape), dtype=torch.float)
    model_boxes = ours.transform.apply_boxes_torch(torch.as_tensor(boxes), shape)
    for with_box in (False, True):
        batched = ours.predict_torch(
            model_coords, torch.as_tensor(labels), model_boxes if with_box else None, return_logits=True
        )
        for r, (c, lab) in enumerate(rows):
            alone = ref.predict(c, lab, boxes[r] if with_box else None, return_logits=True)
            for a, b in zip(batched, alone, strict=True):
                assert_same_logits(a[r].numpy(), b)


def test_encode_once_decode_many_equals_set_image_each_time(pair):
    """One encoding decoded for prompts of two images in turn equals set_image before each prompt,
    and SamPredictor's; the encodings do not leak into each other."""
    ref, ours = pair
    images = [image(SHAPES[0], seed=4), image(SHAPES[1], seed=5)]
    encodings = [ours.encode(img) for img in images]
    wanted = []
    for img in images:
        ref.set_image(img)
        wanted.append(ref.predict(**prompts(img.shape[:2])["box+point"], return_logits=True))
    for turn in range(2):  # the second turn decodes each encoding after set_image of the other image
        for img, encoding, want in zip(images, encodings, wanted, strict=True):
            prompt = prompts(img.shape[:2])["box+point"]
            kept = ours.predict(**prompt, encoding=encoding, return_logits=True)
            ours.set_image(img)
            fresh = ours.predict(**prompt, return_logits=True)
            for a, b, c in zip(kept, fresh, want, strict=True):
                np.testing.assert_array_equal(a, b)  # the same computation: exactly equal
                assert_same_logits(a, c)
