"""Multi-scale deformable attention (Deformable DETR), as used by every encoder here.

Each query looks at a few sampled points on each feature level instead of at every token:

    out(q) = W_o · Σ_heads Σ_levels Σ_points  a(q, h, l, p) · V_l(h)[ ref(q) + Δ(q, h, l, p) ]

where V_l(h)[·] is bilinear sampling of head h's projected values on level l, Δ comes from a
linear layer on the query and a(·) is softmax-normalised jointly over levels × points per head.

Two implementations of the sampling, chosen by `impl` (MSDeformAttn, `deform_attn`, the config's
`model.encoder.attention`):

    "torch"   `ms_deform_attn`, the reference: pure PyTorch on `F.grid_sample`; any device,
              fp32/fp16/bf16, compiles with `torch.compile(fullgraph=True)` (level shapes are
              Python ints, never tensors). MSDeformAttn calls its core, `sample_levels`, on
              inputs it computes with the queries innermost (faster on the CPU; same values).
    "native"  `ms_deform_attn_native`: the C++/CUDA op of csrc/ (CPU: float32/float64 with
              OpenMP; CUDA: float32/float64/float16/bfloat16 accumulating in float32, with a
              deterministic backward), a torch custom op (`torch.ops.msda.ms_deform_attn`) with a
              fake implementation and autograd, so it compiles with fullgraph=True as well. Built
              by torch.utils.cpp_extension on first use (never at import) and cached in torch's
              extensions folder; `build_native` (or `make native`) builds it ahead of time. If it
              cannot be built, "native" raises NativeUnavailable saying why.
    "auto"    "native" where it is built and supports the device and dtype, else "torch"; when
              the build is impossible it says why in one printed line, once.

Under a TorchFunctionMode other than torch's device context, i.e. an observer of functional
calls such as flops.FlopCounter, "native" and "auto" run the reference, so such an observer sees
(and the FLOP counter prices) the same F.grid_sample calls whatever the impl.
"""
import hashlib
import logging
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ops import Linear, observed


def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """Sample every level bilinearly and take the attention-weighted sum of the samples.

    value:              (N, S, M, D), S = Σ H_l·W_l in level order, M heads of D channels
    spatial_shapes:     sequence of (H_l, W_l) Python ints
    sampling_locations: (N, Lq, M, L, P, 2), (x, y) normalised to [0, 1] (outside reads zeros)
    attention_weights:  (N, Lq, M, L, P), already normalised
    returns:            (N, Lq, M·D)
    """
    L = sampling_locations.shape[3]
    if len(spatial_shapes) != L:
        raise ValueError(f"{len(spatial_shapes)} spatial shapes for {L} sampled levels")
    # Queries innermost (one copy of each): every level's grid and weights are then contiguous blocks
    grids = (2 * sampling_locations - 1).permute(0, 2, 3, 4, 5, 1).contiguous()  # (N, M, L, P, 2, Lq) in [-1, 1]
    weights = attention_weights.permute(0, 2, 3, 4, 1).contiguous()  # (N, M, L, P, Lq)
    return sample_levels(value, spatial_shapes, grids, weights)


def sample_levels(value, spatial_shapes, grids, weights):
    """ms_deform_attn on its inputs laid out queries-innermost, as MSDeformAttn computes them.

    value (N, S, M, D); grids (N, M, L, P, 2, Lq), (x, y) in grid_sample's [-1, 1], contiguous;
    weights (N, M, L, P, Lq) -> (N, Lq, M·D). With the queries innermost every level's grid and
    weights are contiguous (N*M, P, Lq) blocks (strided per-level views cost ~3x in the weighting
    on the CPU), and grid_sample reads the (x, y) planes of a grid as fast as interleaved pairs.
    """
    N, _, M, D = value.shape
    P, Lq = grids.shape[3], grids.shape[5]
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    out = None
    for level, (h, w) in enumerate(spatial_shapes):
        v = values[level].permute(0, 2, 3, 1).reshape(N * M, D, h, w)  # (N, h*w, M, D) -> (N*M, D, h, w)
        g = grids[:, :, level].reshape(N * M, P, 2, Lq).transpose(2, 3)  # (N*M, P, Lq, 2), a view
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (N*M, D, P, Lq)
        a = weights[:, :, level].reshape(N * M, 1, P, Lq)
        # Σ_p sampled·a, one point at a time into one accumulator: no (N*M, D, P, Lq) product in
        # memory (the weighting is memory-bound; ~3x faster than (sampled * a).sum(2) on the CPU)
        for sampled_p, a_p in zip(sampled.unbind(2), a.unbind(2)):  # (N*M, D, Lq), (N*M, 1, Lq)
            out = sampled_p * a_p if out is None else out.addcmul_(sampled_p, a_p)
    # (N*M, D, Lq) -> (N, Lq, M*D)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# The native op (csrc/): build on first use, a torch custom op, the impl choice
