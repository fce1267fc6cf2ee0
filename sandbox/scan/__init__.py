"""The output scanner: rules, engine, decoders, validators. See README "Output scanner".

    from sandbox.scan import Scanner, load_rules
    scanner = Scanner.from_policy(policy.scanner)
    stream = scanner.stream(salt=b"per-sandbox salt")   # one per output stream
    out = stream.feed(chunk)   # ScanResult(released, findings, blocked)
    out = stream.finish()      # flush the held-back tail
"""
from sandbox.scan.engine import Scanner, ScanStream
from sandbox.scan.findings import Finding, ScanResult
from sandbox.scan.rules import Rule, load_rules

__all__ = ["Scanner", "ScanStream", "Finding", "ScanResult", "Rule", "load_rules"]
