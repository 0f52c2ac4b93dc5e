"""The drafter's sampling step: the MLX path, the fused kernels and their dispatch.

On the CPU: the MLX path against the reference semantics (torch), Gumbel-max against
the categorical distribution, the dispatch's forcing and fallbacks (fake kernels), the
shared kernel source executed by a CPU emulation of GPU groups (g++), and the Metal and
CUDA sources compiled/type-checked where a compiler exists. The Metal and CUDA kernels
themselves run only where their device exists and skip with a reason elsewhere.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from mlx_dgemma import kernels, rng
from mlx_dgemma.config import small_model_config
from mlx_dgemma.small_model import small_model
from mlx_dgemma.kernels import cpu, cuda, metal, template
from tests.fixtures import gpu_emulator as emulate
from mlx_dgemma.sampling import StepSample, probabilities, sample_step_mlx

# ---------------------------------------------------------------------------------------
# helpers


def random_logits(shape, seed=0, scale=3.0):
    return np.random.RandomState(seed).standard_normal(shape).astype(np.float32) * scale


def keys_for(B, L, seed=0, block=0, step=1):
    return rng.position_keys(list(range(seed, seed + B)), rng.SAMPLE, block, step, L)


def torch_reference(x: np.ndarray, temp: float):
    """(entropy, argmax, lse) in float64 from torch on the temperature-scaled logits."""
    z = torch.tensor(x, dtype=torch.float64) / temp
    dist = torch.distributions.Categorical(logits=z)
    return dist.entropy().numpy(), z.argmax(-1).numpy(), torch.logsumexp(z, -1).numpy()


def gumbel_argmax_numpy(x: np.ndarray, temp: float, keys: np.ndarray) -> np.ndarray:
    """The sampling contract with the NumPy twin of the noise: argmax(x / t + g)."""
    y = x.astype(np.float32) / np.float32(temp) + rng.gumbel(keys, x.shape[-1]).astype(np.float32)
    return y.argmax(-1)


def assert_matches_mlx(got: StepSample, logits: mx.array, temp: float, keys: mx.array):
    """Kernel output against the MLX path: tokens equal (near-ties of x + g aside)."""
    want = sample_step_mlx(logits, temp, keys)
    mx.eval(got, want)
    np.testing.assert_array_equal(np.array(got.argmax), np.array(want.argmax))
    gs, ws = np.array(got.sampled), np.array(want.sampled)
    if not np.array_equal(gs, ws):
        y = np.array(logits / temp + rng.gumbel(keys, logits.shape[-1]))
        for b, l in zip(*np.nonzero(gs != ws)):
            a, c = y[b, l, gs[b, l]], y[b, l, ws[b, l]]
            assert abs(a - c) <= 1e-5 * max(1.0, abs(c)), f"sampled differs at {(b, l)}"
    np.testing.assert_allclose(np.array(got.lse), np.array(want.lse), rtol=1e-5, atol=1e-5)
    # The MLX path's float32 sums drift with V (~2e-4 at V = 262,144 on the CPU); the
    # kernels keep x - max and must be close to the float64 value itself.
    lse = np.abs(np.array(want.lse))
    assert np.all(np.abs(np.array(got.entropy) - np.array(want.entropy)) <= 2e-4 + 2e-5 * lse)
    entropy64, lse64 = float64_entropy_lse(np.array(logits), temp)
    assert np.all(np.abs(np.array(got.entropy) - entropy64) <= 1e-5 + 1e-6 * np.abs(lse64))
    np.testing.assert_allclose(np.array(got.lse), lse64, rtol=1e-6, atol=1e-6)


def float64_entropy_lse(x: np.ndarray, temp: float):
    z = x.astype(np.float64) / np.float64(np.float32(temp))
    finite = np.isfinite(z)
    m = np.where(finite, z, -np.inf).max(-1, keepdims=True)
    e = np.where(finite, np.exp(z - m), 0.0)
    s = e.sum(-1)
    lse = m[..., 0] + np.log(s)
    d = np.where(finite, z - m, 0.0)
    return np.log(s) - (e * d).sum(-1) / s, lse


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    kernels.reset()
    yield
    kernels.reset()


# ---------------------------------------------------------------------------------------
# the MLX path against the reference semantics


@pytest.mark.parametrize("temp", [0.4, 0.8, 1.0])
def test_mlx_path_matches_torch_categorical(temp):
    x = random_logits((2, 9, 301), seed=1)
    x[0, 0] = np.clip(x[0, 0] * 10, -30, 30)  # peaked, within the soft-cap range
    x[1, 3] = np.clip(x[1, 3] * 5, -30, 30)
    x[1, 4, [5, 200]] = x[1, 4].max() + 0.5  # exact tie: the lower token wins
    logits, keys = mx.array(x), keys_for(2, 9)
    s = sample_step_mlx(logits, temp, keys)
    entropy, argmax, lse = torch_reference(x, temp)
    np.testing.assert_array_equal(np.array(s.argmax), argmax)
    assert int(np.array(s.argmax)[1, 4]) == 5
    np.testing.assert_allclose(np.array(s.lse), lse, rtol=2e-7, atol=1e-5)
    # lse - sum(p x) cancels in float32 on peaked rows: error ~ 1e-6 * |lse| and more
    err = np.abs(np.array(s.entropy) - entropy)
    assert np.all(err <= 1e-5 + 1e-5 * np.abs(lse)), err.max()
    assert np.median(err) < 2e-5
    assert s.sampled.dtype == mx.int32 and s.argmax.dtype == mx.int32
    assert s.entropy.dtype == mx.float32 and s.lse.dtype == mx.float32


def test_mlx_path_sample_is_gumbel_argmax_of_the_rng_noise():
    x = random_logits((3, 17, 97), seed=2)
    keys = keys_for(3, 17, seed=5, block=2, step=7)
    s = sample_step_mlx(mx.array(x), 0.6, keys)
    np.testing.assert_array_equal(np.array(s.sampled), gumbel_argmax_numpy(x, 0.6, np.array(keys)))


def test_gumbel_max_matches_the_categorical_distribution():
    """Chi-square over 20,000 positions (distinct keys), fixed seeds: deterministic."""
    V, N, temp = 6, 20_000, 0.8
    row = np.array([1.5, 0.3, -0.2, 0.0, -1.0, 2.0], np.float32)
    p = torch.softmax(torch.tensor(row, dtype=torch.float64) / temp, 0).numpy()
    for seed in (0, 1):
        keys = rng.position_keys([seed], rng.SAMPLE, 0, 1, N)
        s = sample_step_mlx(mx.broadcast_to(mx.array(row), (1, N, V)), temp, keys)
        counts = np.bincount(np.array(s.sampled).ravel(), minlength=V)
        chi2 = float(((counts - N * p) ** 2 / (N * p)).sum())
        assert chi2 < 20.515, (seed, chi2, counts, N * p)  # df = 5, alpha = 0.001
    # and the draws are not degenerate: every token appears, the argmax is always token 5
    assert counts.min() > 0 and np.all(np.array(s.argmax) == 5)


def test_sampling_is_deterministic_and_keyed():
    x = mx.array(random_logits((2, 64, 50), seed=3, scale=0.5))
    a = sample_step_mlx(x, 0.7, keys_for(2, 64, seed=11))
    b = sample_step_mlx(x, 0.7, keys_for(2, 64, seed=11))
    c = sample_step_mlx(x, 0.7, keys_for(2, 64, seed=12))
    np.testing.assert_array_equal(np.array(a.sampled), np.array(b.sampled))
    assert (np.array(a.sampled) != np.array(c.sampled)).mean() > 0.5


def test_probabilities_from_lse_are_the_softmax():
    x = random_logits((2, 5, 40), seed=4)
    s = sample_step_mlx(mx.array(x), 0.5, keys_for(2, 5))
    p = probabilities(mx.array(x), 0.5, s.lse)
    want = torch.softmax(torch.tensor(x, dtype=torch.float64) / 0.5, -1).numpy()
    np.testing.assert_allclose(np.array(p), want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# dispatch: forcing, fallbacks, warn-once


def good_kernel():
    calls = []

    def fn(logits, temp, keys):
        calls.append(logits.shape)
        return sample_step_mlx(logits, temp, keys)

    fn.calls = calls
    return fn


def register(monkeypatch, name, factory, available=True):
    monkeypatch.setitem(kernels._KERNELS, name, (lambda: available, factory))


def test_no_gpu_means_the_cpu_kernel_or_the_mlx_path():
    if metal.available() or cuda.available():
        pytest.skip("a GPU kernel backend is available on this machine")
    if cpu.built():
        assert kernels.backend() == "cpu" and "self-check passed" in kernels.backend_reason()
    else:  # not built (no compiler at install): one note, then the MLX path
        with pytest.warns(RuntimeWarning, match="CPU sampling kernel is not built"):
            assert kernels.backend() == "mlx"
    x, k = mx.array(random_logits((1, 4, 30))), keys_for(1, 4)
    s = kernels.sample_step(x, 0.9, k)
    np.testing.assert_array_equal(np.array(s.sampled), np.array(sample_step_mlx(x, 0.9, k).sampled))


def test_cpu_kernel_is_built_in_ci():
    """CI installs with pip (pyproject.toml's ext-modules build the extension); a silent fallback would hide a
    broken build there. Locally, a source checkout may not have built it."""
    import os

    if not os.environ.get("CI"):
        pytest.skip("outside CI the extension may be unbuilt (pip install -e . builds it)")
    assert cpu.built(), "mlx_dgemma.kernels._cpu was not built by pip install"


def test_auto_picks_a_checked_kernel_and_env_forces_mlx(monkeypatch):
    fn = good_kernel()
    register(monkeypatch, "metal", lambda: fn, available=False)
    register(monkeypatch, "cuda", lambda: fn)
    assert kernels.backend() == "cuda"
    assert "self-check passed" in kernels.backend_reason()
    x, k = mx.array(random_logits((1, 3, 20))), keys_for(1, 3)
    kernels.sample_step(x, 0.5, k)
    assert fn.calls[-1] == (1, 3, 20)  # the kernel ran (after its self-check)
    n = len(fn.calls)
    monkeypatch.setenv(kernels.ENV, "mlx")
    assert kernels.backend() == "mlx"
    kernels.sample_step(x, 0.5, k)
    assert len(fn.calls) == n  # forced away from the kernel
    monkeypatch.setenv(kernels.ENV, "cuda")
    assert kernels.backend() == "cuda"


def test_bad_env_value_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "vulkan")
    with pytest.raises(ValueError, match=r"MLX_DGEMMA_SAMPLER='vulkan': expected one of") as e:
        kernels.backend()
    assert "\n" not in str(e.value)


def test_forced_backend_without_device_warns_once_and_falls_back(monkeypatch):
    register(monkeypatch, "metal", lambda: pytest.fail("must not build"), available=False)
    monkeypatch.setenv(kernels.ENV, "metal")
    x, k = mx.array(random_logits((1, 3, 20))), keys_for(1, 3)
    with pytest.warns(RuntimeWarning, match="MLX_DGEMMA_SAMPLER=metal but no metal device"):
        s = kernels.sample_step(x, 0.5, k)
    assert kernels.backend() == "mlx"
    np.testing.assert_array_equal(np.array(s.argmax), np.array(sample_step_mlx(x, 0.5, k).argmax))


def test_real_metal_kernel_on_a_machine_without_metal_falls_back(monkeypatch):
    """The real Metal source, 'available' by force: building/running it fails -> fallback."""
    if metal.available():
        pytest.skip("Metal is available here: the kernel would run (see the Metal test)")
    register(monkeypatch, "metal", metal.make_sample_step)
    with pytest.warns(RuntimeWarning, match="metal sampling kernel failed to build or run"):
        assert kernels.backend() == "mlx"


@pytest.mark.parametrize("fault", ["raises", "argmax", "sampled", "entropy", "lse", "dtype"])
def test_faulty_kernel_warns_once_and_falls_back(monkeypatch, fault):
    def make():
        if fault == "raises":
            raise RuntimeError("nvrtc: error: identifier 'foo' is undefined\nmore lines")

        def fn(logits, temp, keys):
            s = sample_step_mlx(logits, temp, keys)
            if fault == "argmax":
                return s._replace(argmax=(s.argmax + 1) % logits.shape[-1])
            if fault == "sampled":
                return s._replace(sampled=s.argmax)  # a plausible bug: no noise
            if fault == "entropy":
                return s._replace(entropy=s.entropy * 1.01)
            if fault == "lse":
                return s._replace(lse=s.lse + 1e-2)
            return s._replace(lse=s.lse.astype(mx.float16))

        return fn

    register(monkeypatch, "cuda", make)
    x, k = mx.array(random_logits((1, 3, 20))), keys_for(1, 3)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            s = kernels.sample_step(x, 0.5, k)
        kernels.backend()
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "cuda sampling kernel" in msgs[0], msgs
    assert kernels.backend() == "mlx" and "rejected" in kernels.backend_reason()
    if fault == "raises":
        assert "RuntimeError: nvrtc: error" in msgs[0] and "more lines" not in msgs[0]
    want = sample_step_mlx(x, 0.5, k)
    np.testing.assert_array_equal(np.array(s.sampled), np.array(want.sampled))


def test_kernel_raising_on_a_later_shape_falls_back_for_good(monkeypatch):
    def make():
        def fn(logits, temp, keys):
            if logits.shape[-1] > 5000:
                raise ValueError("too large")
            return sample_step_mlx(logits, temp, keys)

        return fn

    register(monkeypatch, "cuda", make)
    assert kernels.backend() == "cuda"
    x, k = mx.array(random_logits((1, 2, 6000))), keys_for(1, 2)
    with pytest.warns(RuntimeWarning, match="raised ValueError: too large"):
        s = kernels.sample_step(x, 0.5, k)
    assert kernels.backend() == "mlx"
    np.testing.assert_array_equal(np.array(s.sampled), np.array(sample_step_mlx(x, 0.5, k).sampled))


def test_self_check_accepts_the_mlx_path_and_rejects_a_wrong_tie_rule():
    assert kernels.self_check(sample_step_mlx) is None

    def last_index_wins(logits, temp, keys):
        s = sample_step_mlx(logits, temp, keys)
        x = logits / temp
        V = x.shape[-1]
        rev = (V - 1 - mx.argmax(x[..., ::-1], axis=-1)).astype(mx.int32)
        return s._replace(argmax=rev)

    assert "argmax" in kernels.self_check(last_index_wins)


# ---------------------------------------------------------------------------------------
# the shared kernel source, executed on the CPU (emulated GPU groups)

needs_cxx = pytest.mark.skipif(emulate.compiler() is None, reason="no C++ compiler (g++) for the emulator")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if emulate.compiler() is None:
        pytest.skip("no C++ compiler (g++) for the emulator")
    return emulate.build(tmp_path_factory.mktemp("emulator"))


@needs_cxx
@pytest.mark.parametrize("threads", [32, 64, 256])
def test_shared_source_passes_the_self_check(emulator, threads):
    assert kernels.self_check(emulate.make_sample_step(threads, emulator)) is None


@needs_cxx
def test_shared_source_with_full_1024_thread_groups(emulator):
    """32 simdgroups: the second stage uses every lane (the kernels' default size)."""
    x = random_logits((1, 2, 3001), seed=8)
    x[0, 1, [1000, 40, 2999]] = x[0, 1].max() + 1.0  # tie across simdgroups: 40 wins
    logits, keys = mx.array(x), keys_for(1, 2, seed=8)
    got = emulate.make_sample_step(1024, emulator)(logits, 0.7, keys)
    assert_matches_mlx(got, logits, 0.7, keys)
    assert int(np.array(got.argmax)[0, 1]) == 40


@needs_cxx
@pytest.mark.parametrize("V", [1, 31, 64, 1000, 4099])
def test_shared_source_matches_mlx_path(emulator, V):
    x = random_logits((2, 3, V), seed=V)
    x[1, 1] = np.clip(x[1, 1] * 20, -30, 30)  # soft-capped range
    logits, keys = mx.array(x), keys_for(2, 3, seed=V)
    for temp in (0.4, 1.0):
        assert_matches_mlx(emulate.make_sample_step(64, emulator)(logits, temp, keys), logits, temp, keys)


@needs_cxx
def test_shared_source_entropy_is_exact_where_the_mlx_path_cancels(emulator):
    x = random_logits((1, 4, 2000), seed=7)
    x[0, :, 123] = 30.0  # soft-cap ceiling, t = 0.4: nearly one-hot rows
    entropy, _, lse = torch_reference(x, 0.4)
    got = emulate.make_sample_step(64, emulator)(mx.array(x), 0.4, keys_for(1, 4))
    np.testing.assert_allclose(np.array(got.entropy), entropy, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(np.array(got.lse), lse, rtol=1e-6)


@needs_cxx
def test_shared_source_ties_masks_and_determinism(emulator):
    V = 300
    x = random_logits((1, 4, V), seed=9)
    x[0, 0, [17, 3, 250]] = 9.0  # three-way exact tie across threads and simdgroups
    x[0, 1, :] = 1.0  # all equal: argmax 0
    x[0, 2, 100:] = -np.inf  # masked vocabulary
    x[0, 3, :] = -np.inf
    x[0, 3, 42] = 0.0  # a single finite token
    logits, keys = mx.array(x), keys_for(1, 4, seed=3)
    fn = emulate.make_sample_step(64, emulator)
    a, b = fn(logits, 0.7, keys), fn(logits, 0.7, keys)
    for f in StepSample._fields:  # run to run: bit for bit
        np.testing.assert_array_equal(np.array(getattr(a, f)), np.array(getattr(b, f)))
    am, sm = np.array(a.argmax)[0], np.array(a.sampled)[0]
    assert am[0] == 3 and am[1] == 0 and am[3] == 42 and sm[3] == 42
    assert am[2] < 100 and sm[2] < 100
    entropy, argmax, lse = torch_reference(x, 0.7)
    np.testing.assert_array_equal(am, argmax[0])
    np.testing.assert_allclose(np.array(a.entropy)[0], entropy[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(a.lse)[0], lse[0], rtol=1e-6)
    np.testing.assert_array_equal(sm, gumbel_argmax_numpy(x, 0.7, np.array(keys))[0])
    # another group size: same tokens
    c = emulate.make_sample_step(256, emulator)(logits, 0.7, keys)
    np.testing.assert_array_equal(np.array(c.argmax), np.array(a.argmax))
    np.testing.assert_array_equal(np.array(c.sampled), np.array(a.sampled))


@needs_cxx
def test_dispatch_runs_the_emulated_kernel(monkeypatch, emulator):
    register(monkeypatch, "cuda", lambda: emulate.make_sample_step(64, emulator))
    assert kernels.backend() == "cuda"
    x, k = mx.array(random_logits((1, 8, 500), seed=5)), keys_for(1, 8)
    assert_matches_mlx(kernels.sample_step(x, 0.6, k), x, 0.6, k)


def test_launch_shape_validation():
    assert template.launch_shape(3, 64) == ((192, 1, 1), (64, 1, 1))
    for bad in (0, 48, 2048):
        with pytest.raises(ValueError, match="multiple of 32"):
            template.launch_shape(3, bad)


# ---------------------------------------------------------------------------------------
# the Metal and CUDA sources (static checks: no GPU needed)

MACROS = {"DG_FN", "DG_SHARED", "DG_EXP", "DG_LOG", "DG_NEG_INF", "DG_SHFL_XOR", "DG_BARRIER"}
INDICES = ["dg_tid", "dg_row", "dg_lane", "dg_warp"]
# MLX adds a kernel argument for each of these names found in a Metal source.
METAL_ATTRIBUTES = [
    "dispatch_quadgroups_per_threadgroup", "dispatch_simdgroups_per_threadgroup",
    "dispatch_threads_per_threadgroup", "grid_origin", "grid_size", "quadgroup_index_in_threadgroup",
    "quadgroups_per_threadgroup", "simdgroup_index_in_threadgroup", "simdgroups_per_threadgroup",
    "thread_execution_width", "thread_index_in_quadgroup", "thread_index_in_simdgroup",
    "thread_index_in_threadgroup", "thread_position_in_grid", "thread_position_in_threadgroup",
    "threadgroup_position_in_grid", "threadgroups_per_grid", "threads_per_grid",
    "threads_per_simdgroup", "threads_per_threadgroup",
]
METAL_TYPES = {"uint": "uint", "uint3": "uint3"}


def test_metal_and_cuda_differ_only_in_primitives():
    for mod in (metal, cuda, emulate):
        header, source = template.build(mod.PRIMITIVES)
        assert header == mod.PRIMITIVES.prelude + template.COMMON_HEADER
        assert source == template.COMMON_SHARED + mod.PRIMITIVES.indices + template.COMMON_BODY
        defined = set(re.findall(r"#define (DG_\w+)", mod.PRIMITIVES.prelude))
        assert MACROS <= defined, MACROS - defined
        assert re.findall(r"const uint32_t (dg_\w+) =", mod.PRIMITIVES.indices) == INDICES
    assert metal.HEADER == metal.PRIMITIVES.prelude + template.COMMON_HEADER
    assert cuda.SOURCE == template.COMMON_SHARED + cuda.PRIMITIVES.indices + template.COMMON_BODY
    # the common text uses no backend spelling
    common = template.COMMON_HEADER + template.COMMON_SHARED + template.COMMON_BODY
    for word in ("threadgroup_barrier", "__syncthreads", "__shfl", "simd_shuffle", "metal::", "expf", "logf"):
        assert word not in common


def metal_attributes_found(source):
    return [a for a in METAL_ATTRIBUTES if a in source]


def test_metal_source_asks_only_for_the_attributes_it_uses():
    assert metal_attributes_found(metal.SOURCE) == [
        "simdgroup_index_in_threadgroup", "thread_index_in_simdgroup",
        "thread_position_in_threadgroup", "threadgroup_position_in_grid",
    ]
    for name in template.INPUT_NAMES:  # no accidental <input>_shape/_strides/_ndim arguments
        for suffix in ("_shape", "_strides", "_ndim"):
            assert name + suffix not in metal.SOURCE and name + suffix not in cuda.SOURCE


def mlx_metal_source(vocab=262144, threads=1024):
    """The kernel text as MLX 0.32's metal_kernel writes it (signature from write_signature)."""
    attrs = {"simdgroup_index_in_threadgroup": "uint", "thread_index_in_simdgroup": "uint",
             "thread_position_in_threadgroup": "uint3", "threadgroup_position_in_grid": "uint3"}
    name = "custom_kernel_dgemma_sample_step"
    sig = [
        "  const device float* logits [[buffer(0)]]",
        "  const constant float* temp [[buffer(1)]]",
        "  const device uint32_t* keys [[buffer(2)]]",
        "  device int32_t* out_sampled [[buffer(3)]]",
        "  device int32_t* out_argmax [[buffer(4)]]",
        "  device float* out_entropy [[buffer(5)]]",
        "  device float* out_lse [[buffer(6)]]",
    ] + [f"  {t} {a} [[{a}]]" for a, t in attrs.items() if a in metal.SOURCE]
    inst = f"{name}<{vocab}, {threads}>"
    return (metal.HEADER + "template <int VOCAB, int TGSIZE>\n[[kernel]] void " + name + "(\n"
            + ",\n".join(sig) + ") {\n" + metal.SOURCE + "\n}\n"
            + f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({inst}) {inst};\n')


METAL_STUB = r"""
#include <cmath>
#include <cstdint>
typedef unsigned short ushort;
typedef unsigned int uint;
struct uint3 { uint x, y, z; };
#define threadgroup
#define device
#define constant
#define kernel
namespace metal {
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
template <class T> T simd_shuffle_xor(T x, ushort) { return x; }
namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
}  // namespace precise
}  // namespace metal
"""


@needs_cxx
def test_metal_source_type_checks_against_a_metal_stub(tmp_path):
    """Syntax and types of the Metal text as C++ (MSL is C++ based); the stub's
    primitives are placeholders, so this says nothing about Metal semantics."""
    src = tmp_path / "k.cpp"
    src.write_text(METAL_STUB + mlx_metal_source())
    r = subprocess.run([emulate.compiler(), "-std=c++17", "-fsyntax-only", "-Wall", "-Werror",
                        "-Wno-attributes", "-Wno-unused-variable", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def mlx_cuda_source(vocab=262144, threads=1024):
    """The kernel text as MLX 0.32's cuda_kernel writes it (build_kernel), with MLX's own
    device header replaced by the standard headers it provides."""
    return (
        "#include <cstdint>\n#include <cuda/std/limits>\n#include <cooperative_groups.h>\n"
        "#define inf cuda::std::numeric_limits<float>::infinity()\n"
        + cuda.HEADER
        + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        "__global__ void custom_kernel_dgemma_sample_step(\n"
        "    const float* logits,\n    const float* temp,\n    const uint32_t* keys,\n"
        "    int32_t* out_sampled,\n    int32_t* out_argmax,\n    float* out_entropy,\n"
        "    float* out_lse) {\n"
        f"  constexpr int VOCAB = {vocab};\n  constexpr int TGSIZE = {threads};\n\n"
        + cuda.SOURCE + "\n}\n\n} // namespace mlx::core::cu\n"
    )


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc (CUDA toolkit) on this machine")
def test_cuda_source_compiles_for_1024_thread_blocks(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text(mlx_cuda_source())
    r = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v",
                        "-Werror", "all-warnings", str(src), "-o", str(tmp_path / "k.cubin")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
    assert regs <= 64, f"{regs} registers: 1024-thread blocks need <= 64"
    assert "0 bytes spill stores" in r.stderr


# ---------------------------------------------------------------------------------------
# the real kernels (where their device exists)

needs_metal = pytest.mark.skipif(not metal.available(), reason="no Apple GPU (Metal) on this machine")
needs_cuda = pytest.mark.skipif(not cuda.available(), reason="no CUDA device with MLX's CUDA build here")


def gpu_kernel_checks(make):
    fn = make()
    assert kernels.self_check(fn) is None
    for V, L in ((262144, 8), (4099, 33), (5, 3)):
        x = random_logits((2, L, V), seed=L)
        x[0, 0] = np.tanh(x[0, 0] / 3) * 30  # soft-capped range
        logits, keys = mx.array(x), keys_for(2, L, seed=V)
        for temp in (0.4, 0.8):
            a = fn(logits, temp, keys)
            assert_matches_mlx(a, logits, temp, keys)
            b = fn(logits, temp, keys)
            for f in StepSample._fields:
                np.testing.assert_array_equal(np.array(getattr(a, f)), np.array(getattr(b, f)))
    x = np.zeros((1, 2, 300), np.float32)
    x[0, 0, [17, 3, 250]] = 9.0
    s = fn(mx.array(x), 0.5, keys_for(1, 2))
    assert np.array(s.argmax).tolist() == [[3, 0]]


@needs_metal
def test_metal_kernel_matches_mlx_path():
    gpu_kernel_checks(metal.make_sample_step)
    assert kernels.backend() == "metal"


@needs_cuda
def test_cuda_kernel_matches_mlx_path():
    gpu_kernel_checks(cuda.make_sample_step)
    assert kernels.backend() == "cuda"


# ---------------------------------------------------------------------------------------
# self-conditioning without a second softmax; the top-k approximation


def tiny_model(vocab=160, hidden=64, seed=0, quantize=False):
    model = small_model(small_model_config(
        vocab_size=vocab, canvas_length=16, hidden_size=hidden, num_hidden_layers=2, intermediate_size=96,
        num_attention_heads=4, head_dim=16, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
        sliding_window=8, max_position_embeddings=262144, eos_token_id=1, pad_token_id=0, bos_token_id=2), seed=seed)
    if quantize:
        nn.quantize(model, group_size=32, bits=8, class_predicate=lambda p, m: isinstance(m, nn.Embedding))
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def exact_sc(model, logits, temp):
    lse = mx.logsumexp(logits / temp, axis=-1)
    return model.soft_embeddings(probabilities(logits, temp, lse)), lse


def test_soft_embeddings_exact_path_equals_the_softmax_embedding(model):
    x = mx.array(random_logits((1, 16, 160), seed=1))
    lse = sample_step_mlx(x, 0.6, keys_for(1, 16)).lse
    got = kernels.soft_embeddings(model, x, 0.6, lse)
    want = mx.softmax(x / 0.6, axis=-1) @ model.decoder.embed_tokens.weight * model.embed_scale
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


def test_topk_keeps_exact_probabilities_of_the_top_tokens(model):
    x = random_logits((2, 16, 160), seed=2)
    logits = mx.array(x)
    exact, lse = exact_sc(model, logits, 0.7)
    got = kernels.topk_soft_embeddings(model, logits, 0.7, lse, 10, tail="drop")
    # by hand: the 10 largest logits' probabilities times their rows
    W = np.array(model.decoder.embed_tokens.weight)
    p = np.exp(x / 0.7 - np.array(lse)[..., None])
    top = np.argsort(-x, -1)[..., :10]
    want = np.einsum("blk,blkh->blh", np.take_along_axis(p, top, -1), W[top]) * model.embed_scale
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)
    # k >= V is the exact path
    np.testing.assert_allclose(np.array(kernels.topk_soft_embeddings(model, logits, 0.7, lse, 160)),
                               np.array(exact), rtol=1e-6, atol=1e-7)


def test_topk_is_exact_when_the_mass_sits_in_the_top_k(model):
    x = np.full((1, 16, 160), -1e4, np.float32)
    r = np.random.RandomState(3)
    for l in range(16):
        x[0, l, r.choice(160, 5, replace=False)] = r.standard_normal(5)
    logits = mx.array(x)
    exact, lse = exact_sc(model, logits, 0.5)
    for tail in ("mean", "drop"):
        got = kernels.topk_soft_embeddings(model, logits, 0.5, lse, 5, tail=tail)
        np.testing.assert_allclose(np.array(got), np.array(exact), rtol=1e-5, atol=1e-6)


def test_topk_mean_tail_beats_dropping_the_tail_on_flat_rows(model):
    logits = mx.array(random_logits((1, 16, 160), seed=4, scale=0.3))  # high entropy
    exact, lse = exact_sc(model, logits, 1.0)

    def cos_err(a):
        a, b = np.array(a).ravel(), np.array(exact).ravel()
        return 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    drop = cos_err(kernels.topk_soft_embeddings(model, logits, 1.0, lse, 8, tail="drop"))
    mean = cos_err(kernels.topk_soft_embeddings(model, logits, 1.0, lse, 8, tail="mean"))
    assert mean < drop / 3, (mean, drop)


def test_topk_with_quantized_embeddings():
    model = tiny_model(quantize=True)
    assert isinstance(model.decoder.embed_tokens, nn.QuantizedEmbedding)
    logits = mx.array(random_logits((1, 16, 160), seed=5))
    exact, lse = exact_sc(model, logits, 0.6)
    got = kernels.topk_soft_embeddings(model, logits, 0.6, lse, 159, tail="mean")
    assert got.dtype == exact.dtype and got.shape == exact.shape
    np.testing.assert_allclose(np.array(got), np.array(exact), rtol=1e-3, atol=2e-3)


def test_topk_bad_arguments(model):
    logits = mx.array(random_logits((1, 2, 160)))
    lse = mx.logsumexp(logits, axis=-1)
    with pytest.raises(ValueError, match="sc_top_k=0"):
        kernels.topk_soft_embeddings(model, logits, 1.0, lse, 0)
    with pytest.raises(ValueError, match="tail='zero'"):
        kernels.topk_soft_embeddings(model, logits, 1.0, lse, 4, tail="zero")


# ---------------------------------------------------------------------------------------
# the drafter with the kernels: same committed blocks as with the MLX path


def run_drafter(model, sample_fn, sc_top_k=None, steps=8):
    from mlx_dgemma.drafter import DenoiseSettings, denoise_block

    cache = model.make_cache()
    model.encode(mx.array([[2, 17, 33, 5, 80, 9]]), cache)
    settings = DenoiseSettings(max_denoising_steps=steps, sc_top_k=sc_top_k)
    drafts = []
    res = denoise_block(model, cache, settings, [7], 0, on_draft=drafts.append, sample_fn=sample_fn)
    return np.array(res.tokens), [np.array(d.tokens) for d in drafts], res


@needs_cxx
def test_drafter_commits_the_same_block_with_the_emulated_kernel(model, emulator):
    want, want_drafts, _ = run_drafter(model, sample_step_mlx)
    got, got_drafts, _ = run_drafter(model, emulate.make_sample_step(64, emulator))
    np.testing.assert_array_equal(got, want)
    assert len(got_drafts) == len(want_drafts) >= 2
    for a, b in zip(got_drafts, want_drafts):
        np.testing.assert_array_equal(a, b)


def test_drafter_uses_the_dispatch_and_the_sc_top_k_hook(monkeypatch, model):
    fn = good_kernel()
    register(monkeypatch, "cuda", lambda: fn)
    exact, _, _ = run_drafter(model, None)  # sample_fn=None: the drafter's indirection
    assert kernels.backend() == "cuda" and fn.calls[-1] == (1, 16, 160)
    full, _, _ = run_drafter(model, None, sc_top_k=160)  # k >= V: exact
    np.testing.assert_array_equal(full, exact)
    seen = []
    real = kernels.topk_soft_embeddings
    monkeypatch.setattr("mlx_dgemma.kernels.selfcond.topk_soft_embeddings",
                        lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    run_drafter(model, None, sc_top_k=12, steps=3)
    assert seen and set(seen) == {12}


needs_cpu_kernel = pytest.mark.skipif(not cpu.built(), reason="the CPU kernel is not built here "
                                      "(pip install -e . builds it)")


def _inverse_mix32(h: int) -> int:
    """The key whose lowbias32 hash is ``h`` (each step of the mixer is invertible)."""
    M = 1 << 32
    x = h ^ (h >> 16)
    x = (x * pow(0x846CA68B, -1, M)) % M
    x = x ^ (x >> 15) ^ (x >> 30)
    x = (x * pow(0x7FEB352D, -1, M)) % M
    return x ^ (x >> 16)


@pytest.fixture(params=["vector", "portable"])
def cpu_passes(request):
    """Both builds of the passes: AVX2 (where the CPU has it) and the portable C."""
    from mlx_dgemma.kernels import _cpu

    _cpu.use_vector(request.param == "vector")
    if request.param == "vector":
        _cpu.check_log()  # the vectorised noise, where it equals logf
    assert _cpu.info()["vector_noise"] == (request.param == "vector" and _cpu.info()["avx2"])
    yield request.param
    _cpu.use_vector(True)
    _cpu.check_log()


@needs_cpu_kernel
@pytest.mark.parametrize("V", [7, 8, 3001, 4096 + 513])
def test_cpu_kernel_draws_the_mlx_paths_tokens(V, cpu_passes):
    """Same sampled and argmax tokens as sample_step_mlx, bit for bit (no near-tie excuse):
    tails of every length, peaked rows, exact ties, -inf masks, several rows and threads;
    with the AVX2 passes and with the portable C ones."""
    fn = cpu.make_sample_step()
    B, L = 3, 7
    x = random_logits((B, L, V), seed=V)
    x[0, 0] *= 25.0  # nearly one-hot at low temperature
    x[1, 1, [1, V - 1]] = x[1, 1].max() + 2.0  # exact argmax tie: the lower token wins
    x[2, 2, : V // 2] = -np.inf  # masked tokens (constraints): never drawn
    x[2, 3, :] = -np.inf
    x[2, 3, V - 1] = 0.5  # a single allowed token
    logits = mx.array(x)
    keys = keys_for(B, L, seed=V)
    for temp in (0.4, 0.7, 1.3):
        got, want = fn(logits, temp, keys), sample_step_mlx(logits, temp, keys)
        np.testing.assert_array_equal(np.array(got.sampled), np.array(want.sampled))
        np.testing.assert_array_equal(np.array(got.argmax), np.array(want.argmax))
        assert got.argmax[1, 1].item() == 1 and got.sampled[2, 3].item() == V - 1
        assert (np.array(got.sampled)[2, 2] >= V // 2).all()
        # float32 sums over V terms (the MLX path) against double sums (the kernel)
        e_ref, _, lse_ref = torch_reference(x, temp)
        np.testing.assert_allclose(np.array(got.lse), lse_ref, rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(np.array(got.entropy), e_ref, rtol=1e-5, atol=1e-5)
        # softmax against float64: exp(x / t - lse) in float32 is off by the rounding of its
        # argument, a few ulp of |x / t| + |lse| (relative, in p)
        z = x.astype(np.float64) / temp
        p64 = np.exp(z - lse_ref[..., None])
        rel = 4 * np.finfo(np.float32).eps * (np.abs(np.where(np.isinf(z), 0, z)) + np.abs(lse_ref)[..., None]) + 1e-6
        err = np.abs(np.array(got.probs) - p64)
        assert np.all(err <= rel * p64 + 1e-38)  # exp(< -88) is 0 in float32 (MLX exp)


@needs_cpu_kernel
def test_cpu_kernel_top_hash_gives_infinite_noise_as_the_mlx_path():
    """The top 24-bit hash rounds u to 1.0, so the noise is +inf: that token wins, in the
    MLX path and in the kernel (its vectorised log special-cases it)."""
    fn = cpu.make_sample_step()
    V, token = 300, 123
    key = _inverse_mix32(0xFFFFFFFF) ^ token
    keys = mx.array(np.array([[key, key ^ 1]], np.uint32))
    logits = mx.array(random_logits((1, 2, V), seed=5))
    got, want = fn(logits, 0.5, keys), sample_step_mlx(logits, 0.5, keys)
    assert want.sampled[0, 0].item() == token
    np.testing.assert_array_equal(np.array(got.sampled), np.array(want.sampled))


@needs_cpu_kernel
@pytest.mark.skipif(not cpu.info().get("avx2"), reason="no AVX2 on this CPU: the kernel draws its noise "
                    "with logf itself, and there is no vectorised log to check")
def test_cpu_kernel_vectorised_log_is_the_c_librarys():
    """Every input the noise can give (2^24 uniforms, then -log(u)): equal, bit for bit, to
    logf, which is what MLX's CPU log calls."""
    from mlx_dgemma.kernels import _cpu

    assert _cpu.check_log() == 0
    assert _cpu.info()["vector_noise"]


@needs_cpu_kernel
def test_cpu_kernel_probabilities_feed_the_same_self_conditioning(model):
    V, L = model.args.vocab_size, model.args.canvas_length
    logits = mx.array(random_logits((2, L, V), seed=3))
    keys = keys_for(2, L)
    s = cpu.make_sample_step()(logits, 0.6, keys)
    assert s.probs is not None and s.probs.shape == (2, L, V)
    want = kernels.soft_embeddings(model, logits, 0.6, s.lse)
    got = kernels.soft_embeddings(model, logits, 0.6, s.lse, probs=s.probs)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


@needs_cpu_kernel
def test_drafter_commits_the_same_block_with_the_cpu_kernel(model):
    want, want_drafts, _ = run_drafter(model, sample_step_mlx)
    got, got_drafts, _ = run_drafter(model, cpu.make_sample_step())
    np.testing.assert_array_equal(got, want)
    assert len(got_drafts) == len(want_drafts) >= 2
    for a, b in zip(got_drafts, want_drafts):
        np.testing.assert_array_equal(a, b)
    if cpu.available():  # and through the drafter's own dispatch (sample_fn=None)
        default, _, _ = run_drafter(model, None)
        assert kernels.backend() == "cpu"
        np.testing.assert_array_equal(default, want)


@needs_metal
def test_drafter_commits_the_same_block_with_the_metal_kernel(model):
    np.testing.assert_array_equal(run_drafter(model, metal.make_sample_step())[0],
                                  run_drafter(model, sample_step_mlx)[0])


@needs_cuda
def test_drafter_commits_the_same_block_with_the_cuda_kernel(model):
    np.testing.assert_array_equal(run_drafter(model, cuda.make_sample_step())[0],
                                  run_drafter(model, sample_step_mlx)[0])
