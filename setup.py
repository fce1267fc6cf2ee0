# cffi's out-of-line API mode needs `cffi_modules`, which only setup.py can pass to setuptools.
from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffibuilder"])
