"""Policies: frozen dataclasses loaded from TOML with clear, field-naming errors."""
from sandbox.policy.load import (find_policy, load_policy, merge_overrides, policy_from_dict,
                                 policy_hash, policy_to_dict)
from sandbox.policy.schema import (EnvironmentPolicy, EscalationPolicy, FilesystemPolicy,
                                   LimitsPolicy, NetworkPolicy, Policy, ScannerPolicy,
                                   SeccompPolicy, UserPolicy)

__all__ = [
    "Policy", "UserPolicy", "EnvironmentPolicy", "FilesystemPolicy", "LimitsPolicy",
    "NetworkPolicy", "SeccompPolicy", "ScannerPolicy", "EscalationPolicy",
    "load_policy", "find_policy", "merge_overrides", "policy_from_dict", "policy_hash",
    "policy_to_dict",
]