# --------------------------------------------------------------------------------------------

IMPLS = ("torch", "native", "auto")
NATIVE_DTYPES = {  # what the native builds compute in
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}
CSRC = Path(__file__).resolve().parent / "csrc"
_BUILDS = {}  # device type -> its torch.ops namespace, or the NativeUnavailable that stopped its build
_FALLBACK_SAID = set()  # device types for which "auto" has said why it uses the torch path


class NativeUnavailable(RuntimeError):
    """The native op cannot be built or cannot run these inputs; the message says why."""


def build_native(device_type="cpu", verbose=False):
    """Build the native op for "cpu" or "cuda", or load it from torch's extension cache
    (TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions), and return its torch.ops
    namespace. One attempt per process and device type; raises NativeUnavailable with the reason.

        python -c "import msda; msda.build_native('cpu'); msda.build_native('cuda')"   # = make native

    Without a GPU the CUDA build still compiles (for sm_80 unless TORCH_CUDA_ARCH_LIST is set) and
    loads, as a check of the sources; it runs where a GPU is."""
    if device_type not in _BUILDS:
        try:
            _BUILDS[device_type] = _build(device_type, verbose)
        except NativeUnavailable as e:
            _BUILDS[device_type] = e
    built = _BUILDS[device_type]
    if isinstance(built, NativeUnavailable):
        raise NativeUnavailable(str(built))
    return built


def _build(device_type, verbose=False):
    if device_type not in NATIVE_DTYPES:
        raise NativeUnavailable(f"no native build for device type {device_type!r} (only cpu and cuda)")
    compiler = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension will call
    if shutil.which(compiler) is None:
        raise NativeUnavailable(f"no C++ compiler: {compiler!r} is not on PATH (install g++ or set CXX)")
    cpp_extension = _import_cpp_extension()
    if not cpp_extension.is_ninja_available():
        raise NativeUnavailable("ninja is not installed (pip install ninja), torch.utils.cpp_extension needs it")
    # The sources' digest is a build flag, so an edit of a header (which torch does not hash) rebuilds.
    sources = ["msda_cpu.cpp"] if device_type == "cpu" else ["msda_cuda.cu"]
    digest = hashlib.sha256(b"".join((CSRC / f).read_bytes() for f in ("msda.h", "msda_host.h", *sources)))
    cflags = ["-O3", f"-DMSDA_SOURCES={digest.hexdigest()[:16]}"]
    if device_type == "cpu":
        name = "msda_native_cpu"
        kwargs = dict(extra_cflags=[*cflags, "-fopenmp"], extra_ldflags=["-fopenmp"])
    else:
        if torch.version.cuda is None:
            raise NativeUnavailable(f"this torch ({torch.__version__}) is built without CUDA")
        nvcc = Path(cpp_extension.CUDA_HOME or "/nonexistent", "bin", "nvcc")
        if not nvcc.exists():
            raise NativeUnavailable(f"no nvcc: the CUDA toolkit ({torch.version.cuda}, torch's version) was not "
                                    "found (set CUDA_HOME)")
        cuda_flags = list(cflags)
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            cuda_flags.append("-gencode=arch=compute_80,code=sm_80")  # no GPU to ask: a compile check
        # torch links -lcudart from CUDA_HOME/lib64; CUDA_HOME guessed from an nvcc wrapper script
        # (e.g. /usr/local/bin/nvcc) has none, so look where toolkits keep it.
        home = Path(cpp_extension.CUDA_HOME)
        libs = [home / "lib64", home / "lib", *sorted(home.glob("targets/*/lib")), Path("/usr/local/cuda/lib64")]
        found = [d for d in libs if (d / "libcudart.so").exists()]
        if not found:
            raise NativeUnavailable(f"no libcudart.so under the CUDA toolkit {home} (set CUDA_HOME)")
        name = "msda_native_cuda"
        kwargs = dict(extra_cflags=cflags, extra_cuda_cflags=cuda_flags,
                      extra_ldflags=[] if found[0] == home / "lib64" else [f"-L{found[0]}"])
    try:
        cpp_extension.load(name=name, sources=[str(CSRC / s) for s in sources], extra_include_paths=[str(CSRC)],
                           is_python_module=False, verbose=verbose, **kwargs)
    except Exception as e:  # a compiler error, a linker error, a lock: all mean "not here"
        raise NativeUnavailable(f"the {device_type} build failed: {_summary(e)}") from e
    return getattr(torch.ops, name)


