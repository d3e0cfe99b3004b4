"""A corpus of ONNX files as users have them: other exporters, other authors' code, real weights where we have them.

``build(name, exporter, folder)`` writes ``<name>-<exporter>.onnx`` and its
calibration ``.npz`` into ``folder`` and returns a ``CorpusEntry`` with held-out
inputs to check it on.  ``exporter`` is ``"legacy"`` (``torch.onnx.export(...,
dynamo=False)``, opset 17, ``dynamic_axes``: still the most common export)
or ``"dynamo"`` (``dynamo=True`` with ``dynamic_shapes``); the batch axis,
and the sequence axis of text models, stay dynamic in both.

=====================  ========================================  =========================================
name                   what                                      data (real where the weights are)
=====================  ========================================  =========================================
``vit-cifar``          the project's ViT, trained on CIFAR-10    CIFAR-10 test JPEGs (calib 64, eval 256)
``bert-minilm``        the project's BertEncoder, MiniLM-L6      SST-2 phrases, one length, no mask
``hf-bert-minilm``     ``transformers.BertModel`` of MiniLM-L6   SST-2 sentences padded, ``attention_mask``
                       with ``attention_mask``, ``token_type_ids`` and ``token_type_ids`` inputs
``resnet18``           the project's ResNet-18 (CIFAR stem)      CIFAR-10 images; ``trained_like`` BN
``mobilenetv2``        the project's MobileNetV2 (width 0.5)     CIFAR-10 images; ``trained_like`` BN
``efficientnet-like``  ``zoo.EfficientNetLike`` (SiLU, SE)       CIFAR-10 images; ``trained_like`` BN
``mobilenetv3-like``   ``zoo.MobileNetV3Like`` (HardSwish, SE)   CIFAR-10 images; ``trained_like`` BN
``timm-vit``           ``zoo.TimmViT`` (SDPA, LayerScale,         CIFAR-10 images
                       interpolated position table)
=====================  ========================================  =========================================

Nothing is downloaded: MiniLM-L6 comes from its pip package, CIFAR-10 and
SST-2 from ``../shared/data``; the models without real weights get the
statistics a trained network has (``zoo.trained_like``).
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

NAMES = (
    "vit-cifar",
    "bert-minilm",
    "hf-bert-minilm",
    "resnet18",
    "mobilenetv2",
    "efficientnet-like",
    "mobilenetv3-like",
    "timm-vit",
)
EXPORTERS = ("legacy", "dynamo")
TEXT_LENGTH = 24  # tokens per padded sentence (the CLI's .npz holds one length)
HF_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass
class CorpusEntry:
    name: str
    exporter: str
    onnx_path: Path
    calib_path: Path
    eval_feeds: dict[str, np.ndarray]  # held-out inputs, keyed by input name
    labels: np.ndarray | None = None  # the eval inputs' labels where the data is labelled
    real_weights: bool = False
    mask_input: str | None = None  # the attention mask's input name (text models with masks)


# ---------------------------------------------------------------- data


def cifar_images(start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 test images ``[start, start + count)`` (class-balanced order), normalized NCHW, and labels."""
    from intq.models.cifar10 import load_cifar10, to_nchw

    images, labels = load_cifar10("test", limit=start + count)
    return to_nchw(images[start:], normalize=True).numpy(), labels[start:]


def padded_sentences(sentences: list[str], length: int = TEXT_LENGTH) -> dict[str, np.ndarray]:
    """MiniLM-L6 token ids of ``sentences`` padded (id 0) or cut to ``length``, with the mask and token types."""
    from intq.models.minilm import load_tokenizer, minilm_path

    tokenizer = load_tokenizer(minilm_path(), max_tokens=length)
    ids = np.zeros((len(sentences), length), np.int64)
    mask = np.zeros((len(sentences), length), np.int64)
    for row, encoding in enumerate(tokenizer.encode_batch(sentences)):
        ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def fixed_length_ids(sentences: list[str], length: int = 12) -> np.ndarray:
    """``[CLS] + length - 2 tokens + [SEP]`` of the sentences that long (no padding: BertEncoder has no mask)."""
    from intq.models.minilm import load_tokenizer, minilm_path

    tokenizer = load_tokenizer(minilm_path())
    cut = [e.ids[: length - 1] + [102] for e in tokenizer.encode_batch(sentences) if len(e.ids) >= length]
    return np.array(cut, dtype=np.int64)


# ---------------------------------------------------------------- models


