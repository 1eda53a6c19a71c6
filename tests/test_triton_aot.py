"""``benchmarks/triton_aot.py`` in CI: every Triton kernel launch deepopt makes compiles for sm_90 and sm_80 with no
spill in a launch the routing makes (outside ``benchmarks/triton_aot_scope.json``'s exemptions) and every launched
kernel is covered by a scenario; and the pieces the verdict rests on (TTGIR dot reading, the rules) on fixed input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import triton_aot  # noqa: E402


def test_every_kernel_launch_compiles_for_hopper_and_ampere_without_spills(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_aot.py"), "--ci", "--json",
                          str(tmp_path / "aot.json")], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "aot.json").read_text())
    assert not report["problems"] and report["kernels"]
    assert {c["target"] for c in report["kernels"]} == {90, 80}
    launched = set(triton_aot.launch_sites())
    assert launched and launched <= {c["kernel"] for c in report["kernels"]}


TTGIR = """
#blocked = #ttg.blocked<{sizePerThread = [1, 4], threadsPerWarp = [8, 4], warpsPerCTA = [4, 1], order = [1, 0]}>
#mma = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 8]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 32, 8]}>
    %5 = tt.dot %1, %2, %3, inputPrecision = ieee : tensor<64x16xf32, #a> * tensor<16x16xf32, #b> -> \
tensor<64x16xf32, #blocked>
    %6 = tt.dot %1, %2, %3 : tensor<16x64xf32, #a> * tensor<64x16xf32, #b> -> tensor<16x16xf32, #mma>
    %7 = ttng.warp_group_dot %1, %2, %3 {isAsync = true} : !ttg.memdesc<64x16xf32> * !ttg.memdesc<16x32xf32> -> \
tensor<64x32xf32, #mma1>
    %8 = ttng.warp_group_dot_wait %7 {pendings = 0 : i32} : tensor<64x32xf32, #mma1>
"""  # (a backslash-newline joins a line)


def test_dot_lowering_is_read_from_the_ttgir():
    assert triton_aot.dot_lowering(TTGIR) == {"wgmma": 1, "mma": 1, "fma": 1}


def _row(**kw):
    row = {"kernel": "deepopt.optimizers.deep_kernels._update_kernel", "target": 90, "key": "k", "status": "ok",
           "error": "", "spill_stores": 0, "spill_loads": 0, "routed": True, "scenarios": ["s"]}
    return {**row, **kw}


def test_the_rules_flag_compile_errors_routed_spills_and_nothing_else():
    report = {"scenario_errors": {}, "kernels": [
        _row(), _row(key="a", spill_stores=8, routed=False), _row(key="b", status="compile error", error="E"),
        _row(key="c", spill_loads=4), _row(kernel="deepopt.hope.titans_kernels._backward_kernel", spill_loads=4)]}
    scope = {"spill_exempt": {"deepopt.hope.titans_kernels._backward_kernel": "being fixed"}}
    problems = triton_aot.check(report, scope, full_scope=False)
    assert len(problems) == 2 and "compile error" in problems[0] and "spills 0/4" in problems[1]


def test_the_scope_file_names_launched_kernels_only():
    scope = json.loads(triton_aot.SCOPE_FILE.read_text())
    assert set(scope["spill_exempt"]) <= set(triton_aot.launch_sites())
    assert all(isinstance(why, str) and why for why in scope["spill_exempt"].values())
