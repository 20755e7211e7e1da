"""Pallas attention kernels, each beside the pure-jnp reference it is tested against.

Every kernel package has the same anatomy:

- ``reference.py``: dense jnp math, obviously correct, also the CPU fallback;
- ``validate.py``: checks that raise ``ValueError`` naming the argument, its value
  and what is allowed;
- ``kernel.py``: a Mosaic TPU variant and a Triton GPU variant;
- ``api.py``: the jitted public wrapper with keyword-only tuning knobs (block sizes in
  a frozen dataclass) and ``interpret`` for running the kernels on the CPU.

Packages:

- ``pallas_kernels.flash_attention``: causal prefill attention over dense K/V, plus
  ``blockwise_attention``, a pure-jnp online-softmax scan for long prompts on the CPU.
- ``pallas_kernels.ragged_paged_attention``: one kernel for a ragged batch of decode
  tokens and prefill chunks reading K/V through a paged cache's block table.
"""
