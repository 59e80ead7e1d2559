"""pyfici's Triton kernels (installed as the package ``pyfici.kernels``).

One file per op family. Every kernel also runs on CPU tensors under
``TRITON_INTERPRET=1``, which is how CI checks them without a GPU.
"""
