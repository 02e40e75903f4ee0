"""Build of the compiled extensions — the engine's hot path (``conceptsvc/_speedups.pyx``) and
the annotation wire writer (``conceptsvc/_wire.pyx``); all metadata is in pyproject.toml. The extension is required: `make install` builds it with the Cython and gcc of
the machine (setuptools runs this file for every install, editable ones included)."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [
            Extension("conceptsvc._speedups", ["conceptsvc/_speedups.pyx"]),
            Extension("conceptsvc._wire", ["conceptsvc/_wire.pyx"]),
        ],
        compiler_directives={"language_level": "3"},
        quiet=True,
    )
)
