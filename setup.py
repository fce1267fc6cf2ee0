# cffi's out-of-line API mode needs `cffi_modules`, which only setup.py can pass to setuptools.
# build_ext also links init (csrc/init.c) into sandbox/sbx-init: see csrc/build_native.py.
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
from build_native import INIT_EXE, build_init  # noqa: E402


class BuildExtAndInit(build_ext):
    def run(self):
        super().run()
        exe = build_init(self.compiler, self.build_temp, os.path.join(self.build_lib, "sandbox"))
        if self.inplace or self.editable_mode:   # next to the in-place extension
            self.copy_file(exe, os.path.join("sandbox", INIT_EXE))

    def get_outputs(self):
        return super().get_outputs() + [os.path.join(self.build_lib, "sandbox", INIT_EXE)]


setup(cffi_modules=["csrc/build_native.py:ffibuilder"], cmdclass={"build_ext": BuildExtAndInit})
