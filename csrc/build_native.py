"""The C build: the spawn hot path (spawn.c, child.c, common.c) as a cffi out-of-line API
extension, sandbox._native_lib; and init (init.c, common.c) as its own static executable,
sandbox/sbx-init, which the child executes once the sandbox is built.

Why init is an executable and not code in the extension: a cloned child that stays alive
keeps a copy-on-write image of the whole daemon (its Python heap, its secrets in memory),
so every page the daemon writes afterwards is copied for it. Measured with init running in
that copy: 16.8 MB RSS and ~4 MB private per idle sandbox, and copy-on-write faults were
~7% of the daemon's CPU time per sandbox. Static: the exec needs no loader or library from
the sandbox's own root, whatever the policy binds there."""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration", "-D_GNU_SOURCE"]
EXTENSION_SOURCES = ("spawn.c", "child.c", "common.c")
INIT_SOURCES = ("init.c", "common.c")
INIT_EXE = "sbx-init"   # SBX_INIT_EXE in sbx_internal.h

ffibuilder = FFI()
ffibuilder.cdef((HERE / "native.cdef").read_text())
ffibuilder.set_source(
    "sandbox._native_lib",
    '#include "native.h"',
    sources=[f"{HERE.name}/{name}" for name in EXTENSION_SOURCES],
    include_dirs=[str(HERE)],
    extra_compile_args=CFLAGS,
)


def build_init(compiler, build_temp: str, out_dir: str) -> str:
    """Compile and statically link init with a distutils compiler; returns its path."""
    objects = compiler.compile([str(HERE / name) for name in INIT_SOURCES], output_dir=build_temp,
                               include_dirs=[str(HERE)], extra_postargs=CFLAGS)
    compiler.link_executable(objects, INIT_EXE, output_dir=out_dir, extra_postargs=["-static"])
    return str(Path(out_dir) / INIT_EXE)


if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
