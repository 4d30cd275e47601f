"""The two MoD operations, one tensor (pair) at a time: the weight select and the mixture
of distributions. Per operation: a pure-torch reference (the specification), a torch
engine (the CPU path) and a short dispatch to it or to the Triton kernels (`kernels/`)."""
