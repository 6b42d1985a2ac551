"""templates/bp_runtime.h, the C every generated module starts with, compiled on its own: it is
warning-free C99 for both scalar types, and its thread pool and matrix product compute what a
plain triple loop computes (every transpose combination, split across threads)."""

from __future__ import annotations

import shutil
import subprocess
import textwrap

import pytest

from bpcompile.codegen.module import template_dir

HEADER = template_dir() / "bp_runtime.h"
CC = shutil.which("gcc") or shutil.which("cc")
pytestmark = pytest.mark.skipif(CC is None, reason="needs a C compiler")
FLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2", "-pthread", "-I", str(HEADER.parent)]

DRIVER = textwrap.dedent("""
    #define BP_BLAS_MIN_FLOPS 0LL
    #define BP_PARALLEL_MIN_WORK 1LL
    #include "bp_runtime.h"
    #include <stdio.h>
    #include <stdlib.h>

    /* C = op(A) op(B) for every transpose combination, by bp_gemm on 2 threads and by a triple loop */
    int main(void)
    {
        const int64_t M = 37, N = 45, K = 29;
        bp_real *A = malloc(sizeof(bp_real) * M * K), *B = malloc(sizeof(bp_real) * K * N);
        bp_real *C = malloc(sizeof(bp_real) * M * N);
        double worst = 0;
        for (int64_t i = 0; i < M * K; ++i) A[i] = (bp_real)((i * 7919 % 101) - 50) / 25;
        for (int64_t i = 0; i < K * N; ++i) B[i] = (bp_real)((i * 104729 % 97) - 48) / 24;
        bp_set_num_threads(2);
        for (int ta = 0; ta < 2; ++ta)
            for (int tb = 0; tb < 2; ++tb) {
                const int64_t lda = ta ? M : K, ldb = tb ? K : N;
                bp_gemm(ta, tb, M, N, K, A, lda, B, ldb, C, N);
                for (int64_t i = 0; i < M; ++i)
                    for (int64_t j = 0; j < N; ++j) {
                        double want = 0;
                        for (int64_t p = 0; p < K; ++p)
                            want += (double)(ta ? A[p * lda + i] : A[i * lda + p]) *
                                    (double)(tb ? B[j * ldb + p] : B[p * ldb + j]);
                        const double err = fabs(C[i * N + j] - want) / (1 + fabs(want));
                        worst = err > worst ? err : worst;
                    }
            }
        printf("%g\\n", worst);
        free(A); free(B); free(C);
        return 0;
    }
""")


