"""The course's `datasets` namespace: `datasets.untar_data(datasets.URLs.IMAGENETTE_160)` and the standard
readers, plus the generated shapes (this module's names before they moved to `minilearn.data.shapes`)."""
from .data.external import URLs, default_data_dir, download_url, untar_data
from .data.formats import (CIFAR10_CLASSES, cifar10_data, cifar10_databunch, mnist_data, mnist_databunch, read_cifar10,
                           read_idx, read_mnist)
from .data.shapes import SHAPE_NAMES, ShapesDataset, make_shapes, save_shapes_folder, shapes_databunch, shapes_datasets

__all__ = ['URLs', 'untar_data', 'download_url', 'default_data_dir', 'read_idx', 'read_mnist', 'read_cifar10',
           'CIFAR10_CLASSES', 'cifar10_data', 'cifar10_databunch', 'mnist_data', 'mnist_databunch',
           'SHAPE_NAMES', 'make_shapes', 'ShapesDataset', 'shapes_datasets', 'shapes_databunch', 'save_shapes_folder']
