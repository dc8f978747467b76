"""Compile every kernel launch the host code makes, for sm_90 (H100), without a GPU.

Run without TRITON_INTERPRET. ops' launches are intercepted: instead of running,
each distinct (kernel, signature, constexprs) is compiled by Triton's real
compiler down to a cubin with the ptxas that ships in the triton wheel. This
catches what the interpreter cannot (block shapes, dtype errors in codegen),
but proves nothing about results: only a GPU run does that.
Usage: python tests/compile_sm90.py  -> prints one line per compiled variant.
"""
import dataclasses
import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tritonbn import ops  # noqa: E402

TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
         torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8"}
TARGET = GPUTarget("cuda", 90, 32)
seen = set()


def _type(v):
    if isinstance(v, torch.Tensor):
        return "*" + TYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(type(v))


class Compile:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, **kwargs):
            fn = self.kernel
            bound = dict(zip(fn.arg_names, args), **kwargs)
            consts = {p.name for p in fn.params if p.is_constexpr}
            sig, cst = {}, {}
            for i, name in enumerate(fn.arg_names):
                if name in consts:
                    sig[name] = "constexpr"
                    cst[(i,)] = bound[name]
                else:
                    sig[name] = _type(bound[name])
            key = (fn.__name__, tuple(sig.items()), tuple(sorted((k, str(v)) for k, v in cst.items())),
                   num_warps, num_stages)
            if key in seen:
                return
            seen.add(key)
            out = triton.compile(ASTSource(fn, sig, cst), target=TARGET,
                                 options={"num_warps": num_warps, "num_stages": num_stages})
            assert len(out.asm["cubin"]) > 0
            flags = {fn.arg_names[i[0]]: v for i, v in cst.items()}
            print(f"ok {fn.__name__} warps={num_warps} stages={num_stages} {flags} {sig.get('x_ptr', '')}", flush=True)
        return launch


def _input(shape, fmt, dtype):
    """x (never read: launches only compile), its channels, and its parameter dtype."""
    x = torch.empty(shape, dtype=dtype)
    if fmt is not None:
        x = x.to(memory_format=fmt)
    return x, shape[1], torch.float64 if dtype == torch.float64 else torch.float32


def main():
    for name in ops.K.__all__:
        setattr(ops.K, name, Compile(getattr(ops.K, name)))
    cases = [((6, 5), None), ((4, 5, 7, 3), None), ((4, 5, 7, 3), torch.channels_last)]
    for (shape, fmt), dtype, act, affine, int64 in itertools.product(
            cases, TYPES_FLOAT, [None, "relu"], [True, False], [False, True]):
        if int64 and (dtype != torch.float16 or act is None):
            continue
        x, C, pdt = _input(shape, fmt, dtype)
        w = torch.empty(C, dtype=pdt) if affine else None
        b = torch.empty(C, dtype=pdt) if affine else None
        rm, rv, nbt = torch.empty(C, dtype=pdt), torch.empty(C, dtype=pdt), torch.ones((), dtype=torch.int64)
        # the split path with its combines in the reduce launches' last programs (the
        # default) and, in fp32, in launches of their own (the fallback under CUDA graph
        # capture; its reduce kernels are those statistics() and sync_variants launch)
        paths = (("fused", None), ("split", "last"))
        if dtype == torch.float32 and not int64:
            paths += (("split", "kernel"),)
        for (path, combine), (batch, momentum) in itertools.product(
                paths, ((True, 0.1), (True, None), (False, 0.1))):
            with ops.launch_overrides(int64=int64, path=path, combine=combine):
                # count: the module's num_batches_tracked += 1 in the statistics launch
                y, xk, v, mean, s, _, _, _ = ops.forward(x, w, b, rm, rv, nbt, batch, momentum,
                                                         1e-5, act, count=batch)
                ops.backward(torch.empty_like(y), xk, v, mean, s, w, b, batch, 1e-5, act,
                             (True, affine, affine, False))
                ops.backward(torch.empty_like(y), xk, v, mean, s, w, b, batch, 1e-5, act,
                             (False, affine, False, False))
                if batch:  # the torch.compile op that takes the statistics alone
                    ops.statistics(xk, v, True, rm, rv, nbt, momentum, 1e-5)
    residual_variants(cases)
    fused_tiles()
    sync_variants(cases)
    print(f"compiled {len(seen)} kernel variants for sm_90")
    for name in ops.K.__all__:
        setattr(ops.K, name, getattr(ops.K, name).kernel)
    sass_checks()
    short_rows_checks()
    occupancy_checks()
    for name in ops.K.__all__:
        setattr(ops.K, name, Compile(getattr(ops.K, name)))
    before = len(seen)
    search_space()
    print(f"compiled {len(seen) - before} tuning candidates for sm_90")
    return 0


