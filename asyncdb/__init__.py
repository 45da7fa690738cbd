"""asyncdb placeholder while the runtime is assembled."""
