"""The only importer of the cffi library; C return codes become exceptions here."""
from sandbox._native_lib import ffi, lib  # noqa: F401
