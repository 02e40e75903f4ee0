"""Build of the compiled extensions — the engine's hot path (``conceptsvc/_speedups.pyx``), the
annotation wire writer (``conceptsvc/_wire.pyx``) and approximate matching's search
(``conceptsvc/_approx.pyx``, C++); all metadata is in pyproject.toml. The extensions are
required: `make install` builds them with the Cython, gcc and g++ of
the machine (setuptools runs this file for every install, editable ones included)."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [
            Extension("conceptsvc._speedups", ["conceptsvc/_speedups.pyx"]),
            Extension("conceptsvc._wire", ["conceptsvc/_wire.pyx"]),
            Extension("conceptsvc._approx", ["conceptsvc/_approx.pyx"], language="c++"),
        ],
        compiler_directives={"language_level": "3"},
        quiet=True,
    )
)
