"""C++ kernels for the CPU, called from XLA through its FFI, and their Python bindings.

The bottom of the stack: nothing here imports the model, attention, quantization or engine
code; those import this package.

    build.py        compiles the sources into one cached library, detects CPU features
                    (`cpu_features()`), and says which kernel families exist (`features()`)
    layout.py       column tiles: `TILE`, `to_tiles` / `from_tiles`, and `TiledF32Array`,
                    an f32 matrix in them (`tile_f32_params` for a model's projections)
    matmul.py       bindings of matmul_f32.cc and matmul_quant.cc (`f32_tiles_matmul`,
                    `int8_matvec`, `int4_matvec`, `available(bits)`, `tiled_matmul`)
    attention.py    bindings of attention.cc (`paged_decode_attention`,
                    `paged_prefill_attention`, `available()`, `attention_supports`)
    common.h        what the C++ sources share (vector type, worker pool, feature macros)

`JAX_INFER_CPU_KERNELS=0` switches every kernel off (the XLA formulations run instead).
"""

from jax_infer.cpu.build import CpuFeatures, cpu_features, features, parse_cpu_flags

__all__ = ["CpuFeatures", "cpu_features", "features", "parse_cpu_flags"]