# issue 16's activations, more elementwise code in the same kernels: for the time,
# compiled on one case, in training, after a residual (mask or reload; no residual
# is the same code less z's load), on both paths, in fp16, bf16 and (those with exp)
# fp64
MORE_ACTS = ("relu6", "hardswish", "hardsigmoid", "mish", "elu", "gelu_tanh")


def residual_variants(cases):
    """Every activation, with and without a residual (mask or reload), train and eval,
    with dz alone and with dx; 64-bit offsets on the mask path too."""
    for (shape, fmt), dtype, act, int64 in itertools.product(
            cases, TYPES_FLOAT, list(ops.ACTIVATIONS), [False, True]):
        if int64 and (dtype != torch.float16 or act not in ("relu", "gelu")):
            continue
        if act in MORE_ACTS and ((shape, fmt) != cases[-1] or dtype == torch.float32):
            continue
        if dtype == torch.float64 and act not in ("silu", "gelu", "mish", "elu", "gelu_tanh"):
            continue  # exp, erf in float64
        x, C, pdt = _input(shape, fmt, dtype)
        w, b, rm, rv = (torch.empty(C, dtype=pdt) for _ in range(4))
        z = torch.empty_like(x)
        batches, residuals = ((True,), (z,)) if act in MORE_ACTS else ((True, False), (None, z))
        for path, batch, residual in itertools.product(ops.PATHS, batches, residuals):
            if residual is None and act in (None, "relu"):
                continue  # compiled above
            with ops.launch_overrides(int64=int64, path=path):
                y, xk, v, mean, s, mask, _, _ = ops.forward(x, w, b, rm, rv, None, batch, 0.1,
                                                            1e-5, act, residual=residual,
                                                            slope=0.1)
                for needs in ((True, True, True, True), (False, False, False, True)):
                    ops.backward(torch.empty_like(y), xk, v, mean, s, w, b, batch, 1e-5, act,
                                 needs, slope=0.1, residual=residual, mask=mask)


def fused_tiles():
    """The single-program kernels at the tile sizes real shapes give, up to the
    largest (heuristics.FUSED_MAX_ROWS rows): BatchNorm1d over 1024 samples, the
    7x7 layers at batch 16 and 64, 14x14 at batch 4, channels_last 7x7 at 16."""
    for (shape, fmt), dtype in itertools.product(
            [((1024, 64), None), ((16, 256, 7, 7), None), ((64, 8, 7, 7), None),
             ((4, 32, 14, 14), None), ((16, 512, 7, 7), torch.channels_last)],
            (torch.float16, torch.float32)):
        x, C, pdt = _input(shape, fmt, dtype)
        w, b, rm, rv = (torch.empty(C, dtype=pdt) for _ in range(4))
        z = torch.empty_like(x)
        with ops.launch_overrides(path="fused"):
            y, xk, v, mean, s, mask, _, _ = ops.forward(x, w, b, rm, rv, None, True, 0.1, 1e-5,
                                                        "relu", residual=z)
            ops.backward(torch.empty_like(y), xk, v, mean, s, w, b, True, 1e-5, "relu",
                         (True, True, True, True), residual=z, mask=mask)


class _OneProcess:
    """SyncBatchNorm's collectives (tritonbn/distributed.py) for a world of one."""

    @staticmethod
    def gather(local):
        return local

    @staticmethod
    def reduce(sums):
        pass


def sync_variants(cases):
    """SyncBatchNorm's launches: the local (mean, M2, count), the combine of every
    process's, and dx with the count over every process."""
    for (shape, fmt), dtype, act in itertools.product(cases, TYPES_FLOAT, (None, "relu")):
        x, C, pdt = _input(shape, fmt, dtype)
        w, b, rm, rv = (torch.empty(C, dtype=pdt) for _ in range(4))
        y, xk, v, mean, s, mask, count, _ = ops.forward(x, w, b, rm, rv, None, True, 0.1, 1e-5,
                                                        act, comm=_OneProcess)
        ops.backward(torch.empty_like(y), xk, v, mean, s, w, b, True, 1e-5, act,
                     (True, True, True, False), comm=_OneProcess, count=count)


