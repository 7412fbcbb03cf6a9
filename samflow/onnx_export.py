"""``samflow export --onnx``: SAM's prompt encoder and mask decoder, with the plugins, as an ONNX graph.

The graph runs on fixed image embeddings, as segment-anything's ``scripts/export_onnx_model.py``
exports SAM's decoder: the image encoder (with the plugins' encoder hooks) runs once per image in
samflow (``Predictor.encode``), and the graph decodes any number of prompts in any runtime.

Inputs (float32 unless said; N prompt rows, K points, C channels, (h, w) the embedding grid, S the
model's input side):

- ``image_embeddings`` (1, C, h, w): ``Predictor.encode(image).encoded.embeddings``;
- ``point_coords`` (N, K, 2): xy in the resized S x S frame (``predictor.transform.apply_coords``);
- ``point_labels`` (N, K): 1 foreground, 0 background, 2 / 3 a box's top-left / bottom-right corner,
  -1 padding (segment-anything's ONNX convention; the not-a-point token SAM adds to points without a
  box is added by the graph, so the padding point is optional);
- ``mask_input`` (N, 1, 4h, 4w) and ``has_mask_input`` (N,): a previous low-resolution logit map, used
  where ``has_mask_input`` is 1;
- ``orig_im_size`` (2,): the original image's (H, W);
- ``encoder_block_<i>`` (1, h', w', C_i): the output of encoder block i for each block a plugin reads
  (``SamPlugin.encoder_features``; HQ-SAM's early feature), ``encoding.encoded.features[i]``.

Outputs, as ``Predictor.predict(..., return_logits=True)`` gives them for the same prompts:
``masks`` (N, M, H, W) logits at the original size, ``iou_predictions`` (N, M) and ``low_res_masks``
(N, M, 4h, 4w); M is 3 (SAM's tokens 1..3) with ``multimask_output``, else 1 (token 0), and 1 when a
plugin chooses the prediction (``select``: HQ-SAM).

Only plugins that declare ``SamPlugin.onnx_exportable`` are exported: their decoder-side hooks must
trace (no Python branches on tensor values, no randomness) and read no more of the image than
``encoded.embeddings``, ``encoded.features`` and ``encoded.image_pe``. Any other plugin is refused,
by name, before anything is traced.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samflow.batch import SamBatch
from samflow.export import ExportError
from samflow.plugins import PluginStack
from samflow.predictor import chosen_masks
from samflow.predictor_types import one_prompt
from samflow.sam import DecoderContext, EncodedImages, ForwardContext, HookedSam, dense_pe
from samflow.usage import require_extra

if TYPE_CHECKING:
    from samflow.predictor import Predictor
    from samflow.predictor_types import ImageEncoding

__all__ = [
    "ONNX_FILE",
    "OPSET",
    "DecoderGraph",
    "OnnxExportError",
    "check_onnx",
    "check_onnx_exportable",
    "export_onnx",
    "onnx_inputs",
    "run_onnx",
    "write_graph",
]

ONNX_FILE = "decoder.onnx"
OPSET = 17
INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
OUTPUTS = ("masks", "iou_predictions", "low_res_masks")


class OnnxExportError(ExportError):
    """The model cannot be exported to ONNX as asked; the message names the plugin or file."""


def check_onnx_exportable(model: HookedSam) -> None:
    """Refuse, in one line naming it, the first plugin that does not declare ``onnx_exportable``; and an
    export without the ``onnx`` package (torch.onnx writes the graph with it), naming the ``onnx`` extra."""
    require_extra("onnx", "onnx", "samflow export --onnx")
    stack = model.plugins if isinstance(model.plugins, PluginStack) else PluginStack()
    for key, plugin in stack.items():
        if not getattr(type(plugin), "onnx_exportable", False):
            raise OnnxExportError(
                f"Plugin {key!r} ({type(plugin).__name__}) cannot be exported to ONNX: it does not declare "
                "SamPlugin.onnx_exportable (its decoder-side hooks may not trace). Export without --onnx "
                "and predict with Predictor.from_export."
            )


def block_input_name(block: int) -> str:
    """The ONNX input of encoder block ``block``'s output."""
    return f"encoder_block_{block}"


