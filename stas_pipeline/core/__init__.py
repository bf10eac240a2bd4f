"""Shared building blocks of every stage and task: files, problems, cache, datalist, models, training."""