def search_space():
    """Every round-1 tuning candidate (tile shape x warps, at the most stages round 2
    tries) and every combine candidate, on a ResNet-like shape in both tilings."""
    from tritonbn import heuristics
    from tritonbn.layout import kernel_view
    from tritonbn.tuning import space

    max_stages = max(space.SPACE["stats"]["num_stages"])
    for dtype, fmt in itertools.product((torch.float16, torch.float32),
                                        (torch.contiguous_format, torch.channels_last)):
        x, v = kernel_view(torch.empty((32, 96, 28, 28), dtype=dtype).to(memory_format=fmt))
        C = x.shape[1]
        w, b, rm, rv = (torch.empty(C) for _ in range(4))
        dy = torch.empty_like(x)
        for kernel in heuristics.TILE_KERNELS:
            base = heuristics.heuristic(kernel, v, x.element_size(), x.device, False)
            for cfg in space.tile_candidates(kernel, v, x.element_size(), 132, base):
                cfg = dataclasses.replace(cfg, num_stages=max_stages)
                with ops.launch_overrides(**{kernel: cfg}):
                    mean, s = ops.batch_stats(x, v, rm, rv, None, 0.1, 1e-5)
                    ops.normalize(x, v, mean, s, w, b, True, 1e-5, "relu")
                    sums = ops.grad_sums(dy, x, v, mean, s, w, b, True, 1e-5, "relu", True, True)[0]
                    ops.grad_input(dy, x, v, mean, s, w, b, sums, True, 1e-5, "relu")
        for kernel, split in itertools.product(heuristics.COMBINE_KERNELS, (7, 528)):
            for cfg in space.combine_candidates(kernel, C, split, heuristics.heuristic_combine(C, split)):
                with ops.launch_overrides(**{kernel: cfg}):
                    mean, s = ops.batch_stats(x, v, rm, rv, None, 0.1, 1e-5)
                    ops.grad_sums(dy, x, v, mean, s, w, b, True, 1e-5, "relu", True, True)


TYPES_FLOAT = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Realistic shapes, fp16 bn_relu training with the residual's mask, compiled the way
# the JIT specializes them (pointers and integers divisible by 16 marked), so the
# SASS shows the loads a GPU would run: (shape, channels_last, wide loads expected).
# NCHW 7x7 rows (49 elements) are never 16-byte aligned: with the residual's bit mask
# (2-D tiles) scalar loads, no assertion; without it, see short_rows_checks.
SASS_CASES = [((256, 64, 56, 56), True, True), ((256, 64, 56, 56), False, True),
              ((256, 1024, 14, 14), True, True), ((256, 512, 28, 28), False, True),
              ((32, 2048, 7, 7), False, False), ((1024, 512), False, True)]
TILE_FNS = ("stats_partial_kernel", "normalize_kernel", "bwd_reduce_kernel", "bwd_dx_kernel",
            "fused_forward_kernel", "fused_backward_kernel")


class JitEqual:
    """Compiles a launch with the JIT's own binder and specialization, then reads
    its SASS: registers, local memory (spills) and global load widths."""
    rows = []

    def __init__(self, kernel, case):
        self.kernel, self.case = kernel, case

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, **kwargs):
            import re
            import subprocess
            import tempfile

            from triton.compiler import make_backend
            from triton.runtime.jit import create_function_from_signature

            fn, backend = self.kernel, make_backend(TARGET)
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, spec, _ = binder(*args, **kwargs)
            options = {"num_warps": num_warps, "num_stages": num_stages}
            _, sig, cst, attrs = fn._pack_args(backend, dict(options), bound, spec,
                                               backend.parse_options(dict(options)))
            out = triton.compile(ASTSource(fn, sig, cst, attrs), target=TARGET, options=options)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(out.asm["cubin"])
                f.flush()
                sass = subprocess.run([f"{BIN}/nvdisasm", "-c", f.name], capture_output=True,
                                      text=True, check=True).stdout
                usage = subprocess.run([f"{BIN}/cuobjdump", "--dump-resource-usage", f.name],
                                       capture_output=True, text=True, check=True).stdout
            named = dict(zip(fn.arg_names, args), **kwargs)
            self.rows.append(dict(
                case=self.case, kernel=fn.__name__, grid=tuple(grid), warps=num_warps,
                combine=bool(named.get("COMBINE", False)),
                tile=(named.get("BLOCK_M"), named.get("BLOCK_C")),
                regs=int(re.search(r"REG:(\d+)", usage).group(1)),
                local=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
                loads=sorted(set(re.findall(r"\bLDG\.E[.\w]*", sass)))))
        return launch


