"""Checkpoints that survive a kill and load without arbitrary pickle.

- Training state (``checkpoints/last.pt``, ``checkpoints/best.pt``): a dict of tensors and
  primitives written with ``torch.save`` into memory, then atomically to disk
  (``fileio.atomic_write_bytes``), and read back with ``torch.load(weights_only=True)``,
  never falling back to full unpickling.
- Weights to share (``model.safetensors`` in the run directory): safetensors, with the
  resolved config and the image shape in its metadata, so ``load_model`` needs nothing else.
"""

from __future__ import annotations

import io
import math
import pickle
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

import vaelab
from vaelab import rundir
from vaelab.config import Config, coerce, parse_toml, upgraded
from vaelab.errors import UserError

FORMAT = 1
# The version of the random streams (data/batches.py): a run resumes exactly only with the streams
# it started with. 2: named streams (1, before them, let the noise of step s and the binarisation
# of epoch s coincide).
RNG_STREAMS = 2


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
    }


def _numpy_state() -> dict:
    # np.random.get_state() holds an ndarray, which weights_only=True refuses: store plain lists
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate((state["python_version"], tuple(state["python"]), None))


def checkpoint_bytes(
    model,
    optimizer,
    *,
    epoch: int,
    step: int,
    config: Config,
    x_shape,
    fingerprint: str,
    label_fingerprint: str = "",
    run_id: str | None = None,
    best_elbo: float,
    elapsed: float = 0.0,
    val_images: int,
    rate: dict | None = None,
) -> bytes:
    """The training state as ``torch.save`` bytes, for ``fileio.atomic_write_bytes``: serialised when it
    is taken (a few ms), written when the run's checkpoint cadence says so (``runs.RunWriter``)."""
    state = {
        "format": FORMAT,
        "vaelab_version": vaelab.__version__,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "config": config.to_dict(),
        "x_shape": list(x_shape),
        "fingerprint": fingerprint,
        "label_fingerprint": label_fingerprint,
        "run_id": run_id or "",  # the run directory's marker (rundir.py): whose state this is
        "best_elbo": best_elbo,
        "val_images": val_images,  # the validation split's size: a resume must hold out the same images
        "rate": rate,  # --target-rate: the multiplier's state (training.RateTarget), None without one
        "elapsed": elapsed,  # wall seconds of the run: what a resumed --time-budget has left
        "rng": rng_state(),
        "rng_streams": RNG_STREAMS,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a checkpoint file (a folder, a device or a pipe); give checkpoints/last.pt")
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    if not blob.startswith(b"PK"):  # torch.save writes a zip archive
        raise UserError(f"{path} is not a vaelab checkpoint (not a PyTorch zip archive); give checkpoints/last.pt")
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError):
        unsafe = _unsafe_globals(blob)
        if unsafe:
            raise UserError(
                f"{path} needs arbitrary pickle to load ({', '.join(unsafe[:3])}), which can run code; vaelab "
                "refuses it. Use a checkpoint written by vaelab"
            ) from None
        raise UserError(f"{path} is truncated or corrupt; use checkpoints/best.pt or retrain") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise UserError(f"{path} is not a vaelab checkpoint")
    missing = [key for key, kind in REQUIRED.items() if not isinstance(state.get(key), kind)]
    if missing or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        what = f"lacks {', '.join(missing)} or holds them" if missing else "holds weights that are not tensors"
        raise UserError(f"{path} {what} in another form than vaelab writes; use the run's own checkpoints/last.pt")
    return state


# what every vaelab checkpoint holds, and in which form (the later additions are read with .get)
REQUIRED = {
    "model": dict,
    "optimizer": dict,
    "config": dict,
    "x_shape": list,
    "epoch": int,
    "step": int,
    "best_elbo": float,
    "fingerprint": str,
    "rng": dict,
}


def _unsafe_globals(blob: bytes) -> list[str]:
    """The classes and functions a torch.save archive's pickle would import beyond what ``weights_only``
    loading allows (PyTorch's own scan of the pickle, which runs none of it); [] for a torn archive."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(blob))
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError):
        return []


def weights_bytes(model, config: Config, x_shape, identity: dict[str, str] | None = None) -> bytes:
    """The weights as a safetensors file, with the resolved config and image shape in its metadata, and
    ``identity``: the run's id and its data's fingerprints (see :func:`identity_of`)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "config": config.to_toml(),
        "x_shape": ",".join(map(str, x_shape)),
        "vaelab_version": vaelab.__version__,
        **{k: v for k, v in (identity or {}).items() if v},
    }
    return st_save(tensors, metadata=metadata)


def config_from_dict(values: dict, where: str) -> Config:
    return Config(**{k: coerce(k, v, where) for k, v in upgraded(values, where).items()})


