"""Thin wrappers, one module per kernel facility: namespaces, mounts, cgroups, seccomp,
netfilter, network, caps. Each third-party kernel binding is used by exactly one module."""
