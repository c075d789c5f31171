"""Data layer: image folders, NOAH/VTAB-1k list files, built-in offline sets, and transforms."""
from .builtin import BUILTIN_DATASETS
from .datasets import ArrayDataset, DataSplits, FileDataset, ImageDataset, load_data, stratified_pick
from .images import IMAGE_EXTENSIONS, load_image
from .transforms import build_transforms

__all__ = ["BUILTIN_DATASETS", "DataSplits", "load_data", "build_transforms", "load_image", "IMAGE_EXTENSIONS",
           "ImageDataset", "FileDataset", "ArrayDataset", "stratified_pick"]