class DecoderGraph(nn.Module):
    """``HookedSam.decode`` with the plugins on fixed image embeddings, in segment-anything's ONNX
    form (see the module docstring for inputs and outputs).

    Args:
        model: SAM and its plugins (weights loaded, eval mode).
        multimask_output: SAM's tokens 1..3 instead of token 0 (and the rule plugins follow).
        resize_mode: the geometry of ``orig_im_size`` -> the S x S frame: ``"longest"`` or ``"stretch"``.
    """

    def __init__(
        self, model: HookedSam, *, multimask_output: bool = True, resize_mode: str = "longest"
    ) -> None:
        super().__init__()
        check_onnx_exportable(model)
        self.model = model
        self.multimask_output = multimask_output
        self.resize_mode = resize_mode
        self.blocks = tuple(sorted(set(model.plugins.encoder_features())))
        self._feature_shapes: list[torch.Size] | None = None

    def feature_shapes(self) -> list[torch.Size]:
        """Shapes of the ``encoder_block_<i>`` inputs: one encoder pass on a blank image, the first time."""
        if self._feature_shapes is None:
            size, dev = self.model.img_size, next(self.model.parameters()).device
            blank = SamBatch(image=torch.zeros(1, 3, size, size, device=dev))
            with torch.no_grad():
                found = self.model.encode(self.model.context(blank)).features if self.blocks else {}
            self._feature_shapes = [found[b].shape for b in self.blocks]
        return self._feature_shapes

    @property
    def input_names(self) -> list[str]:
        return [*INPUTS, *(block_input_name(b) for b in self.blocks)]

    def forward(
        self,
        image_embeddings: Tensor,
        point_coords: Tensor,
        point_labels: Tensor,
        mask_input: Tensor,
        has_mask_input: Tensor,
        orig_im_size: Tensor,
        *features: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        model, size = self.model, self.model.img_size
        labels = point_labels.to(torch.int64)  # (N, K)
        first, second = labels == 2, labels == 3  # box corners, in segment-anything's convention
        corners = [(point_coords * c.unsqueeze(-1).to(point_coords.dtype)).sum(1) for c in (first, second)]
        original = orig_im_size.to(torch.float32)
        if self.resize_mode == "longest":  # SAM's rule: floor(scale * side + 0.5)
            input_size = torch.floor(original * (size / original.max()) + 0.5).to(torch.int64)
        else:
            input_size = torch.full_like(original, size).to(torch.int64)
        rows = torch.zeros_like(labels[:, 0])  # every row is on the one image
        batch = SamBatch(
            image=image_embeddings.new_zeros(1, 3, size, size),  # unread: only embeddings and features are
            input_size=input_size[None],
            original_size=orig_im_size.to(torch.int64)[None],
            image_index=rows,
            points=point_coords,
            point_labels=torch.where(labels >= 2, torch.full_like(labels, -1), labels),
            box=torch.cat(corners, -1),
            has_box=first.any(1),
            mask_prompt=mask_input,
            has_mask_prompt=has_mask_input > 0.5,
        )
        pe = model.sam.prompt_encoder
        encoded = EncodedImages(
            normalized=batch.image,
            embeddings=image_embeddings,
            features=dict(zip(self.blocks, features, strict=True)),
            image_pe=dense_pe(pe.pe_layer, pe.image_embedding_size, image_embeddings.dtype),
        )
        ctx = ForwardContext(sam=model.sam, batch=batch, multimask_output=self.multimask_output)
        out = model.decode(DecoderContext.after_encoder(ctx, encoded))
        low, scores = chosen_masks(model, out, self.multimask_output)
        full = F.interpolate(low, (size, size), mode="bilinear", align_corners=False)
        full = full[..., : input_size[0], : input_size[1]]
        height, width = orig_im_size.to(torch.int64).unbind()
        # 0-d tensors as the size: the tracer records them, so the output size follows orig_im_size
        target: Any = (height, width)
        masks = F.interpolate(full, target, mode="bilinear", align_corners=False)
        return masks, scores, low


def example_inputs(graph: DecoderGraph, rows: int = 1, points: int = 2) -> tuple[Tensor, ...]:
    """Inputs of the right shapes for tracing ``graph`` (random embeddings, a box and a point)."""
    sam = graph.model.sam
    pe = sam.prompt_encoder
    h, w = pe.image_embedding_size
    param = next(graph.model.parameters())
    dev, dtype = param.device, param.dtype
    gen = torch.Generator().manual_seed(0)
    features = [torch.randn(shape, generator=gen).to(dev, dtype) for shape in graph.feature_shapes()]
    coords = torch.rand(rows, points, 2, generator=gen) * graph.model.img_size
    labels = torch.tensor([[1] + [2, 3][: points - 1] + [-1] * max(points - 3, 0)] * rows, dtype=torch.float)
    return (
        torch.randn(1, pe.embed_dim, h, w, generator=gen).to(dev, dtype),
        coords.to(dev, dtype),
        labels.to(dev, dtype),
        torch.zeros(rows, 1, 4 * h, 4 * w, device=dev, dtype=dtype),
        torch.zeros(rows, device=dev, dtype=dtype),
        torch.tensor([graph.model.img_size, graph.model.img_size], device=dev, dtype=torch.float),
        *features,
    )


def export_onnx(
    model: HookedSam,
    path: str | Path,
    *,
    multimask_output: bool = True,
    resize_mode: str = "longest",
    opset: int = OPSET,
) -> Path:
    """Write the decoder graph of ``model`` to ``path`` (see the module docstring); returns the path.

    Raises ``OnnxExportError`` naming the plugin when one does not declare ``onnx_exportable``.
    """
    graph = DecoderGraph(model.eval(), multimask_output=multimask_output, resize_mode=resize_mode)
    return write_graph(graph, path, opset=opset)


def write_graph(graph: DecoderGraph, path: str | Path, *, opset: int = OPSET) -> Path:
    """Trace ``graph`` into the ONNX file ``path`` (prompt rows, points and image size dynamic)."""
    names = graph.input_names
    dynamic = {
        "point_coords": {0: "prompts", 1: "points"},
        "point_labels": {0: "prompts", 1: "points"},
        "mask_input": {0: "prompts"},
        "has_mask_input": {0: "prompts"},
        "masks": {0: "prompts", 2: "height", 3: "width"},
        "iou_predictions": {0: "prompts"},
        "low_res_masks": {0: "prompts"},
    }
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # the legacy exporter's deprecation and constant-folding notes, and tracer warnings about shape
        # checks; a value the trace would freeze wrongly shows in check_onnx, on other inputs
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            example_inputs(graph),
            str(target),
            input_names=names,
            output_names=list(OUTPUTS),
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return target


def check_onnx(graph: DecoderGraph, path: str | Path) -> float:
    """Largest |onnxruntime - PyTorch| over the three outputs on inputs unlike the traced ones: three
    prompt rows (point + box, two points, one point with padding), one with a mask input, a 97 x 140
    image. Raises ``ImportError`` without onnxruntime."""
    import onnxruntime  # noqa: F401 - ImportError when it is missing

    traced = example_inputs(graph)
    embeddings, features = traced[0], traced[6:]
    gen = torch.Generator().manual_seed(1)
    size = graph.model.img_size
    coords = (torch.rand(3, 3, 2, generator=gen) * size).to(embeddings)
    labels = torch.tensor(
        [[1, 2, 3], [1, 0, -1], [1, -1, -1]], dtype=embeddings.dtype, device=embeddings.device
    )
    h, w = embeddings.shape[-2:]
    mask = torch.randn(3, 1, 4 * h, 4 * w, generator=gen).to(embeddings)
    has_mask = torch.tensor([0.0, 1.0, 0.0]).to(embeddings)
    orig = torch.tensor([97.0, 140.0], device=embeddings.device)
    inputs = (embeddings, coords, labels, mask, has_mask, orig, *features)
    with torch.no_grad():
        expected = graph(*inputs)
    got = run_onnx(path, {n: _numpy(x) for n, x in zip(graph.input_names, inputs, strict=True)})
    return max(float(np.abs(g - _numpy(e)).max()) for g, e in zip(got, expected, strict=True))


def onnx_inputs(
    predictor: Predictor,
    encoding: ImageEncoding,
    point_coords: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    mask_input: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The graph's inputs for one prompt on an encoded image, from the original image's pixels.

    Args:
        predictor: gives the geometry (``transform``); encoding: ``predictor.encode(image)``.
        point_coords (K, 2), point_labels (K,), box (4,), mask_input (1, 4h, 4w): as ``Predictor.predict``.

    Returns:
        ``{name: array}`` for ``onnxruntime.InferenceSession.run`` (one prompt row).
    """
    original = encoding.original_size
    encoded = encoding.encoded
    h, w = encoded.embeddings.shape[-2:]
    point_coords, point_labels, box, mask_input = one_prompt(  # predict's checks
        point_coords, point_labels, box, mask_input, (4 * h, 4 * w)
    )
    coords = np.zeros((0, 2))
    labels = np.zeros(0)
    if point_coords is not None:
        coords = predictor.transform.apply_coords(np.asarray(point_coords, dtype=np.float64), original)
        labels = np.asarray(point_labels, dtype=np.float64)
    if box is not None:
        corners = predictor.transform.apply_boxes(np.asarray(box, dtype=np.float64), original).reshape(2, 2)
        coords = np.concatenate([coords, corners])
        labels = np.concatenate([labels, [2, 3]])
    if len(coords) == 0:
        coords, labels = np.zeros((1, 2)), np.array([-1.0])  # no prompt: SAM's padding point alone
    inputs: dict[str, np.ndarray] = {
        "image_embeddings": _numpy(encoded.embeddings),
        "point_coords": coords[None].astype(np.float32),
        "point_labels": labels[None].astype(np.float32),
        "mask_input": np.zeros((1, 1, 4 * h, 4 * w), np.float32)
        if mask_input is None
        else np.asarray(mask_input, np.float32).reshape(1, 1, 4 * h, 4 * w),
        "has_mask_input": np.array([0.0 if mask_input is None else 1.0], np.float32),
        "orig_im_size": np.array(original, np.float32),
    }
    for block in sorted(set(predictor.model.plugins.encoder_features())):
        inputs[block_input_name(block)] = _numpy(encoded.features[block])
    return inputs


def _numpy(x: Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def run_onnx(path: str | Path, inputs: Mapping[str, np.ndarray], **session: Any) -> list[np.ndarray]:
    """Run the graph at ``path`` with onnxruntime on the CPU -> ``[masks, iou_predictions, low_res_masks]``."""
    try:
        import onnxruntime
    except ImportError as err:
        raise OnnxExportError(
            "onnxruntime is not installed; pip install 'samflow[onnx]' to run exported graphs."
        ) from err
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"], **session)
    return list(sess.run(list(OUTPUTS), dict(inputs)))
