"""training — rating logs to an evaluated, versioned model directory."""
