"""Builds the data plane: ext/engine.pyx (which includes its parts) into fastfwd._engine."""
from Cython.Build import cythonize
from setuptools import Extension, setup

engine = Extension(
    "fastfwd._engine",
    sources=["ext/engine.pyx"],
    extra_compile_args=["-O2", "-pthread", "-Wno-unused-function"],
    extra_link_args=["-pthread"],
)

setup(
    ext_modules=cythonize(
        [engine],
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