def _import_cpp_extension():
    """torch.utils.cpp_extension, imported on first build only (slow), without the warning it logs
    when it finds nvcc but no GPU: the CUDA build compiles without one."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _summary(error):
    """The line of a build error worth printing: the compiler's first `error`, else the first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    wanted = [line for line in lines if "error" in line.lower() and not line.startswith("Error building")]
    return (wanted or lines or [type(error).__name__])[0][:300]


@torch.compiler.assume_constant_result  # decided once while compiling, not traced
def _native_ready(device_type: str) -> bool:
    try:
        build_native(device_type)
        return True
    except NativeUnavailable as e:
        if device_type not in _FALLBACK_SAID:
            _FALLBACK_SAID.add(device_type)
            print(f"msda: impl='auto' uses the torch path on {device_type}: {e}", flush=True)
        return False


def _common_dtype(*tensors):
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def resolve_impl(impl, value, sampling_locations, attention_weights):
    """What `impl` ("torch" | "native" | "auto") runs for these inputs: "torch" or "native"."""
    if impl not in IMPLS:
        raise ValueError(f"unknown deformable attention impl {impl!r}; valid: {', '.join(IMPLS)}")
    if impl == "torch" or observed():
        return "torch"
    if impl == "native":
        return "native"  # ms_deform_attn_native refuses what it cannot run
    device = value.device.type
    dtype = _common_dtype(value, sampling_locations, attention_weights)
    return "native" if dtype in NATIVE_DTYPES.get(device, ()) and _native_ready(device) else "torch"


def ms_deform_attn_native(value, spatial_shapes, sampling_locations, attention_weights, *, deterministic=None):
    """`ms_deform_attn` on the native op: same arguments, same result (to rounding).

    Inputs of different dtypes (autocast's half value with float32 locations and weights) are
    computed in their common dtype, as grid_sample does under autocast. deterministic: the CUDA
    backward without float atomics; None follows torch.are_deterministic_algorithms_enabled().
    The CPU backward is deterministic either way. On the meta device only shapes are computed."""
    L = sampling_locations.shape[3]
    if len(spatial_shapes) != L:
        raise ValueError(f"{len(spatial_shapes)} spatial shapes for {L} sampled levels")
    dtype = _common_dtype(value, sampling_locations, attention_weights)
    device = value.device.type
    if device != "meta" and dtype not in NATIVE_DTYPES.get(device, ()):
        supported = "; ".join(f"{d}: {', '.join(str(t).removeprefix('torch.') for t in ts)}"
                              for d, ts in NATIVE_DTYPES.items())
        raise NativeUnavailable(f"no native deformable attention for {dtype} on {device} ({supported})")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    shapes = [int(size) for hw in spatial_shapes for size in hw]
    return torch.ops.msda.ms_deform_attn(value.to(dtype), shapes, sampling_locations.to(dtype),
                                         attention_weights.to(dtype), bool(deterministic))


def deform_attn(value, spatial_shapes, sampling_locations, attention_weights, *, impl="torch", deterministic=None):
    """ms_deform_attn with the implementation chosen by `impl` ("torch" | "native" | "auto")."""
    if resolve_impl(impl, value, sampling_locations, attention_weights) == "native":
        return ms_deform_attn_native(value, spatial_shapes, sampling_locations, attention_weights,
                                     deterministic=deterministic)
    return ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights)


# The custom op: the C++/CUDA kernels run behind it; torch.compile and the meta device see only
# the fake implementations. `shapes` is the flat list h0, w0, h1, w1, ...

@torch.library.custom_op("msda::ms_deform_attn", mutates_args=())
def _native_forward(value: torch.Tensor, shapes: list[int], sampling_locations: torch.Tensor,
                    attention_weights: torch.Tensor, deterministic: bool) -> torch.Tensor:
    return build_native(value.device.type).forward(value, shapes, sampling_locations, attention_weights)


@_native_forward.register_fake
def _(value, shapes, sampling_locations, attention_weights, deterministic):
    N, _, M, D = value.shape
    return value.new_empty(N, sampling_locations.shape[1], M * D)


@torch.library.custom_op("msda::ms_deform_attn_backward", mutates_args=())
def _native_backward(grad_output: torch.Tensor, value: torch.Tensor, shapes: list[int],
                     sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                     deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = build_native(value.device.type).backward(grad_output, value, shapes, sampling_locations,
                                                      attention_weights, deterministic)
    return tuple(grads)


@_native_backward.register_fake
def _(grad_output, value, shapes, sampling_locations, attention_weights, deterministic):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device)
                 for t in (value, sampling_locations, attention_weights))


