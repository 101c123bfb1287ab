"""Datasets: real on-disk formats (ImageFolder, WebDataset shards, COCO, ADE20K), the fast
decode path and the embedded synthetic "shapes"."""
