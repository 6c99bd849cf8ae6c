"""Research analysis of runs: triplet diagrams, hard-triplet curves, gradient-field simulation, run reports."""
