"""Loads that map the cached weights instead of copying them, so K replicas on a node share one copy in RAM.

Every replica on a node loads from the same read-only files of the node-local cache. Mapped, their weights are
the same page-cache pages in every process (counted once per node); copied, each replica pays for its own.

- ONNX: the converter stores every initializer as external data beside the graph (prefetch.convert.onnx).
  onnxruntime memory-maps external data when the session is created from the model's path, and uses the mapped
  bytes in place as long as it does not prepack them: `session.disable_prepacking=1` (ORT 1.32 has no separate
  switch for the mapping itself). Measured: the data file's pages are Shared_Clean across processes.
- PyTorch (MLflow's pytorch flavor): MLflow 3 saves a torch.export archive (model.pt2) by default and drops
  torch.load keyword arguments for it; its pyfunc loader passes none either, so `torch.load(mmap=True)` cannot be
  reached through MLflow. Both of MLflow's formats (model.pt2 and the pickled model.pth) are zip archives whose
  tensor records are stored uncompressed and 64-byte aligned, so we load the model through MLflow (its own
  predict), map the archive once (MAP_PRIVATE, what torch.load(mmap=True) does) and point every parameter and
  buffer whose bytes equal a record at that record, in place. The copies MLflow made are freed and given back to
  the kernel (malloc_trim). Weights are never written at inference, so the mapped pages stay clean and shared.
- Anything else (pickled scikit-learn, custom pyfunc models, TorchScript): unpickling builds private objects;
  nothing to map. `LoadedModel.info()` says so ("shared_weights": false, "why").
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import struct
import zipfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ONNX_SHARED_CONFIG = {"session.disable_prepacking": "1"}
_MIN_MAPPED = 4096                # smaller tensors are not worth a mapping (they share a page with others anyway)
_ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"


@dataclasses.dataclass
class Sharing:
    """How a load treated the weights: mapped (shared between processes) or not, and why not."""

    shared: bool
    how: str = ""
    why: str = ""
    mapped_bytes: int = 0
    private_tensor_bytes: int = 0
    files: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shared_weights": self.shared}
        if self.shared:
            out["how"] = self.how
            out["mapped_bytes"] = self.mapped_bytes
            if self.private_tensor_bytes:
                out["private_tensor_bytes"] = self.private_tensor_bytes
        else:
            out["why"] = self.why
        return out


OPTED_OUT = Sharing(False, why="share_weights=False: weights copied into this process")


# -- ONNX -------------------------------------------------------------------------------------------------------
def onnx_sharing(derived_dir: Path, flavor: str | None) -> Sharing:
    """Whether an ONNX conversion keeps its weights in external data a session can map."""
    from prefetch.convert.runtime import read_manifest

    doc = read_manifest(derived_dir)
    graph = doc["io"]["file"]
    data = [f for f in doc["files"] if f["path"] != graph]
    if not data:
        return Sharing(False, why="the conversion keeps its weights inside the graph file (converted before "
                                  "external data; convert again with this version)")
    if flavor == "sklearn":
        return Sharing(False, why="scikit-learn models convert to tree/linear operators whose parameters are "
                                  "node attributes, which onnxruntime copies into its kernels")
    return Sharing(True, how="onnxruntime maps the external data file (prepacking disabled)",
                   mapped_bytes=sum(f["size"] for f in data),
                   files=tuple(str(derived_dir / f["path"]) for f in data))


def onnx_session_options(session_options: dict) -> dict:
    """The caller's session options plus what keeps the mapped initializers in place."""
    entries = {**ONNX_SHARED_CONFIG, **(session_options.get("config_entries") or {})}
    return {**session_options, "config_entries": entries}


def warm_up_onnx(model) -> None:
    """Answer one row of zeros once: onnxruntime maps lazily and allocates its arena on the first run, so this
    makes the weights resident before the first request and lets the load's profile include the arena."""
    import numpy as np

    try:
        model.predict(np.zeros((1, *model.row_shape), dtype=model.dtype))
    except Exception as e:   # an input zeros do not suit: the first request pays instead
        logger.debug("warm-up of %s skipped: %s", model, e)


