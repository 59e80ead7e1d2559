"""Backend layer below :mod:`pyfici.ops`: host-side drivers that run an op on
one backend (score tiles through BLAS / cuBLAS, native selection kernels,
exact refinement). The public ops validate their inputs and then call into
this package; nothing here imports :mod:`pyfici.ops`.
"""
