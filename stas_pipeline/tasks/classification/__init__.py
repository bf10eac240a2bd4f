"""Image-level binary classification (the glaucoma fundus recipe): inference to a CSV of probabilities,
and its evaluation."""