# -- PyTorch ----------------------------------------------------------------------------------------------------
def torch_weights_file(model_dir: Path) -> Path | None:
    """The zip archive MLflow's pytorch flavor wrote (model.pt2 or model.pth), or None."""
    import yaml

    try:
        flavors = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]
        data = model_dir / flavors["pytorch"]["model_data"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    for name in ("model.pt2", "model.pth"):
        if (data / name).is_file() and zipfile.is_zipfile(data / name):
            return data / name
    return None


def map_torch_weights(module, weights_file: Path) -> Sharing:
    """Point module's parameters and buffers at the matching records of weights_file, mapped once."""
    import torch

    records = stored_records(weights_file)
    size = weights_file.stat().st_size
    storage = torch.UntypedStorage.from_file(str(weights_file), shared=False, nbytes=size)   # MAP_PRIVATE
    by_size: dict[int, list[tuple[int, int]]] = {}
    for offset, nbytes in records:
        by_size.setdefault(nbytes, []).append((offset, nbytes))
    mapped = private = 0
    done: dict[int, Any] = {}          # data_ptr of a replaced tensor -> its mapped view (tied weights)
    for tensor in _tensors(module):
        ptr = tensor.data_ptr()
        if ptr in done:                        # another tensor on the same storage (tied weights)
            twin = done[ptr]
            if twin is not None and twin.shape == tensor.shape and twin.stride() == tensor.stride():
                tensor.data = twin
            continue
        view = _matching_view(tensor, storage, by_size) if _mappable(tensor) else None
        done[ptr] = view
        if view is None:
            private += tensor.numel() * tensor.element_size()
            continue
        tensor.data = view                     # in place: the Parameter object (and every reference) stays
        mapped += view.numel() * view.element_size()
    del done
    release_freed_memory()
    if not mapped:
        return Sharing(False, why=f"no tensor of the model matches a stored record of {weights_file.name}")
    return Sharing(True, how=f"parameters mapped from {weights_file.name} (MAP_PRIVATE, read-only use)",
                   mapped_bytes=mapped, private_tensor_bytes=private, files=(str(weights_file),))


def stored_records(path: Path) -> list[tuple[int, int]]:
    """(data offset, size) of every uncompressed member of a zip archive: what can be mapped in place."""
    out = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as raw:
        for info in z.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.file_size < _MIN_MAPPED:
                continue
            raw.seek(info.header_offset)
            header = _ZIP_LOCAL_HEADER.unpack(raw.read(_ZIP_LOCAL_HEADER.size))
            if header[0] != _ZIP_LOCAL_MAGIC:
                continue
            name_len, extra_len = header[9], header[10]
            out.append((info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len, info.file_size))
    return out


def _tensors(module):
    seen = set()
    for _name, t in list(module.named_parameters(remove_duplicate=False)) + \
            list(module.named_buffers(remove_duplicate=False)):
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            yield t


def _mappable(tensor) -> bool:
    return (tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.numel() * tensor.element_size() >= _MIN_MAPPED and not tensor.is_sparse
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())


def _matching_view(tensor, storage, by_size):
    import torch

    nbytes = tensor.numel() * tensor.element_size()
    flat = tensor.detach().reshape(-1).view(torch.uint8)
    for i, (offset, size) in enumerate(by_size.get(nbytes, ())):
        if offset % tensor.element_size():
            continue
        candidate = torch.empty(0, dtype=torch.uint8)
        candidate.set_(storage, offset, (size,), (1,))
        if torch.equal(candidate, flat):
            by_size[nbytes].pop(i)
            view = torch.empty(0, dtype=tensor.dtype)
            view.set_(storage, offset // tensor.element_size(), tuple(tensor.shape), tuple(tensor.stride()))
            return view
    return None


def release_freed_memory() -> None:
    """Give the pages of freed copies back to the kernel now (glibc keeps freed heap pages otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: the allocator returns memory on its own schedule
        pass


# -- native MLflow models ---------------------------------------------------------------------------------------
def share_native(pyfunc_model, model_dir: Path) -> Sharing:
    """Map the weights of a loaded MLflow pyfunc model where its flavor allows it (pytorch), else say why not."""
    from prefetch.convert import flavor_of

    flavor = flavor_of(model_dir)
    if flavor != "pytorch":
        return native_sharing_unsupported(flavor)
    weights = torch_weights_file(model_dir)
    if weights is None:
        return Sharing(False, why="the pytorch model has no zip-format archive (model.pt2 / model.pth) to map")
    try:
        module = pyfunc_model.get_raw_model()
    except Exception as e:     # a pyfunc wrapper without get_raw_model: the model stays as MLflow loaded it
        return Sharing(False, why=f"the loaded model does not expose its torch module ({type(e).__name__})")
    try:
        return map_torch_weights(module, weights)
    except (OSError, RuntimeError, ValueError, zipfile.BadZipFile) as e:
        # Tensors already re-pointed hold the same bytes; the rest stay MLflow's copies. Serving goes on.
        logger.warning("mapping the weights of %s failed, they stay private: %s", weights, e)
        return Sharing(False, why=f"mapping {weights.name} failed: {type(e).__name__}: {e}"[:300])


# Modules torch.export.load imports lazily on its first call (~400 of them, tens of MiB: sympy, networkx, the
# functorch partitioners, ...). Once per process, like any import: paid in prepare_runtime, not by the model.
_PT2_LOADER_MODULES = (
    "torch.export", "torch.export._trace", "torch.export._unlift", "torch.export.pt2_archive._package",
    "torch._export.serde.serialize", "torch._export.passes", "torch._export.passes.lift_constants_pass",
    "torch._export.db", "torch._dynamo", "torch.fx.experimental.symbolic_shapes", "torch._functorch.aot_autograd",
    "torch._functorch.partitioners", "torch._inductor.codegen.common", "torch._inductor.sizevars",
    "torch._inductor.compile_worker", "networkx", "sympy.combinatorics",
)


def prepare_torch_loader(model_dir: Path) -> None:
    """Import what loading this model's torch.export archive will import (nothing for other models)."""
    weights = torch_weights_file(Path(model_dir))
    if weights is not None and weights.suffix == ".pt2":
        import_pt2_loader()


def import_pt2_loader() -> None:
    """Import the modules torch.export.load needs (see _PT2_LOADER_MODULES)."""
    import importlib

    for name in _PT2_LOADER_MODULES:
        try:
            importlib.import_module(name)
        except Exception:    # a module that moved in another torch: the first load imports what it needs
            pass


# -- what cannot share ------------------------------------------------------------------------------------------
def native_sharing_unsupported(flavor: str | None) -> Sharing:
    why = {
        "sklearn": "scikit-learn models are unpickled (skops/pickle) into private Python objects",
        "python_function": "a custom pyfunc model builds its own objects in load_context; nothing to map",
        None: "not an MLflow model",
    }.get(flavor, f"the '{flavor}' flavor deserializes into private objects; only pytorch maps its weights")
    return Sharing(False, why=why)


def format_sharing_unsupported(format: str) -> Sharing:
    return Sharing(False, why=f"{format} models are deserialized into private memory (torch.jit.load copies)")
