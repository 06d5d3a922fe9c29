"""Weight-only quantization, one package: the quantized modules, GGUF tensors loaded straight into
them, and their packed storage in the converted-weight cache.

* :mod:`opengemma.quant.linear` -- :class:`Int8Linear` (per output channel) and :class:`Int4Linear`
  (groups of 32) over PyTorch's packed kernels (or opengemma's own, :mod:`.native`), and
  :class:`QuantizedEmbedding` for the tied embedding/output head.
* :mod:`opengemma.quant.rewrite` -- :func:`quantize_model`, which replaces a float model's linear
  layers and stacks q/k/v and gate/up (:mod:`opengemma.fusion`, applied from outside the model).
* :mod:`opengemma.quant.native` and :mod:`opengemma.quant.native_block` -- opengemma's int8 x int8
  CPU kernels for decode steps (``kernels.c``) and a decode step's whole block in one call
  (``block.c``).
* :mod:`opengemma.quant.head` -- ``mixed`` mode's output head: 8-bit, scored through a 4-bit screen
  when decoding (:class:`ScreenedEmbedding`), and :func:`exact_head` to turn that off.
* :mod:`opengemma.quant.gguf` -- a GGUF file into a quantized model without a float copy; 4-bit
  GGUF tensors become int4 exactly.
* :mod:`opengemma.quant.store` -- a quantized model as flat tensors plus a plan, and back, so the
  converted-weight cache (:mod:`opengemma.checkpoints.cache`) memory-maps packed weights.

Importing the package imports only the modules (no ``gguf`` package): a cached load never needs
the GGUF reader.
"""

from .head import ScreenedEmbedding, decode_weight_bytes, exact_head
from .linear import MODES, Int4Linear, Int8Linear, QuantizedEmbedding
from .rewrite import check_mode, fuse_projections, quantize_model

__all__ = ["MODES", "Int4Linear", "Int8Linear", "QuantizedEmbedding", "ScreenedEmbedding", "check_mode",
           "decode_weight_bytes", "exact_head", "fuse_projections", "quantize_model"]