class _LastHidden(torch.nn.Module):
    """``BertModel`` as ``(input_ids, attention_mask, token_type_ids) -> last_hidden_state``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state


def hf_minilm() -> torch.nn.Module:
    """MiniLM-L6 as ``transformers.BertModel`` (eager attention: the export transformers documents)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel

    from intq.models.minilm import minilm_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = BertModel.from_pretrained(str(minilm_path()), attn_implementation="eager")
    return _LastHidden(model.eval()).eval()


def _image_model(name: str, calib: np.ndarray) -> torch.nn.Module:
    from intq.models import zoo
    from intq.models.mobilenet import mobilenet_v2
    from intq.models.resnet import resnet18

    torch.manual_seed(0)
    if name == "timm-vit":
        return zoo.TimmViT().eval()
    make = {
        "resnet18": lambda: resnet18(10, cifar_stem=True),
        "mobilenetv2": lambda: mobilenet_v2(10, width=0.5, cifar_stem=True),
        "efficientnet-like": zoo.EfficientNetLike,
        "mobilenetv3-like": zoo.MobileNetV3Like,
    }[name]
    batches = [torch.from_numpy(calib[i : i + 16]) for i in range(0, len(calib), 16)]
    return zoo.trained_like(zoo.fan_in_init(make()), batches)


# ---------------------------------------------------------------- export


def export(
    module: torch.nn.Module, example: tuple, names: list[str], dynamic: dict[str, dict[int, str]], exporter: str
) -> onnx.ModelProto:
    """``module`` exported by ``exporter`` with the dims in ``dynamic`` (input -> {axis: name}) kept symbolic."""
    module = module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            buffer = io.BytesIO()
            torch.onnx.export(
                module, example, buffer, dynamo=False, input_names=names, dynamic_axes=dynamic, opset_version=17
            )
            return onnx.load_from_string(buffer.getvalue())
        dims: dict[str, torch.export.Dim] = {}
        shapes = tuple({axis: dims.setdefault(d, torch.export.Dim(d)) for axis, d in dynamic[n].items()} for n in names)
        program = torch.onnx.export(module, example, dynamo=True, input_names=names, dynamic_shapes=shapes)
        return program.model_proto


def build(name: str, exporter: str, folder: str | Path) -> CorpusEntry:
    """Export corpus model ``name`` with ``exporter`` into ``folder``; its calibration file and eval inputs."""
    if name not in NAMES or exporter not in EXPORTERS:
        raise ValueError(f"unknown corpus entry {name!r} / {exporter!r}; names {NAMES}, exporters {EXPORTERS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path, calib_path = folder / f"{name}-{exporter}.onnx", folder / f"{name}-calib.npz"
    labels, real, mask_input = None, False, None
    if name in ("bert-minilm", "hf-bert-minilm"):
        from intq.models.sst2 import load_calibration_sentences, load_sst2

        real = True
        dev, dev_labels = load_sst2("dev")
        if name == "bert-minilm":
            from intq.models.minilm import load_minilm_l6

            module = load_minilm_l6()[0]
            calib = {"input_ids": fixed_length_ids(load_calibration_sentences(256))[:64]}
            eval_feeds = {"input_ids": fixed_length_ids(dev)[:24]}
            names, dynamic = ["input_ids"], {"input_ids": {0: "batch", 1: "seq"}}
        else:
            module, mask_input = hf_minilm(), "attention_mask"
            calib = padded_sentences(load_calibration_sentences(64))
            eval_feeds, labels = padded_sentences(dev[:64]), dev_labels[:64]
            names, dynamic = list(HF_INPUTS), {n: {0: "batch", 1: "seq"} for n in HF_INPUTS}
        example = tuple(torch.from_numpy(calib[n][:2]) for n in names)
    else:
        images, _ = cifar_images(0, 64)
        eval_images, labels = cifar_images(64, 256 if name == "vit-cifar" else 32)
        if name == "vit-cifar":
            from intq.models.vit import load_cifar_vit

            module, real = load_cifar_vit(), True
        else:
            module = _image_model(name, images)
        calib, eval_feeds = {"images": images}, {"images": eval_images}
        names, dynamic = ["images"], {"images": {0: "batch"}}
        example = (torch.from_numpy(images[:2]),)
    onnx.save(export(module, example, names, dynamic, exporter), onnx_path)
    np.savez(calib_path, **calib)
    return CorpusEntry(name, exporter, onnx_path, calib_path, eval_feeds, labels, real, mask_input)
