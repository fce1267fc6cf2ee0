"""The sandbox lifecycle: ordered named steps with their undo, exec, verified destroy."""
