"""Weight-only quantization: formats (arrays.py), the params transform (transform.py), and the
products the model's seams use (matmul.py, with the native CPU kernels of jax_infer/cpu).

    from jax_infer.quant import quantize
    qparams = quantize(params, "int8+embed")   # or "int4", "int4-g64+embed", "int8-g64", ...
    LLM(model="smollm2-135m", quantization="int4+embed")
"""

from jax_infer.quant.arrays import (
    Int4Array,
    Int8Array,
    QuantizedArray,
    QuantizedView,
    as_quantized,
    dequantize,
    dequantize_stored,
    pack_int4,
    quantize_matrix,
    unpack_int4,
)
from jax_infer.quant.matmul import quantized_matmul, quantized_take
from jax_infer.quant.transform import (
    QuantScheme,
    is_quantized,
    parse_scheme,
    quantize,
    weight_bytes,
)

__all__ = [
    "Int4Array",
    "Int8Array",
    "QuantScheme",
    "QuantizedArray",
    "QuantizedView",
    "as_quantized",
    "dequantize",
    "dequantize_stored",
    "is_quantized",
    "pack_int4",
    "parse_scheme",
    "quantize",
    "quantize_matrix",
    "quantized_matmul",
    "quantized_take",
    "unpack_int4",
    "weight_bytes",
]