def _jit_equal_step(label, shape, fmt, dtype, residual):
    """A bn_relu training step over an empty x of shape (and a residual), every launch
    compiled JIT-equal and not run: (x, its View, JitEqual's rows of the step)."""
    kernels = {name: getattr(ops.K, name) for name in ops.K.__all__}
    try:
        for name, k in kernels.items():
            setattr(ops.K, name, JitEqual(k, label))
        x, C, pdt = _input(shape, fmt, dtype)
        w, b, rm, rv = (torch.empty(C, dtype=pdt) for _ in range(4))
        nbt = torch.ones((), dtype=torch.int64)
        z = torch.empty_like(x) if residual else None
        y, xk, v, mean, s, mask, _, _ = ops.forward(x, w, b, rm, rv, nbt, True, 0.1, 1e-5,
                                                    "relu", residual=z, count=True)
        ops.backward(torch.empty_like(y), xk, v, mean, s, w, b, True, 1e-5, "relu",
                     (True, True, True, residual), residual=z, mask=mask)
    finally:
        for name, k in kernels.items():
            setattr(ops.K, name, k)
    return x, v, [r for r in JitEqual.rows if r["case"] == label]


def sass_checks():
    """Each SASS_CASES training step, compiled JIT-equal: no kernel uses local memory,
    and where the rows are 16-byte aligned every tile kernel loads 128 bits at a time.
    Prints registers per thread, so a change that raises them shows."""
    failures = []
    for shape, cl, wide in SASS_CASES:
        layout = "cl" if cl else "nchw" if len(shape) == 4 else "nc"
        label = f"{'x'.join(map(str, shape))}:{layout}:fp16"
        rows = _jit_equal_step(label, shape, torch.channels_last if cl else None,
                               torch.float16, True)[2]
        for r in rows:
            print(f"sass {label:22} {r['kernel']:22} grid={r['grid']} warps={r['warps']} "
                  f"regs={r['regs']} local={r['local']} loads={r['loads']}", flush=True)
            if r["local"]:
                failures.append(f"{label} {r['kernel']}: {r['local']} local-memory instructions")
            if wide and r["kernel"] in TILE_FNS and "LDG.E.128" not in r["loads"]:
                failures.append(f"{label} {r['kernel']}: no 128-bit loads ({r['loads']})")
    assert not failures, "\n".join(failures)
    print(f"sass checked {len(JitEqual.rows)} launches", flush=True)


# The ResNet-50 7x7 layers NCHW (rows of 49 positions), where the tile kernels took
# 116-168 registers on 4 warps and loaded an element at a time (issue 15): (shape,
# dtype), each with and without a residual
SHORT_ROWS_CASES = [((32, 2048, 7, 7), torch.float16), ((256, 512, 7, 7), torch.float16),
                    ((32, 2048, 7, 7), torch.bfloat16), ((32, 2048, 7, 7), torch.float32)]
MAX_REGS = 128
FLAT_FNS = ("normalize_kernel", "bwd_dx_kernel")  # flat tiles without the bit mask


def short_rows_checks():
    """Each SHORT_ROWS_CASES training step (bn_relu, the residual's bit mask where there
    is one), compiled JIT-equal: every tile kernel stays at MAX_REGS registers or fewer
    with no local memory, the combine in the reduce launches or not; without the bit
    mask, normalize and dx (flat tiles, ops.flat_tiles) load 128 bits at a time."""
    failures, checked = [], 0
    for (shape, dtype), residual in itertools.product(SHORT_ROWS_CASES, (False, True)):
        label = f"{'x'.join(map(str, shape))}:nchw:{TYPES[dtype]}:{'mask' if residual else '-'}"
        for r in _jit_equal_step(label, shape, None, dtype, residual)[2]:
            if r["kernel"] not in TILE_NAMES:
                continue
            checked += 1
            print(f"short rows {label:28} {r['kernel']:22} warps={r['warps']} regs={r['regs']} "
                  f"local={r['local']} loads={r['loads']}", flush=True)
            if r["regs"] > MAX_REGS or r["local"]:
                failures.append(f"{label} {r['kernel']}: {r['regs']} registers, "
                                f"{r['local']} local-memory instructions")
            if not residual and r["kernel"] in FLAT_FNS and "LDG.E.128" not in r["loads"]:
                failures.append(f"{label} {r['kernel']}: no 128-bit loads ({r['loads']})")
    assert not failures, "\n".join(failures)
    print(f"short rows checked {checked} launches", flush=True)


