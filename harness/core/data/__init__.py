"""Datasets: real on-disk formats (ImageFolder, COCO, ADE20K) and the embedded synthetic "shapes"."""
