"""sandboxctl: the operator's and orchestrator's command line."""
