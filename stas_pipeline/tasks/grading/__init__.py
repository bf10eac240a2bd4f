"""The ordinal grading task (the diabetic-retinopathy recipe): grades 0-4 from a continuous score."""
