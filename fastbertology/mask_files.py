"""Head-mask files given on the command line (``prune --head-mask``, ``sweep --masks``): read safely and checked.

Every error names the option, the file, the problem and the fix; a pickled file is never loaded.
"""

from __future__ import annotations

import os

import numpy as np

from .npy_files import NpyFileError, read_numeric_npy
from .patching import heads_per_layer


def read_mask_file(path, *, option: str) -> np.ndarray:
    """A head-mask ``.npy`` file as float32, checked: a real ``.npy`` (not pickled), numbers or booleans, finite."""
    where = f"{option} {path}"
    if not os.path.isfile(path):
        raise ValueError(f"{where} does not exist or is not a file")
    try:
        array = read_numeric_npy(path)
    except NpyFileError as error:
        fix = "save the mask with numpy.save('mask.npy', array)" if "not a .npy" in str(error) else \
            "save a numeric array with numpy.save (e.g. float32 1 = keep, 0 = mask)"
        raise ValueError(f"{where} {error}; {fix}") from None
    except OSError as error:
        raise ValueError(f"{where} cannot be read ({error.strerror or error})") from None
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused below
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{where} contains NaN or infinite values (or numbers too large for float32); a head mask "
                         "must be finite")
    return array


def read_pruning_mask(path) -> np.ndarray:
    """``prune --head-mask``: one ``[L, H]`` array of 0 (prune) and 1 (keep); its shape is checked against the
    model by :func:`check_mask_shape` once the model is loaded."""
    mask = read_mask_file(path, option="--head-mask")
    if mask.ndim != 2:
        raise ValueError(f"--head-mask {path} has shape {mask.shape}; pruning takes one [layers, heads] mask")
    if not np.isin(mask, (0.0, 1.0)).all():
        found = sorted(set(np.unique(mask).tolist()) - {0.0, 1.0})[:5]
        raise ValueError(f"--head-mask {path}: a mask for pruning holds only 0 (prune) and 1 (keep); found values "
                         f"{found}")
    return mask


def read_sweep_masks(path) -> np.ndarray:
    """``sweep --masks``: ``[M, L, H]`` (one ``[L, H]`` mask becomes ``[1, L, H]``)."""
    masks = read_mask_file(path, option="--masks")
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or masks.shape[0] < 1:
        raise ValueError(f"--masks {path} has shape {masks.shape}; give masks [M, layers, heads] (or one "
                         "[layers, heads])")
    return masks


def check_mask_shape(head_mask: np.ndarray, model, path) -> None:
    """``--head-mask`` fits the loaded model's ``[layers, heads]``."""
    counts = heads_per_layer(model)
    expected = (len(counts), max(counts, default=0))
    if tuple(head_mask.shape) != expected or len(set(counts)) != 1:
        raise ValueError(f"--head-mask {path} has shape {tuple(head_mask.shape)} but this model has "
                         f"[layers, heads] = {list(expected)}" + ("" if len(set(counts)) == 1 else
                                                                 f" (head counts {counts}: already pruned)"))