def _setup_context(ctx, inputs, output):
    value, shapes, sampling_locations, attention_weights, deterministic = inputs
    ctx.save_for_backward(value, sampling_locations, attention_weights)
    ctx.shapes, ctx.deterministic = shapes, deterministic


def _backward(ctx, grad_output):
    value, sampling_locations, attention_weights = ctx.saved_tensors
    grads = _native_backward(grad_output, value, ctx.shapes, sampling_locations, attention_weights, ctx.deterministic)
    return grads[0], None, grads[1], grads[2], None


_native_forward.register_autograd(_backward, setup_context=_setup_context)


class MSDeformAttn(nn.Module):
    """Deformable attention over `n_levels` feature levels with the official initialisation.

    Parameter names and shapes are those of the official `MSDeformAttn` (Deformable DETR,
    Mask2Former), so official checkpoints load by name. impl: "torch" | "native" | "auto", the
    sampling's implementation (module docstring); it changes no parameter.
    """

    def __init__(self, *, dim=256, levels=4, heads=8, points=4, impl="torch"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if impl not in IMPLS:
            raise ValueError(f"unknown deformable attention impl {impl!r}; valid: {', '.join(IMPLS)}")
        self.impl = impl
        # The official attribute names, which the official code's readers know.
        self.d_model, self.n_levels, self.n_heads, self.n_points = dim, levels, heads, points
        self.sampling_offsets = Linear(dim, heads * levels * points * 2)
        self.attention_weights = Linear(dim, heads * levels * points)
        self.value_proj = Linear(dim, dim)
        self.output_proj = Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self):
        # Offsets start as 8 fixed directions (one per head), the i-th point i steps out, so the
        # heads look around the reference point in a star before any training.
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([theta.cos(), theta.sin()], -1)  # (M, 2)
        directions = directions / directions.abs().max(-1, keepdim=True).values  # on the unit square
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        # Uniform attention over levels × points at the start.
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def offsets_and_logits(self, query):
        """sampling_offsets(query) and attention_weights(query), queries innermost, as one GEMM over
        the stacked weights (one pass over the queries instead of two; the same FLOPs, the same
        parameters). query (N, Lq, C) -> (N, M·L·P·2, Lq), (N, M·L·P, Lq): views into one output."""
        a, b = self.sampling_offsets, self.attention_weights
        weight, bias = torch.cat([a.weight, b.weight]), torch.cat([a.bias, b.bias])  # (O, C), (O,)
        both = torch.baddbmm(bias[:, None], weight.expand(len(query), -1, -1), query.transpose(1, 2))  # (N, O, Lq)
        return both.split([a.out_features, b.out_features], dim=1)

    def forward(self, query, reference_points, value, spatial_shapes):
        """query (N, Lq, C); reference_points (N, Lq, L, 2) as (x, y) in [0, 1];
        value (N, S, C) with S = Σ H_l·W_l; spatial_shapes: L pairs (H_l, W_l) of ints.
        Returns (N, Lq, C).

        Offsets, logits, weights and sampling grids are computed with the queries innermost, the
        layout the sampling reads: every broadcast below then runs along Lq (the official layout,
        (N, Lq, M, L, P, 2), broadcasts over runs of 2 and took ~10 % of a layer on the CPU)."""
        N, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value).view(N, value.shape[1], M, self.d_model // M)  # (N, S, M, D)
        offsets, logits = self.offsets_and_logits(query)  # (N, M·L·P·2, Lq), (N, M·L·P, Lq)
        offsets = offsets.view(N, M, L, P, 2, Lq)
        weights = logits.reshape(N, M, L * P, Lq).softmax(2).view(N, M, L, P, Lq)  # over each head's L·P samples
        # Offsets are in pixels of each level: divide by (W_l, H_l) to normalise, as one fused multiply-add
        scale = query.new_tensor([[1.0 / w, 1.0 / h] for h, w in spatial_shapes])[None, None, :, None, :, None]
        ref = reference_points.permute(0, 2, 3, 1)[:, None, :, None]  # (N, 1, L, 1, 2, Lq)
        if resolve_impl(self.impl, v, offsets, weights) == "native":  # the official layout, in [0, 1]
            locations = torch.addcmul(ref, offsets, scale).permute(0, 5, 1, 2, 3, 4)  # (N, Lq, M, L, P, 2)
            out = ms_deform_attn_native(v, spatial_shapes, locations, weights.permute(0, 4, 1, 2, 3))
        else:  # grid_sample's [-1, 1]: 2·(ref + offsets·scale) - 1, the factors of 2 exact
            grids = torch.addcmul((2 * ref - 1).contiguous(), offsets, 2 * scale)  # (N, M, L, P, 2, Lq)
            out = sample_levels(v, spatial_shapes, grids, weights)
        return self.output_proj(out)