# ResNet-50 batch-256 layers whose default grids fill whole waves (tests/test_waves.py),
# between them every tiling, warps and element size of the table but fp32 channel-first
OCCUPANCY_CASES = [((256, 64, 56, 56), torch.channels_last, torch.float16),
                   ((256, 64, 56, 56), torch.channels_last, torch.float32),
                   ((256, 64, 56, 56), None, torch.float16),
                   ((256, 256, 14, 14), None, torch.float16),
                   ((256, 512, 7, 7), None, torch.float16),
                   ((256, 512, 7, 7), None, torch.float32)]
TILE_NAMES = {"stats_partial_kernel": "stats", "normalize_kernel": "normalize",
              "bwd_reduce_kernel": "bwd_reduce", "bwd_dx_kernel": "dx"}


def _tile_launches(what, cases):
    """(label, x, v, kernel, row, cfg) of each tile kernel launch without the last-program
    combine in a bn_relu training step over each case, compiled JIT-equal (not run)."""
    from tritonbn import heuristics

    for shape, fmt, dtype in cases:
        label = f"{what} {'x'.join(map(str, shape))}:{fmt}:{dtype}"
        x, v, rows = _jit_equal_step(label, shape, fmt, dtype, False)
        for r in rows:
            kernel = TILE_NAMES.get(r["kernel"])
            if kernel is not None and not r["combine"]:
                yield label, x, v, kernel, r, heuristics.Config(r["tile"][0], r["tile"][1], 1,
                                                                r["warps"])


def occupancy_checks():
    """heuristics.SM90_REGISTERS against the compiler: a bn_relu training step over
    each OCCUPANCY_CASES layer, compiled JIT-equal; each tile kernel's registers give
    the programs per SM the table's do, and the grids of those sized by waves
    (SIZED_BY_WAVES) fill whole waves of them (the launches with the last-program
    combine in them are not in the table)."""
    from tritonbn import heuristics

    failures, checked = [], 0
    for label, x, v, kernel, r, cfg in _tile_launches("occupancy", OCCUPANCY_CASES):
        table = heuristics.sm90_registers(kernel, v, cfg, x.element_size())
        per_sm = heuristics.resident(r["regs"], r["warps"])
        programs = r["grid"][0] * r["grid"][1]
        print(f"{label:50} {kernel:10} regs={r['regs']} table={table} "
              f"programs={programs} waves={programs / (per_sm * 132):.2f}", flush=True)
        checked += 1
        if table is None or heuristics.resident(table, r["warps"]) != per_sm:
            failures.append(f"{label} {kernel}: {r['regs']} registers, the table {table}")
        elif (kernel in heuristics.SIZED_BY_WAVES
              and not heuristics.whole_waves(programs, per_sm * 132)):
            failures.append(f"{label} {kernel}: {programs} programs, {per_sm} per SM")
    assert not failures, "\n".join(failures)
    print(f"occupancy checked {checked} launches", flush=True)


def registers_table(cases=OCCUPANCY_CASES):
    """heuristics.SM90_REGISTERS' entries for the installed Triton, as the compiler gives
    them: a bn_relu training step over each case compiled JIT-equal (not run), one
    `key: registers,` line per tile kernel launch without the last-program combine,
    in the table's key (sm90_registers), to paste under its Triton version. Run:
    env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 python tests/compile_sm90.py --registers"""
    from tritonbn import heuristics

    entries = {}
    for _, x, v, kernel, r, cfg in _tile_launches("registers", cases):
        key = heuristics.sm90_key(kernel, v, cfg, x.element_size())
        entries[key] = max(entries.get(key, 0), r["regs"])
    print(f"# triton {triton.__version__}")
    for key, regs in sorted(entries.items()):
        print(f"    {key!r}: {regs},")
    return entries


if __name__ == "__main__":
    if sys.argv[1:] == ["--registers"]:
        registers_table()
        sys.exit(0)
    sys.exit(main())
