"""Export of a run's final sparse model with its masks, and the loader for inference (SPEC, Export).

Two encodings of the masked weights (every other tensor of the state dict is stored dense):

- ``pt`` (bitmask): per masked weight a packed bitmask (1 bit per weight, ``uint8``) and the
  values of the active weights in row-major order;
- ``csr``: per masked weight, viewed as a matrix ``[shape[0], prod(shape[1:])]`` (a conv's
  ``[out, in*kh*kw]``), compressed sparse rows: ``crow`` (int32), ``col`` (int16 when the matrix
  has at most 32,767 columns, else int32) and ``values``.

The stored structure is the *mask* (an active weight that happens to be 0.0 is kept), so the
mask is recovered exactly from either encoding. Runs without masks (dense methods) encode every
conv/linear weight by its nonzero pattern, which shows what sparse storage would cost them.
Files hold only tensors, strings and numbers (``torch.load(weights_only=True)``).

:func:`size_report` gives the bytes of the model dense, in CSR and as bitmask + values.

Methods that evaluate each task through its own subnetwork (PackNet, continual DST, CL-LSG, scratch)
also leave per-task *views* in the run directory (``task_views.pt``, see
:func:`compact_task_views`): for task j, a bitmask per weight that task j sees only partly and the
few tensors that differ (its BatchNorm snapshot, or a whole model for scratch). The export carries
them, and :func:`use_task` switches a loaded model to task j, so that every task is evaluated
exactly as in the run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from sparsecl import SparseCLError
from sparsecl.config import first_difference, run_identity
from sparsecl.models.heads import NearestMeanClassifier
from sparsecl.sparse.capacity import widen_
from sparsecl.sparse.execution import SparseExecution
from sparsecl.sparse.kernel_choice import KernelChoices
from sparsecl.sparse.masks import MaskSet

FORMAT = "sparsecl-export"
VERSION = 1
ENCODINGS = {"pt": "bitmask", "csr": "csr"}
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


# ----------------------------------------------------------------------------- bit packing
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> ``uint8`` tensor of ``ceil(numel / 8)`` bytes (least significant bit first)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BITS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    n = math.prod(shape)
    bits = (packed.view(-1, 1) & _BITS.to(packed.device)) != 0
    return bits.reshape(-1)[:n].view(shape)


# ----------------------------------------------------------------------------- encodings
def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, shape[0] if shape else 1)


def encode_bitmask(weight: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """``{'shape', 'bitmask', 'values'}`` of one masked weight."""
    return {"shape": list(weight.shape), "bitmask": pack_bits(mask), "values": weight[mask].contiguous()}


def decode_bitmask(enc: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, mask)`` from :func:`encode_bitmask`."""
    shape = tuple(int(s) for s in enc["shape"])
    mask = unpack_bits(enc["bitmask"], shape)
    w = torch.zeros(shape, dtype=enc["values"].dtype)
    w[mask] = enc["values"]
    return w, mask


def encode_csr(weight: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """``{'shape', 'crow', 'col', 'values'}`` of one masked weight (rows = first dimension)."""
    rows, cols = _matrix_shape(tuple(weight.shape))
    m = mask.reshape(rows, cols)
    w = weight.reshape(rows, cols)
    r, c = m.nonzero(as_tuple=True)
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(r, minlength=rows), 0)
    return {
        "shape": list(weight.shape),
        "crow": crow.to(torch.int32 if int(crow[-1]) < 2**31 else torch.int64),
        "col": c.to(torch.int16 if cols <= 32767 else torch.int32),
        "values": w[r, c].contiguous(),
    }


def decode_csr(enc: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, mask)`` from :func:`encode_csr`."""
    shape = tuple(int(s) for s in enc["shape"])
    rows, cols = _matrix_shape(shape)
    crow = enc["crow"].long()
    r = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1])
    c = enc["col"].long()
    w = torch.zeros(rows, cols, dtype=enc["values"].dtype)
    m = torch.zeros(rows, cols, dtype=torch.bool)
    w[r, c] = enc["values"]
    m[r, c] = True
    return w.view(shape), m.view(shape)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def size_report(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Bytes of the model with its masked weights stored dense, as CSR and as bitmask + values.

    Unmasked tensors (biases, BatchNorm, dense layers) are counted dense in all three. CSR uses
    int32 row pointers and int16/int32 column indices as :func:`encode_csr` stores them.
    """
    rest = sum(_nbytes(t) for n, t in state.items() if n not in masks)
    dense = csr = bitmask = 0
    nnz_total = n_total = 0
    for n, m in masks.items():
        w = state[n]
        numel, nnz = w.numel(), int(m.sum())
        rows, cols = _matrix_shape(tuple(w.shape))
        vb = w.element_size()
        dense += numel * vb
        csr += nnz * vb + nnz * (2 if cols <= 32767 else 4) + (rows + 1) * (4 if nnz < 2**31 else 8)
        bitmask += nnz * vb + (numel + 7) // 8
        nnz_total += nnz
        n_total += numel
    return {
        "masked_weights": n_total, "active_weights": nnz_total,
        "density": nnz_total / n_total if n_total else 1.0,
        "other_bytes": rest,
        "dense_bytes": dense + rest, "csr_bytes": csr + rest, "bitmask_bytes": bitmask + rest,
        "masked_layers": {"dense": dense, "csr": csr, "bitmask": bitmask},
    }


