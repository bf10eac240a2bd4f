"""The STAS segmentation task: masks per image (inference here; its chains and metric in
bundles/tasks/segmentation.json)."""
