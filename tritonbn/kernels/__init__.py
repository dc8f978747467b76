"""Pure ``@triton.jit`` kernels. Nothing here touches torch or autograd.

Every kernel sees its tensor as a strided view ``(outer, C, inner)`` and walks
it in 2-D tiles of ``[BLOCK_M, BLOCK_C]``: ``BLOCK_M`` positions of the reduced
axis by ``BLOCK_C`` channels. ``CHANNEL_LAST`` (a constexpr) picks how a tile
index maps to memory: rows of the contiguous ``C`` axis (channels_last, (N, C))
or a block of the contiguous spatial axis for one ``outer`` index (NCHW, NCL).
``FLAT`` (normalize and dx, contiguous NCHW of short unaligned rows such as 7x7)
reads a tile as one run of the block's whole planes, each element's channel
parameters gathered (common.flat_tile), so that its loads are wide.
All kernels run on a grid of (channel blocks) x (splits of the tile range),
except the single-program path (fused.py): one program per channel block, the
whole reduced extent in one tile.
Every kernel takes its pointers (``*_ptr``) first, then its scalars and
constexprs: the host passes them all positionally (ops.py).
"""
from .backward import bwd_combine_kernel, bwd_dx_kernel, bwd_reduce_kernel
from .fused import fused_backward_kernel, fused_forward_kernel
from .normalize import normalize_kernel
from .stats import stats_combine_kernel, stats_partial_kernel

__all__ = [
    "stats_partial_kernel",
    "stats_combine_kernel",
    "normalize_kernel",
    "bwd_reduce_kernel",
    "bwd_combine_kernel",
    "bwd_dx_kernel",
    "fused_forward_kernel",
    "fused_backward_kernel",
]