def read_trained(path: str | Path) -> tuple[Config, tuple[int, ...], dict]:
    """``(config, x_shape, weights)`` from a run directory, a ``model.safetensors`` file or a ``.pt`` checkpoint."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give a run directory, a checkpoint (.pt) or a model.safetensors file")
    if path.is_dir():
        path = path / "model.safetensors"
        if not path.exists():
            raise UserError(f"{path.parent} has no model.safetensors: is it a vaelab run directory?")
    if not path.is_file():  # a device (/dev/zero reads for ever), a pipe, a socket
        raise UserError(f"{path} is not a run directory or a model file; give a run directory, a .pt or .safetensors")
    if path.suffix != ".safetensors":
        ckpt = load_checkpoint(path)
        return config_from_dict(ckpt["config"], str(path)), _x_shape(ckpt["x_shape"], path), ckpt["model"]
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            weights = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err})") from None
    if "config" not in meta or "x_shape" not in meta:
        raise UserError(f"{path} has no vaelab metadata (config, x_shape): it was not written by vaelab")
    config = Config(**parse_toml(meta["config"], str(path)))
    return config, _x_shape(meta["x_shape"].split(","), path), weights


def _x_shape(values, path) -> tuple[int, ...]:
    """An image shape (C, H, W) of positive whole numbers, as a file records it."""
    try:
        shape = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1 or math.prod(shape) > 2**26:
        raise UserError(f"{path} records an image shape {values!r} that no vaelab run has; use the run's own files")
    return shape


IDENTITY = ("run_id", "fingerprint", "label_fingerprint")


def identity_of(path: str | Path) -> dict[str, str]:
    """What the weights at ``path`` (a run directory, model.safetensors or a .pt checkpoint) say of
    themselves: the id of the run that wrote them and the fingerprints of the data they were trained
    on; a key is missing where they do not say (files written before vaelab recorded it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix != ".safetensors":
        found = load_checkpoint(path)
    else:
        try:
            with safe_open(str(path), "pt") as f:
                found = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{path} is not a readable safetensors file ({err})") from None
    return {k: found[k] for k in IDENTITY if isinstance(found.get(k), str) and found[k]}


def check_owner(path: Path, found: dict[str, str] | None = None) -> None:
    """Refuse weights in a run directory that another run wrote (``found``: :func:`identity_of` the path)."""
    found = identity_of(path) if found is None else found
    owner = rundir.run_id(path) if path.is_dir() else None
    if owner and found.get("run_id", owner) != owner:
        raise UserError(
            f"{path / 'model.safetensors'} was written by another run than {path}'s (run ids {found['run_id'][:8]} and "
            f"{owner[:8]}); put the run's own weights back, or give that file's own run directory"
        )


def check_identity(path: str | Path, config: Config, splits, given_data: bool = False) -> bool:
    """Refuse weights in a run directory that another run wrote, and data that are not the ones the
    weights were trained on, unless ``given_data`` (``evaluate --data``: other data on purpose).
    Returns whether the data are the run's own (only then is the run's evaluation.json rewritten)."""
    path, found = Path(path), identity_of(path)
    check_owner(path, found)
    own = found.get("fingerprint", splits.fingerprint) == splits.fingerprint
    if config.uses_labels:
        own = own and found.get("label_fingerprint", splits.label_fingerprint) == splits.label_fingerprint
    if not own and not given_data:
        raise UserError(
            f"the data {splits.name!r} found from here are not the images and labels {path} was trained on (their "
            "fingerprints differ; a relative path is read from the folder you run in): run from the folder it "
            "trained in, or give --data and --data-dir"
        )
    return own


def load_run(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, config)`` of a trained run; the model in eval mode. The model is built on PyTorch's
    meta device first and its shapes compared with the weights', so a file whose config declares
    layers its weights do not have is refused before anything of that size is allocated."""
    from vaelab.models import build

    config, x_shape, weights = read_trained(path)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build(config, x_shape).state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in weights.items()}:
        raise UserError(
            f"{path} holds weights of another architecture than its config describes; use the run's own files"
        )
    model = build(config, x_shape)
    load_state(model, weights, path)
    return model.to(device).eval(), config


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """A trained model from a run directory, a ``model.safetensors`` file or a ``.pt`` checkpoint,
    in eval mode, ready for ``encode`` / ``decode`` / ``prior``."""
    return load_run(path, device)[0]


def load_state(model, state: dict, where) -> None:
    """``state`` into ``model``: refused in one line when its shapes are another architecture's or a weight
    is NaN or infinite (a run that diverged, or a damaged file), which every later step would carry on."""
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(
            f"{where} holds NaN or infinite weights ({bad}): the training diverged or the file was damaged; use "
            "checkpoints/best.pt, or retrain (a lower --lr, or --grad-clip)"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = [line.strip() for line in str(err).splitlines()[1:3]]
        raise UserError(f"{where} holds weights of another architecture ({' '.join(first)[:300]})") from None
