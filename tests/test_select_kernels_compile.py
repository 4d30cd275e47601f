"""CI has no GPU: compile the weight-select kernels to PTX for sm_90 with the GPU's code
generator (not the interpreter), for every dtype they take, plain and segmented (and the
compaction's two modes), to catch what the interpreter accepts but the compiler rejects."""

from gpu_compile import compile_in_subprocess


def test_select_kernels_compile_for_a_gpu():
    code = """
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import modkern.kernels.mod_select as ks
        count = 0
        for dt, acc in (("bf16", tl.float32), ("fp16", tl.float32), ("fp32", tl.float32),
                        ("fp64", tl.float64)):
            for segmented in (False, True):
                common = {"SEGMENTED": segmented, "ACC": acc, "BLOCK": ks.BLOCK}
                jobs = [(ks._minmax_kernel, {**common, "COPY": True}),
                        (ks._patch_kernel, {**common, "WRITE": True})]
                if not segmented:  # the compaction runs on one tensor
                    jobs += [(ks._select_kernel, {"EMIT": emit, "ACC": acc, "BLOCK": ks.BLOCK})
                             for emit in (False, True)]
                for fn, const in jobs:
                    types = {"src_ptr": f"*{dt}", "dst_ptr": f"*{dt}", "bmin_ptr": f"*{dt}",
                             "bmax_ptr": f"*{dt}", "v_ptr": f"*{dt}", "t2_ptr": "*fp32",
                             "flat_ptr": f"*{dt}", "n": "i64"}
                    sig = {a: ("constexpr" if a in const else types.get(a, "*i64"))
                           for a in fn.arg_names}
                    triton.compile(ASTSource(fn, sig, constexprs=const),
                                   target=GPUTarget("cuda", 90, 32),
                                   options={"num_warps": 8})
                    count += 1
        print("compiled", count)
    """
    assert "compiled 24" in compile_in_subprocess(code)
