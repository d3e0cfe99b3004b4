"""intq: integer-only quantized inference (HAWQV3 dyadic arithmetic, I-ViT
Shiftmax / ShiftGELU / I-LayerNorm), exported as integer-only ONNX."""

from intq.config import Calibration, QuantConfig

__version__ = "0.1.0"
__all__ = ["Calibration", "QuantConfig", "finetune", "load", "pareto", "quantize", "__version__"]


def __getattr__(name):
    # torch and onnx load only when the API is used (the CLI's --help stays fast)
    if name == "quantize":
        from intq.api import quantize

        return quantize
    if name == "finetune":
        from intq.finetuning import finetune

        return finetune
    if name == "pareto":
        from intq.sweep import pareto

        return pareto
    if name == "load":
        from intq.runtime import load

        return load
    raise AttributeError(name)
