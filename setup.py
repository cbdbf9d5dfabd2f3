"""Builds qtool's NF4 CPU kernels (qtool/nf4/_cpu.c) at install time; all other metadata is in pyproject.toml.

The kernels are a plain C library loaded with ctypes (no Python API); qtool/nf4/_build.py holds the flags, shared
with the build on first use that covers source checkouts which were never installed.
"""
import runpy

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_build = runpy.run_path("qtool/nf4/_build.py")  # not `import qtool`: the build environment need not have its deps


class BuildKernels(build_ext):
    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception:  # a compiler without target_clones: one generic copy (slower, the same results)
            ext.define_macros.append((_build["NO_CLONES"], None))
            super().build_extension(ext)


setup(
    ext_modules=[Extension(
        f"qtool.nf4.{_build['LIB_STEM']}",
        sources=["qtool/nf4/_cpu.c"],
        define_macros=[_build["sha_macro"](_build["source_sha256"]())],
        extra_compile_args=_build["CFLAGS"],
        extra_link_args=["-pthread"],
        libraries=["m"],
    )],
    cmdclass={"build_ext": BuildKernels},
)
