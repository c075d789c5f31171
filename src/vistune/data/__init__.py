"""Data layer: image folders, NOAH/VTAB-1k list files, built-in offline sets, transforms, and checks."""
from .builtin import BUILTIN_DATASETS
from .checks import verify_decodable
from .datasets import ArrayDataset, FileDataset, ImageDataset, stratified_pick
from .images import IMAGE_EXTENSIONS, PIXEL_LIMIT_ENV, load_image, max_image_pixels
from .loading import DataSplits, DataWarning, load_data
from .transforms import build_transforms

__all__ = ["BUILTIN_DATASETS", "DataSplits", "DataWarning", "load_data", "verify_decodable", "build_transforms",
           "load_image", "max_image_pixels", "PIXEL_LIMIT_ENV", "IMAGE_EXTENSIONS", "ImageDataset", "FileDataset",
           "ArrayDataset", "stratified_pick"]
