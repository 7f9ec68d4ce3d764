"""Pictures of simulators: static PNG plots for the command line and a self-contained HTML report."""
