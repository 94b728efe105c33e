"""Every CUDA kernel source compiles with NVRTC on the CPU (no GPU needed).

Each ``kernels/*.cu`` is compiled with the options CuPy's RawModule uses at run time
(``launch.COMPILE_OPTIONS`` plus what CuPy adds: -arch, --device-as-default-execution-space,
-ftz=true) and every template instantiation the runtime asks for (``gpu.runtime_name_
expressions()``): to PTX for compute_80 and compute_90, and to a cubin for sm_90, which runs
ptxas and so also checks the inline PTX. A syntax error in a kernel fails here even on a
machine where nothing can run it; the negative tests prove that the harness does fail.
The PTX is also audited: no flush-to-zero or contracted (fma) float instruction, which CuPy's
-ftz=true would otherwise slip in, and static shared memory within the default 48 KiB.
"""
from __future__ import annotations

import re

import pytest

from alr_fast.kernels import distance, gpu, launch, ranking

nvrtc = pytest.importorskip(
    "cuda.bindings.nvrtc", reason="NVRTC bindings (cuda-bindings, shipped with CUDA builds of torch)"
)

CUPY_ADDED_OPTIONS = ("--device-as-default-execution-space", "-ftz=true")
DESIGN_NOTE_FIELDS = ("What:", "Layout:", "Accumulation:", "Tolerance:", "Memory bound:")


class CompileError(RuntimeError):
    pass


def _check(result, what: str) -> None:
    err = result[0] if isinstance(result, tuple) else result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"{what}: {err}")


def compile_source(source: str, names, arch: str, filename: str = "kernel.cu"):
    """(binary bytes, {name expression: lowered name}); CompileError with the log on failure."""
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], [])
    _check(err, "nvrtcCreateProgram")
    try:
        for name in names:
            _check(nvrtc.nvrtcAddNameExpression(prog, name.encode()), f"add name {name}")
        options = [o.encode() for o in (*launch.COMPILE_OPTIONS, f"-arch={arch}", *CUPY_ADDED_OPTIONS)]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        err, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = bytearray(size)  # not b" " * size: for size 1 that is the interned b" ", which the write would corrupt
        nvrtc.nvrtcGetProgramLog(prog, log)
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"{filename} ({arch}) failed: {result}\n{log.decode(errors='replace')}")
        lowered = {}
        for name in names:
            err, low = nvrtc.nvrtcGetLoweredName(prog, name.encode())
            _check(err, f"lowered name of {name}")
            lowered[name] = low.decode() if isinstance(low, bytes) else low
        cubin = arch.startswith("sm_")
        err, size = (nvrtc.nvrtcGetCUBINSize if cubin else nvrtc.nvrtcGetPTXSize)(prog)
        _check(err, "binary size")
        binary = bytearray(size)
        _check((nvrtc.nvrtcGetCUBIN if cubin else nvrtc.nvrtcGetPTX)(prog, binary), "binary")
        return binary, lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


@pytest.mark.parametrize("filename", gpu.KERNEL_FILES)
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_kernel_source_compiles_to_ptx_with_runtime_names(filename, arch):
    names = gpu.runtime_name_expressions()[filename]
    ptx, lowered = compile_source(launch.kernel_source(filename), names, arch, filename)
    text = ptx.decode(errors="replace")
    for name, low in lowered.items():
        assert f".entry {low}(" in text, f"{name} ({low}) missing from the PTX of {filename}"


@pytest.mark.parametrize("filename", gpu.KERNEL_FILES)
def test_kernel_source_assembles_to_sm90_cubin(filename):
    cubin, _ = compile_source(launch.kernel_source(filename), gpu.runtime_name_expressions()[filename], "sm_90", filename)
    assert cubin[:4] == b"\x7fELF"


@pytest.mark.parametrize("filename", gpu.KERNEL_FILES)
def test_every_kernel_is_instantiated_and_documented(filename):
    source = launch.kernel_source(filename)
    kernels = set(re.findall(r"__global__\s+void\s+(\w+)", source))
    used = {re.match(r"\w+", name).group(0) for name in gpu.runtime_name_expressions()[filename]}
    assert kernels and kernels == used, f"{filename}: kernels {kernels} vs runtime names {used}"
    note = source[:source.index("\n\n")]  # the opening comment block
    assert note.startswith(f"// {filename}:"), note[:80]
    for field in DESIGN_NOTE_FIELDS:
        assert f"// {field}" in note, f"{filename}: design note lacks {field!r}"


def _ptx(filename: str, source: str | None = None) -> str:
    source = launch.kernel_source(filename) if source is None else source
    ptx, _ = compile_source(source, gpu.runtime_name_expressions()[filename], "compute_90", filename)
    return ptx.decode(errors="replace")


# Any .ftz instruction flushes subnormals (the kernels promise NumPy's results bit for bit, and
# CuPy's -ftz=true turns a plain (double)x or x < y on floats into cvt.ftz / setp.ftz); an
# fma.f32/f64 would be a contracted multiply-add (the kernels use explicitly rounded operations).
_FORBIDDEN_PTX = re.compile(
    r"^\s*(?:@!?%\w+\s+)?((?:\w+\.)*ftz(?:\.\w+)*|fma\.\w+\.f(?:32|64)|mad\.\w*\.?f(?:32|64))\b", re.M
)


@pytest.mark.parametrize("filename", gpu.KERNEL_FILES)
def test_ptx_has_no_flushing_or_contracted_float_instructions(filename):
    assert _FORBIDDEN_PTX.findall(_ptx(filename)) == []


def test_flushing_conversion_is_detected():
    source = launch.kernel_source("rerank.cu").replace(
        "as_f64(float x) { return f32_to_f64(x); }", "as_f64(float x) { return (double)x; }")
    assert "cvt.ftz.f64.f32" in _FORBIDDEN_PTX.findall(_ptx("rerank.cu", source))


@pytest.mark.parametrize("filename", gpu.KERNEL_FILES)
def test_static_shared_memory_fits_the_default_48_kib(filename):
    sizes = re.findall(r"\.shared\s+\.align\s+\d+\s+\.b8\s+\w+\[(\d+)\]", _ptx(filename))
    assert sum(map(int, sizes)) <= 48 * 1024, sizes  # more would need an opt-in launch attribute
    if filename == "ranking.cu":
        assert sorted(map(int, sizes)) == [8192, 16384]  # SHARED_POS int counters and uint64 keys


def test_syntax_error_fails_compilation():
    source = launch.kernel_source("ranking.cu").replace("const int n_pos = pos_len[row];", "const int n_pos = ;")
    with pytest.raises(CompileError, match="error"):
        compile_source(source, ranking.RANKING_NAMES, "compute_90", "broken.cu")


def test_bad_template_instantiation_fails_compilation():
    # squares in half of a float input are never requested: as_f32(double) does not exist
    with pytest.raises(CompileError):
        compile_source(launch.kernel_source("rerank.cu"), ["column_max_sq<double, double, half_t>"], "compute_90")


def test_bad_inline_ptx_fails_at_assembly():
    # NVRTC copies inline PTX into its output unchecked; ptxas (the cubin step) rejects it
    source = launch.kernel_source("distance.cu").replace("cvt.rn.f32.f64", "cvt.rn.f32.f65")
    names = distance.distance_names("float32")
    compile_source(source, names, "compute_90")  # PTX text is produced...
    with pytest.raises(CompileError):
        compile_source(source, names, "sm_90")  # ...but does not assemble