# ----------------------------------------------------------------------------- per-task views
TASK_VIEWS = "task_views.pt"
INFERENCE_HEAD = "inference_head.pt"  # the run's classifier when it is not the model's head (iCaRL)


def compact_task_views(final: Mapping[str, torch.Tensor], views: list[Mapping[str, torch.Tensor]]
                       ) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Per task ``{"masks": {key: bool}, "dense": {key: tensor}}``, the difference between the
    task's view (a full state dict) and the ``final`` state: a key in ``masks`` is ``final * mask``
    exactly, a key in ``dense`` is stored whole, every other key equals ``final``. Exact by
    construction (each mask is checked against the view before it is kept)."""
    out = []
    for view in views:
        masks: dict[str, torch.Tensor] = {}
        dense: dict[str, torch.Tensor] = {}
        for k, v in view.items():
            f = final[k]
            v, f = v.detach().cpu(), f.detach().cpu()
            if torch.equal(v, f):
                continue
            if v.is_floating_point() and v.shape == f.shape:
                m = v != 0
                if torch.equal(v, f * m):
                    masks[k] = m
                    continue
            dense[k] = v.clone()
        out.append({"masks": masks, "dense": dense})
    return out


def method_task_views(method: Any, n_tasks: int) -> list[dict[str, torch.Tensor]] | None:
    """``method.task_view(j)`` for every task, or ``None`` for methods with one model for all."""
    first = method.task_view(0)
    if first is None:
        return None
    return [first] + [method.task_view(j) for j in range(1, n_tasks)]


def use_task(model: nn.Module, info: dict[str, Any], task_id: int) -> nn.Module:
    """Switch a model from :func:`load_export` to task ``task_id``'s subnetwork (in place; returns
    it; on the sparse kernels, ``info['kernel_masks']`` becomes the view's nonzero weights). Exports
    without per-task views serve every task with the one model (a no-op here)."""
    views = info.get("task_views")
    if not views:
        return model
    if not 0 <= task_id < len(views):
        raise SparseCLError(f"task {task_id} out of range: the export holds {len(views)} tasks")
    final, view = info["final_state"], views[task_id]
    state = dict(final)
    state.update({k: final[k] * m for k, m in view["masks"].items()})
    state.update(view["dense"])
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in state.items()})
    if "execution" in info:  # the kernels run on the view's own weights, not the final network's
        info["kernel_masks"] = MaskSet.from_nonzero(info["execution"].model, view["masks"])
    return model


# ----------------------------------------------------------------------------- run -> file
def _load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(result.json, final state dict, masks) of a run directory."""
    result_path = run_dir / "result.json"
    if not result_path.exists():
        raise SparseCLError(f"no run directory at {run_dir} (no result.json)")
    try:
        result = json.loads(result_path.read_text())
    except json.JSONDecodeError:
        raise SparseCLError(f"{result_path} is not valid JSON") from None
    ckpt_path = run_dir / "checkpoint.pt"
    ckpt = None
    if ckpt_path.exists():
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SparseCLError(f"checkpoint {ckpt_path} is unreadable ({type(e).__name__})") from None
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise SparseCLError(f"{ckpt_path} is not a sparsecl checkpoint")
        if isinstance(ckpt.get("config"), dict) and isinstance(result.get("config"), dict):
            diff = first_difference(run_identity(ckpt["config"]), run_identity(result["config"]))
            if diff:
                raise SparseCLError(f"{ckpt_path} belongs to another run than {result_path} ({diff})")
    model_path = run_dir / "model.pt"
    if model_path.exists():
        try:
            state = torch.load(model_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SparseCLError(f"model file {model_path} is unreadable ({type(e).__name__})") from None
    elif ckpt is not None:
        state = ckpt["model"]
    else:
        raise SparseCLError(f"{run_dir} holds no model.pt and no checkpoint.pt: nothing to export")
    masks: dict[str, torch.Tensor] = {}
    method_state = ckpt.get("method", {}) if ckpt is not None else {}
    if isinstance(method_state, dict) and isinstance(method_state.get("masks"), dict):
        masks = {n: m.bool() for n, m in method_state["masks"]["masks"].items()}
    _check_fits(state, masks, result, run_dir)
    return result, state, masks


def _check_fits(state: Any, masks: dict[str, torch.Tensor], result: dict[str, Any], run_dir: Path) -> None:
    """The weights (and masks) must be those of the architecture result.json describes: a file
    copied in from another run is one clear error, not a traceback or a silently wrong export."""
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise SparseCLError(f"the weights in {run_dir} are not a model state (a foreign model.pt or checkpoint.pt?)")
    if not result.get("model"):
        return  # runs older than result.json's model section: nothing to compare with
    expected = {k: tuple(t.shape) for k, t in build_from_spec(result["model"]).state_dict().items()}
    found = {k: tuple(t.shape) for k, t in state.items()}  # methods may add state of their own
    found_masks = {k: tuple(m.shape) for k, m in masks.items()}
    for key in sorted(set(expected) | set(found_masks)):
        want = expected.get(key, found.get(key))
        have = found.get(key) if key in expected else found_masks[key]
        if have != want or (key in found_masks and found_masks[key] != found.get(key)):
            raise SparseCLError(f"the weights in {run_dir} do not fit the model of its result.json "
                                f"({key}: {have} instead of {want}): a file from another run?")


def _model_spec(result: dict[str, Any]) -> dict[str, Any]:
    spec = result.get("model")
    if spec:
        return spec
    # Runs written before result.json had a "model" section: rebuild it from the benchmark.
    from sparsecl.data.benchmarks import load_benchmark

    cfg = result["config"]
    stream = load_benchmark(cfg["benchmark"], cfg.get("data_dir"), class_order=cfg.get("class_order"),
                            n_tasks=cfg.get("n_tasks"), root=cfg.get("data_root"), image_size=cfg.get("image_size"),
                            download=False)
    return {
        "backbone": cfg.get("backbone") or stream.default_backbone,
        "backbone_options": cfg.get("backbone_options") or {},
        "input_shape": list(stream.input_shape), "n_classes": stream.n_classes,
        "task_classes": [t.classes for t in stream.tasks] if cfg.get("setting") == "task-il" else None,
    }


def _conv_linear_weights(spec: dict[str, Any]) -> list[str]:
    model = build_from_spec(spec)
    return [f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """An untrained model of the architecture described by a ``model`` spec (result.json/export)."""
    from sparsecl.models import build_model

    model = build_model(spec["backbone"], tuple(spec["input_shape"]), int(spec["n_classes"]),
                        task_classes=spec.get("task_classes"), **(spec.get("backbone_options") or {}))
    if spec.get("width", 1) != 1:  # the run allocated reserve channels (CL-LSG's max_width)
        widen_(model, spec["width"], seed=0)  # the loaded weights replace the reserve's draws
    return model


def default_export_path(run_dir: str | Path, fmt: str) -> Path:
    """Where ``sparsecl export`` writes by default: ``RUN_DIR/model-sparse.pt`` or ``model-csr.pt``."""
    return Path(run_dir) / ("model-sparse.pt" if fmt == "pt" else "model-csr.pt")


def build_export(run_dir: str | Path, fmt: str = "pt") -> tuple[dict[str, Any], dict[str, Any]]:
    """The export payload of ``run_dir``'s final model with its masks in format ``fmt``
    (``'pt'`` or ``'csr'``), and its size report. Writing it is the caller's
    (:func:`sparsecl.engine.io.export_run`): the sparse core does no run-directory writes.
    """
    if fmt not in ENCODINGS:
        raise SparseCLError(f"unknown export format {fmt!r} (known: {', '.join(ENCODINGS)})")
    run_dir = Path(run_dir)
    result, state, masks = _load_run(run_dir)
    # A method whose tasks need more than the one backbone (PNN's columns) says so in its report.
    reason = (result.get("method") or {}).get("export_unsupported")
    if reason:
        raise SparseCLError(f"{run_dir} cannot be exported: {reason}")
    spec = _model_spec(result)
    from_masks = bool(masks)
    if not masks:  # dense run: encode conv/linear weights by their nonzero pattern
        masks = {n: state[n] != 0 for n in _conv_linear_weights(spec) if n in state}
    encode = encode_bitmask if fmt == "pt" else encode_csr
    sparse = {n: encode(state[n], m) for n, m in masks.items()}
    dense = {n: t for n, t in state.items() if n not in masks}
    report = size_report(state, masks)
    report["encoding"] = ENCODINGS[fmt]
    report["structure_from"] = "masks" if from_masks else "nonzero weights (run has no masks)"
    payload = {
        "format": FORMAT, "version": VERSION, "encoding": ENCODINGS[fmt],
        "model": {**{k: spec[k] for k in ("backbone", "backbone_options", "input_shape", "n_classes", "task_classes")},
                  "width": spec.get("width", 1)},
        "dense": dense, "sparse": sparse,
        "config": json.dumps(result.get("config", {})),
        "sizes": {k: v for k, v in report.items() if isinstance(v, (int, float, str))},
    }
    views_path = run_dir / TASK_VIEWS
    if views_path.exists():
        try:
            views = torch.load(views_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SparseCLError(f"{views_path} is unreadable ({type(e).__name__})") from None
        payload["task_views"] = [
            {"masks": {k: {"shape": list(m.shape), "bitmask": pack_bits(m)} for k, m in v["masks"].items()},
             "dense": v["dense"]} for v in views]
        report["task_views"] = len(views)
        report["task_view_bytes"] = sum(
            sum(math.ceil(m.numel() / 8) for m in v["masks"].values()) + sum(_nbytes(t) for t in v["dense"].values())
            for v in views)
    head_path = run_dir / INFERENCE_HEAD
    if head_path.exists():
        try:
            payload["inference_head"] = torch.load(head_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SparseCLError(f"{head_path} is unreadable ({type(e).__name__})") from None
        report["classifier"] = payload["inference_head"]["kind"]
    return payload, report


def load_export(path: str | Path, device: torch.device | str = "cpu", *,
                sparse_kernels: bool | str = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the exported model for inference.

    Returns ``(model, info)``: the model in eval mode on ``device`` with the exported weights
    (inactive weights exactly zero), and ``info`` with ``masks`` (name -> bool tensor), the
    ``model`` spec, the ``encoding``, the stored ``sizes``, the run ``config`` (a dict) and
    ``task_views`` (``None``, or per-task views for :func:`use_task`; the model starts as the final
    network, which is not every task's subnetwork for methods with views) and ``classifier``:
    ``head`` (the model's logits) or ``nearest-mean`` (iCaRL runs: the model is then a
    :class:`~sparsecl.models.heads.NearestMeanClassifier` around the network, whose parameter names
    the ``masks`` use, at ``model.model``).

    ``sparse_kernels``: run the masked layers on the real sparse CPU kernels
    (:class:`~sparsecl.sparse.execution.SparseExecution`, kept in ``info['execution']``; CPU only);
    ``"auto"``: only where they measure faster (:mod:`sparsecl.sparse.kernel_choice`).
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SparseCLError(f"export file not found: {path}") from None
    except Exception as e:
        raise SparseCLError(f"export file {path} is unreadable ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SparseCLError(f"{path} is not a sparsecl export")
    decode = decode_bitmask if payload["encoding"] == "bitmask" else decode_csr
    state = dict(payload["dense"])
    masks = {}
    for n, enc in payload["sparse"].items():
        state[n], masks[n] = decode(enc)
    model = build_from_spec(payload["model"])
    model.load_state_dict(state)
    head = payload.get("inference_head")
    if head is not None:
        if head.get("kind") != "nearest-mean":
            raise SparseCLError(f"{path}: unknown classifier {head.get('kind')!r} (this sparsecl knows nearest-mean)")
        model = NearestMeanClassifier(model, head["class_means"], head["seen"])
    model.to(device).eval()
    info = {"masks": masks, "model": payload["model"], "encoding": payload["encoding"],
            "sizes": payload["sizes"], "config": json.loads(payload["config"]), "task_views": None,
            "classifier": head["kind"] if head is not None else "head"}
    if sparse_kernels:
        net = model.model if head is not None else model
        info["kernel_masks"] = MaskSet(net, {n: m.to(device) for n, m in masks.items()})
        choices = KernelChoices() if sparse_kernels == "auto" else None
        info["execution"] = SparseExecution(net, lambda: info["kernel_masks"], choices=choices).install()
    if payload.get("task_views"):
        info["final_state"] = state
        info["task_views"] = [
            {"masks": {k: unpack_bits(m["bitmask"], tuple(m["shape"])) for k, m in v["masks"].items()},
             "dense": v["dense"]} for v in payload["task_views"]]
    return model, info