@pytest.mark.parametrize("is_float", [0, 1], ids=["float64", "float32"])
@pytest.mark.parametrize("blas", [0, 1], ids=["loops", "blas-declared"])
def test_runtime_compiles_alone_without_warnings(tmp_path, is_float, blas):
    source = tmp_path / "alone.c"
    source.write_text('#define BP_BLAS_MIN_FLOPS 0LL\n#define BP_PARALLEL_MIN_WORK 1LL\n#include "bp_runtime.h"\n'
                      "int bp_runtime_lint(void);\nint bp_runtime_lint(void) { return bp_set_num_threads(1); }\n")
    done = subprocess.run([CC, *FLAGS, "-Wno-unused-function", f"-DBP_REAL_IS_FLOAT={is_float}",
                           f"-DBP_USE_BLAS={blas}", "-fsyntax-only", str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_runtime_requires_the_model_settings(tmp_path):
    source = tmp_path / "bare.c"
    source.write_text('#include "bp_runtime.h"\n')
    done = subprocess.run([CC, *FLAGS, "-fsyntax-only", str(source)], capture_output=True, text=True)
    assert done.returncode != 0 and "define BP_BLAS_MIN_FLOPS" in done.stderr


@pytest.mark.parametrize("is_float,tolerance", [(0, 1e-13), (1, 1e-5)], ids=["float64", "float32"])
def test_pool_and_product_equal_a_triple_loop(tmp_path, is_float, tolerance):
    source, exe = tmp_path / "gemm.c", tmp_path / "gemm"
    source.write_text(DRIVER)
    built = subprocess.run([CC, *FLAGS, f"-DBP_REAL_IS_FLOAT={is_float}", str(source), "-o", str(exe), "-lm"],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert float(ran.stdout) < tolerance, ran.stdout


PLAN_DRIVER = textwrap.dedent("""
    #define BP_BLAS_MIN_FLOPS 0LL
    #define BP_PARALLEL_MIN_WORK 1LL
    #include "bp_runtime.h"
    #include <stdio.h>

    /* rows { coef, first kernel, last kernel, ndims, dim index }, float32 values */
    static const int64_t chain[4 * 5] = {
        16, 0, 1, 0, 0,  /* a:  64 bytes, kernels 0-1 */
        16, 1, 2, 1, 0,  /* b: 192 bytes (16 x dims[0] = 3), kernels 1-2 */
        10, 2, 3, 0, 0,  /* c:  40 -> 64 bytes, kernels 2-3 */
        32, 4, 5, 1, 0,  /* d: 384 bytes, kernels 4-5: live with none of the others */
    };
    static const int64_t gap[3 * 5] = {
        64, 0, 0, 0, 0,  /* p: 256 bytes, kernel 0 */
        48, 0, 1, 0, 0,  /* q: 192 bytes, kernels 0-1: above p */
        32, 1, 2, 0, 0,  /* r: 128 bytes, kernels 1-2: below q, where p was */
    };
    static const int64_t unknown_dim[5] = {1, 0, 0, 1, 1};

    static void show(int64_t n, const int64_t *table, const int64_t *dims)
    {
        int64_t off[4], work[12];
        const int64_t total = bp_plan_workspace(n, table, 5, dims, 1, 4, off, work);
        printf("%lld", (long long)total);
        for (int64_t i = 0; total >= 0 && i < n; ++i)
            printf(" %lld", (long long)off[i]);
        printf("\\n");
    }

    int main(void)
    {
        const int64_t three[1] = {3}, huge[1] = {INT64_MAX / 8};
        show(4, chain, three);
        show(3, gap, three);
        show(0, chain, three);
        show(1, unknown_dim, three);
        show(4, chain, huge);
        return 0;
    }
""")


def _compile_and_run(tmp_path, name: str, source: str) -> str:
    """Build a C driver of bp_runtime.h with the module's flags and return what it prints."""
    path, exe = tmp_path / f"{name}.c", tmp_path / name
    path.write_text(source)
    built = subprocess.run([CC, *FLAGS, str(path), "-o", str(exe), "-lm"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    return ran.stdout


def test_workspace_plan_places_largest_first_at_the_lowest_free_offset(tmp_path):
    assert _compile_and_run(tmp_path, "plan", PLAN_DRIVER).splitlines() == [
        "384 192 0 192 0",  # d, b at 0 (never live together); a above b; c above b (a is not live with it)
        "448 0 256 0",      # r fits below q, in the bytes p used
        "0",                # no buffers: an empty arena
        "-1",               # a dimension the model does not have
        "-2",               # sizes beyond int64
    ]


RNG_DRIVER = textwrap.dedent("""
    #define BP_BLAS_MIN_FLOPS 0LL
    #define BP_PARALLEL_MIN_WORK 1LL
    #include "bp_runtime.h"
    #include <stdio.h>

    int main(void)
    {
        uint64_t state = 0;
        for (int i = 0; i < 3; ++i)
            printf("%016llx\\n", (unsigned long long)bp_splitmix64(&state));
        const int64_t cases[3][3] = {{0, 0, 0}, {7, 3, 12345}, {-5, 1000000, 4294967295LL}};  /* seed, counter, salt */
        for (int c = 0; c < 3; ++c) {
            const uint64_t key = bp_random_key(cases[c][0], (uint64_t)cases[c][2], cases[c][1]);
            for (int64_t i = 0; i < 5; ++i)
                printf("%a\\n", bp_random_uniform(key, i));
        }
        return 0;
    }
""")


def test_random_numbers_are_splitmix64_and_the_reference_stream(tmp_path):
    """bp_splitmix64 is splitmix64 (its published first outputs from state 0); bp_random_uniform
    draws what the NumPy reference evaluator's uniform_stream draws, bit for bit."""
    from bpcompile.ops.core import uniform_stream
    from bpcompile.tools.export import splitmix64
    lines = _compile_and_run(tmp_path, "rng", RNG_DRIVER).split()
    assert lines[:3] == ["e220a8397b1dcdaf", "6e789e6aa1b965f4", "06c45d188009454f"]
    assert [f"{int(z):016x}" for z in splitmix64(0, 0, 3)] == lines[:3]
    drawn = [float.fromhex(v) for v in lines[3:]]
    want = [v for seed, counter, salt in ((0, 0, 0), (7, 3, 12345), (-5, 1000000, 2**32 - 1))
            for v in uniform_stream(seed, counter, salt, 5)]
    assert drawn == want and all(0 <= v < 1 for v in drawn) and len(set(drawn)) == len(drawn)
