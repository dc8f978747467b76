"""tritonbn: fused BatchNorm (+ activation) kernels in Triton, drop-in for torch.nn.

Submodules load on first use, so ``python -m tritonbn`` can choose the Triton
interpreter (TRITON_INTERPRET=1) before triton is imported.
"""
import importlib

__version__ = "0.1.0"
__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "FrozenBatchNorm2d", "SyncBatchNorm", "convert",
           "functional", "__version__"]

_LAZY = {"BatchNorm1d": "modules", "BatchNorm2d": "modules", "BatchNorm3d": "modules",
         "FrozenBatchNorm2d": "modules",
         "SyncBatchNorm": "distributed", "convert": "fusion", "functional": None}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'tritonbn' has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
