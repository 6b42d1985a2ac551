"""Building the native module: C compiler and flags, the BLAS choice, and the content-hashed
build cache that cffi compiles into (a build is reused when its sources, flags and bpcompile's
own code are unchanged)."""

from .cffi_build import Sources, blas, build, cache_key, compiler, compiler_fingerprint, default_build_root

__all__ = ["Sources", "blas", "build", "cache_key", "compiler", "compiler_fingerprint", "default_build_root"]
